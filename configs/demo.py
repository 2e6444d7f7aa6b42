"""Class-conditional DFM on Fashion-MNIST in pixel space, sized for a laptop CPU.

28x28 images padded to 32x32 (background -1), two scales 16 -> 32 with patches
2 and 4 (an 8x8 token grid), a small DiT. ``make demo`` trains it in minutes and
evaluates FD-FMNIST (the demo's FID, ``dfm_jax.evaluation.fd_fmnist``) on 500 samples
every 400 steps and at the end.
"""

from dfm_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.total_steps = 800
    config.batch_size = 64
    config.log_every = 100
    config.checkpoint_every = 400
    config.sample_every = 400

    config.data.source = "fashion_mnist"
    config.data.resolution = 32
    config.data.channels = 1
    config.data.num_classes = 10

    config.pyramid.ratios = (2,)
    config.objective.stage_probs = (0.9, 0.1)

    config.model.size = "S"
    config.model.patch_sizes = (2, 4)
    config.model.depth = 4
    config.model.width = 128
    config.model.num_heads = 4

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.0
    config.optimizer.ema_decay = 0.999

    config.sampling.steps_per_stage = (30, 10)
    config.sampling.thresholds = (0.9,)
    config.sampling.cfg_scale = 1.5
    config.sampling.grid_classes = 10
    config.sampling.samples_per_class = 10
    config.sampling.preview_examples = 10

    config.evals.fd_fmnist = config_lib.evaluator(
        metrics=("fd_fmnist",), every=400, num_samples=500
    )
    return config

"""Class-conditional video DFM on Moving Fashion-MNIST in pixel space, sized for a CPU.

Clips of 8 frames at 32x32 of one garment bouncing in the box (``data.source =
"moving_fashion_mnist"``, generated from the Fashion-MNIST IDX files), decomposed per
frame into two scales 16 -> 32 (Laplacian, x2) with patches 4 and 8: a 4x4 token grid
per frame, 128 tokens per clip with 3-D RoPE; each scale standardised by its std (the
video default; measured on 256 clips at start, as pixel sources store none).
``make demo-video`` trains it, writes animated GIFs of the class grid and of the
coarse-stage previews under ``samples/``, and ends with the FVD-FMNIST report (samples
next to real clips, the same clips with shuffled frames, and noise).
"""

from configs import demo
from dfm_jax import config as config_lib


def get_config():
    config = demo.get_config()
    config.total_steps = 1_200
    config.batch_size = 32
    config.log_every = 100
    config.checkpoint_every = 400
    config.sample_every = 400

    config.data.source = "moving_fashion_mnist"
    config.data.frames = 8
    config.data.resolution = 32
    config.data.channels = 1

    config.model.patch_sizes = (4, 8)

    config.sampling.samples_per_class = 4
    config.sampling.preview_examples = 10
    # FD-FMNIST takes images; the video demo's metric is FVD-FMNIST (a video classifier's
    # features, dfm_jax.evaluation.fvd_fmnist), on 200 clips at the end of training.
    del config.evals["fd_fmnist"]
    config.evals.fvd_fmnist = config_lib.evaluator(
        metrics=("fvd_fmnist",), every=1_200, num_samples=200
    )
    return config

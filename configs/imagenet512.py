"""DFM on ImageNet 512 px in FLUX-autoencoder latent space (paper, spec section 5).

64x64x16 latents (FLUX AE, /8) prepared as ArrayRecords by ``python -m
dfm_jax.prepare``; two scales 32 -> 64 with patches 1 and 2 (a 32x32 token
grid); DiT-XL; batch 256; AdamW (0.9, 0.99), wd 0.01, lr 1e-4 with 10k warm-up,
clip 1.0, EMA 0.9999; p_q = (0.9, 0.1); 500k steps. Sampling [30, 10], tau 0.7.

Smoke test without data or accelerator:

    python -m dfm_jax.main --config=configs/imagenet512.py --workdir=/tmp/in512 \
        --config.data.source=synthetic --config.model.size=S --config.model.depth=2 \
        --config.batch_size=8 --config.total_steps=4 --config.model.dtype=float32
"""

from dfm_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.total_steps = 500_000
    config.batch_size = 256
    config.log_every = 100
    config.checkpoint_every = 5_000
    config.sample_every = 25_000
    config.mesh.data = 1
    config.mesh.fsdp = -1  # parameters and optimizer state sharded over all devices

    config.data.source = "array_record"
    config.data.dir = ""  # the directory written by dfm_jax.prepare (required)
    config.data.num_classes = 1000
    config.data.resolution = 64  # latent size; used by the synthetic source only
    config.data.channels = 16
    config.data.worker_count = 4

    # Decodes sample grids and evaluation samples (and names the encoder for prepare).
    config.autoencoder.name = "flux-ae"
    config.autoencoder.weights = ""  # FLUX.1-dev vae/diffusion_pytorch_model.safetensors
    config.autoencoder.dtype = "bfloat16"

    config.pyramid.kind = "laplacian"
    config.pyramid.ratios = (2,)
    config.pyramid.standardize = False  # off was better with the FLUX AE (FID 27.13 vs 29.56)
    config.objective.stage_probs = (0.9, 0.1)

    config.model.size = "XL"
    config.model.patch_sizes = (1, 2)
    config.model.positions = "rope"
    config.model.dtype = "bfloat16"

    config.sampling.steps_per_stage = (30, 10)
    config.sampling.thresholds = (0.7,)
    config.sampling.cfg_scale = 1.5
    config.sampling.grid_classes = 8
    config.sampling.samples_per_class = 8
    config.sampling.preview_examples = 8

    # `python -m dfm_jax.eval` computes these; pass the weight and reference files with
    # --inception_weights/--dinov2_weights/--reference (or --config.evals.quality.*).
    config.evals.quality = config_lib.evaluator(metrics=("fid", "fdd", "is"), num_samples=50_000)
    return config

"""DFM on Kinetics-700 at 512 px in CogVideoX latent space (paper, spec sections 5-6).

Clips of 17 frames (8 fps: a stride of 3 on Kinetics' ~25-30 fps videos, about 2 s)
at 512x512, encoded by the CogVideoX autoencoder (/8 in space, /4 in time, 16
channels) into 5 x 64 x 64 x 16 latents by ``python -m dfm_jax.prepare
--source=kinetics``. The paper fixes the autoencoder, resolution, decomposition,
p_q, batch and steps; it does not state the clip length or frame rate, so 17 frames
(1 + 4k, what the causal autoencoder compresses without padding) at 8 fps are this
config's documented choice: change ``--frames`` / ``--fps`` of prepare (and
``data.frames`` below) together.

Two scales 32 -> 64 per latent frame (Laplacian, x2, frames decomposed independently)
with patches 1 and 2: a 32x32 token grid per latent frame, 5120 tokens per clip with
3-D RoPE; per-scale standardisation on (the spec: video runs use it; the stds come
from the prepared dataset's metadata). DiT-XL; batch 256; AdamW (0.9, 0.99), wd 0.01,
lr 1e-4 with 10k warm-up, clip 1.0, EMA 0.9999; p_q = (0.9, 0.1); 200k steps.
Sampling [30, 10] with tau 0.7, as for ImageNet 512.

Smoke test without data or accelerator (synthetic 5 x 16 x 16 x 16 latents, tiny DiT):

    python -m dfm_jax.main --config=configs/kinetics512.py --workdir=/tmp/k512 \
        --config.data.source=synthetic --config.data.resolution=16 \
        --config.pyramid.stds='(1.0, 1.0)' --config.model.size=S --config.model.depth=2 \
        --config.batch_size=8 --config.total_steps=4 --config.model.dtype=float32

(sample grids are skipped until ``--config.autoencoder.weights`` names the CogVideoX VAE).
"""

from dfm_jax import config as config_lib

#: Frames per training clip (pixels) and the latent frames the autoencoder makes of them.
PIXEL_FRAMES = 17
LATENT_FRAMES = 1 + (PIXEL_FRAMES - 1) // 4


def get_config():
    config = config_lib.base_config()
    config.total_steps = 200_000
    config.batch_size = 256
    config.log_every = 100
    config.checkpoint_every = 5_000
    config.sample_every = 25_000
    config.mesh.data = 1
    config.mesh.fsdp = -1  # parameters and optimizer state sharded over all devices

    config.data.source = "array_record"
    config.data.dir = ""  # the directory written by dfm_jax.prepare --source=kinetics
    config.data.num_classes = 700
    config.data.frames = LATENT_FRAMES  # latent frames; used by the synthetic source only
    config.data.resolution = 64  # latent size; used by the synthetic source only
    config.data.channels = 16
    config.data.worker_count = 4

    config.autoencoder.name = "cogvideox-2b"
    config.autoencoder.weights = ""  # CogVideoX-2b vae/diffusion_pytorch_model.safetensors
    config.autoencoder.dtype = "bfloat16"

    config.pyramid.kind = "laplacian"
    config.pyramid.ratios = (2,)
    config.pyramid.standardize = True  # video runs standardise each scale (spec section 6)
    config.objective.stage_probs = (0.9, 0.1)

    config.model.size = "XL"
    config.model.patch_sizes = (1, 2)
    config.model.positions = "rope"  # 3-D RoPE over (frame, row, column)
    config.model.dtype = "bfloat16"
    config.model.remat = True  # 5120 tokens per clip

    config.sampling.steps_per_stage = (30, 10)
    config.sampling.thresholds = (0.7,)
    config.sampling.cfg_scale = 1.5
    config.sampling.grid_classes = 4
    config.sampling.samples_per_class = 4
    config.sampling.preview_examples = 4

    # `python -m dfm_jax.eval`: FVD and per-frame FID / FDD on 10k samples (spec section 5).
    config.evals.quality = config_lib.evaluator(metrics=("fid", "fdd"), num_samples=10_000)
    return config

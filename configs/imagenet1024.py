"""DFM on ImageNet 1024 px in FLUX-autoencoder latent space (paper, spec section 5).

128x128x16 latents; two scales 32 -> 128 (x4) with patches 1 and 4 (a 32x32
token grid); DiT-XL; 350k steps on 16 accelerators; otherwise as
``imagenet512.py``. Sampling [30, 10], tau 0.95.
"""

from configs import imagenet512


def get_config():
    config = imagenet512.get_config()
    config.total_steps = 350_000
    config.data.resolution = 128
    config.pyramid.ratios = (4,)
    config.model.patch_sizes = (1, 4)
    config.sampling.thresholds = (0.95,)
    config.autoencoder.decode_tile = 64  # decode 1024 px images as overlapping 512 px tiles
    return config

"""Pyramidal Flow baseline of ``imagenet512.py`` at equal training compute (spec section 5).

Two stages 32 -> 64 (x2) on the 64x64x16 FLUX latents, one single-scale DiT-XL/2 run at
both resolutions (a 16x16 token grid at stage 1, 32x32 at stage 2), gamma = 1/3, equal
stage windows (boundary t = 1/2); sampling 20 + 20 Euler steps (equal steps per stage, the
same 40 as the DFM config), cfg 1.5. The batch (256) is split evenly between the two
stages; a step costs the mean of the two stages' forward passes, so ``total_steps`` is the
DFM config's 500k scaled by the FLOPs ratio (``config_lib.pyramidal_twin``), giving the
same training FLOPs. Three stages (16 -> 32 -> 64): ``pyramidal_twin(config, (2, 2))``.
"""

from configs import imagenet512
from dfm_jax import config as config_lib


def get_config():
    return config_lib.pyramidal_twin(imagenet512.get_config(), ratios=(2,))

"""Cascaded baseline of ``imagenet512.py`` at equal training compute (spec section 5).

Two separate DiT-XL models trained in one run (one state, one checkpoint): stage 1 with
patch 1 on the 32x32x16 coarse latents (bilinear down x2), stage 2 with patch 2 on the
64x64x16 latents, conditioned on the upsampled stage-1 image through its own patch embedder
(summed with the image tokens, see ``dfm_jax.method.cascaded``). Conditioning noise
augmentation t_c ~ LogitNormal(1.5, 1) in training, noise level 0.025 at inference;
sampling 20 + 20 Euler steps, cfg 1.5 in each stage. Each batch of 256 is split evenly
between the stages (``cascaded.stage1_fraction = 0.5``), and ``total_steps`` is the DFM
config's 500k scaled by the ratio of forward FLOPs per example
(``config_lib.cascaded_twin``), giving the same training FLOPs.
"""

from configs import imagenet512
from dfm_jax import config as config_lib


def get_config():
    return config_lib.cascaded_twin(imagenet512.get_config())

"""Flow Matching baseline of ``kinetics512.py`` at equal compute.

One scale (S = 1, p_q = (1,)) at 5 x 64 x 64 x 16 latents with patch 2: the same
32x32 token grid per latent frame, backbone, batch, optimizer and steps as the DFM
config; sampling uses the same 40 network evaluations (``config_lib.flow_matching_twin``).
"""

from configs import kinetics512
from dfm_jax import config as config_lib


def get_config():
    return config_lib.flow_matching_twin(kinetics512.get_config())

"""Flow Matching baseline of ``imagenet1024.py``: one scale at 128x128x16, patch 4."""

from configs import imagenet1024
from dfm_jax import config as config_lib


def get_config():
    return config_lib.flow_matching_twin(imagenet1024.get_config())

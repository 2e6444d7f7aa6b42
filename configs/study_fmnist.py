"""DFM vs Flow Matching on Fashion-MNIST 32x32 pixels: the small-scale study (issue 6).

    python -m dfm_jax.main --config=configs/study_fmnist.py:dfm --workdir=workdir/study/dfm_s0
    python -m dfm_jax.main --config=configs/study_fmnist.py:fm --workdir=workdir/study/fm_s0

``dfm``: two scales 16 -> 32 (Laplacian, x2) with patches 2 and 4, p_q = (0.9, 0.1),
earlier-stage location 1.5, 40 sampling steps as 30 + 10 with tau = 0.9 (paper defaults,
scaled down). ``fm``: its Flow Matching twin (``config_lib.flow_matching_twin``): one scale,
patch 4, the same 8x8 token grid, backbone, batch, optimizer, steps and 40-step sampler.
Ablations override fields (``--config.objective.stage_probs=(0.8,0.2)``, ...); the study
script ``experiments/fmnist_dfm_vs_fm.py`` runs them all.
"""

from configs import demo
from dfm_jax import config as config_lib

VARIANTS = ("dfm", "fm")


def get_config(variant: str = "dfm"):
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown study variant {variant!r}; use configs/study_fmnist.py:dfm or :fm"
        )
    config = demo.get_config()
    config.total_steps = 2_000
    config.checkpoint_every = 400
    config.keep_checkpoints = 100  # every checkpoint is evaluated
    config.sample_every = 2_000
    config.log_every = 200
    # The study script evaluates every checkpoint with `python -m dfm_jax.eval` (cfg 1.0
    # and 1.5); no evaluation during training.
    config.evals.fd_fmnist.every = 0
    return config if variant == "dfm" else config_lib.flow_matching_twin(config)

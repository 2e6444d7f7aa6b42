"""DFM vs Flow Matching on Fashion-MNIST 32x32 pixels: the small-scale study (issue 6).

    python -m dfm_jax.main --config=configs/study_fmnist.py:dfm --workdir=workdir/study/dfm_s0
    python -m dfm_jax.main --config=configs/study_fmnist.py:fm --workdir=workdir/study/fm_s0
    python -m dfm_jax.main --config=configs/study_fmnist.py:pyramidal --workdir=workdir/study/pyr_s0
    python -m dfm_jax.main --config=configs/study_fmnist.py:cascaded --workdir=workdir/study/cas_s0

``dfm``: two scales 16 -> 32 (Laplacian, x2) with patches 2 and 4, p_q = (0.9, 0.1),
earlier-stage location 1.5, 40 sampling steps as 30 + 10 with tau = 0.9 (paper defaults,
scaled down). ``fm``: its Flow Matching twin (``config_lib.flow_matching_twin``): one scale,
patch 4, the same 8x8 token grid, backbone, batch, optimizer, steps and 40-step sampler.
``pyramidal``: Pyramidal Flow (``config_lib.pyramidal_twin``): stages 16 -> 32, one DiT with
patch 4 (4x4 then 8x8 tokens), the same backbone, batch and optimizer, 20 + 20 sampling
steps; the batch is split evenly over the two stages, and ``total_steps`` is scaled by the
ratio of forward FLOPs per example so that its training FLOPs equal the DFM run's.
``cascaded``: the Cascaded baseline (``config_lib.cascaded_twin``): a stage-1 DiT (patch 2)
on 16x16 images and a stage-2 DiT (patch 4) on 32x32 conditioned on the upsampled stage-1
image, both of the same size as DFM's, each batch split evenly between them, 20 + 20
sampling steps, ``total_steps`` scaled to equal training FLOPs as for ``pyramidal``.
Ablations override fields (``--config.objective.stage_probs=(0.8,0.2)``, ...); the study
script ``experiments/fmnist_study.py`` runs them all.
"""

from configs import demo
from dfm_jax import config as config_lib

VARIANTS = ("dfm", "fm", "pyramidal", "cascaded")


def get_config(variant: str = "dfm"):
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown study variant {variant!r}; use configs/study_fmnist.py:dfm, :fm, "
            ":pyramidal or :cascaded"
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
    if variant == "pyramidal":
        return config_lib.pyramidal_twin(config, ratios=(2,))
    if variant == "cascaded":
        return config_lib.cascaded_twin(config)
    return config if variant == "dfm" else config_lib.flow_matching_twin(config)

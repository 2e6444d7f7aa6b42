"""Test setup: an 8-device CPU mesh, the tests' XLA flags and float32 matmuls.

XLA_FLAGS must be set before JAX is imported anywhere, so this module sets it
at import time (``xla_flags.py`` says which flags and why); pytest imports
conftest.py before any test module.
"""

import os

from xla_flags import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

#: The slowest test files, slowest first (their time in a `make test` run, 2026-12-02:
#: test_faults 53 s down to test_dinov2 10 s; the rest take under 9 s each). Two
#: pytest-xdist workers take whole files in collection order (`make test` passes
#: --no-loadscope-reorder), so starting the long files first keeps both busy to the end
#: instead of leaving one idle while the other finishes a long file picked up last.
SLOWEST_FIRST = (
    "test_faults.py",
    "test_console.py",
    "test_fvd_fmnist.py",
    "test_eval.py",
    "test_video_pipeline.py",
    "test_multiprocess.py",
    "test_autoencoder.py",
    "test_latent_pipeline.py",
    "test_prepare.py",
    "test_i3d.py",
    "test_train_paths.py",
    "test_dit.py",
    "test_cogvideox.py",
    "test_eval_paths.py",
    "test_train_cli.py",
    "test_data.py",
    "test_flow.py",
    "test_sampling.py",
    "test_inception.py",
    "test_dinov2.py",
)


def pytest_collection_modifyitems(items):
    """Puts the files of ``SLOWEST_FIRST`` first, in that order; the rest keep theirs."""
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

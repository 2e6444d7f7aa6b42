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

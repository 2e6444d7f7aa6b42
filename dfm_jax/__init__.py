"""dfm_jax: Decomposable Flow Matching (Haji-Ali et al., NeurIPS 2025) in JAX/Flax."""

__version__ = "0.1.0"

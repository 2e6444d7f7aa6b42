"""Class-conditional generation with a DFM-DiT: noise -> staged sampler -> recomposed images.

Shared by the trainer's periodic sample grids and by evaluation. The returned
function is jitted once per batch size; parameters are a traced argument, so
the same compiled program serves every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dfm_jax.method import sampling
from dfm_jax.method.pyramid import Decomposition

Array = jax.Array


def make_generate_fn(
    model: nn.Module,
    decomposition: Decomposition,
    example_shape: Sequence[int],
    sampling_config: ml_collections.ConfigDict,
    null_label: int,
    *,
    return_previews: bool = False,
) -> Callable[..., tuple[Array, list[Array]] | Array]:
    """A jitted ``generate(params, key, labels)`` -> images ``(B, *example_shape)``.

    With ``return_previews`` it returns ``(images, previews)``, ``previews[k]``
    the recomposed prediction of stage k + 1 at its own resolution (the last is
    the final sample). Noise for every scale comes from ``key``.

    Args:
      model: the DiT module.
      decomposition: the pyramid the model was trained with.
      example_shape: one example's shape, ``(H, W, C)`` or ``(T, H, W, C)``.
      sampling_config: ``steps_per_stage``, ``thresholds``, ``solver``,
        ``cfg_scale``, ``guidance_interval`` (see ``dfm_jax.method.sampling.sample``).
      null_label: the null class id (``num_classes``).
    """
    options = dict(
        steps_per_stage=tuple(sampling_config.steps_per_stage),
        thresholds=tuple(sampling_config.thresholds),
        solver=sampling_config.solver,
        cfg_scale=float(sampling_config.cfg_scale),
        guidance_interval=tuple(sampling_config.guidance_interval),
        null_label=null_label,
    )

    @jax.jit
    def generate(params, key: Array, labels: Array):
        shapes = decomposition.scale_shapes((labels.shape[0], *example_shape))
        noise = sampling.initial_noise(key, shapes)

        def velocity_fn(scales, t, mask, y):
            return model.apply({"params": params}, scales, t, mask, y)

        if not return_previews:
            scales = sampling.sample(velocity_fn, noise, labels, **options)
            return decomposition.recompose(scales)
        scales, previews = sampling.sample(
            velocity_fn, noise, labels, pyramid=decomposition, return_previews=True, **options
        )
        return decomposition.recompose(scales), previews

    return generate


def grid_labels(num_classes: int, rows: int, per_row: int) -> Array:
    """Labels for a class grid: row r is class ``r % num_classes``, ``per_row`` times."""
    return jnp.repeat(jnp.arange(rows, dtype=jnp.int32) % num_classes, per_row)

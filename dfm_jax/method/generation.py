"""Class-conditional generation as one jitted program: noise -> method's sampler -> samples.

Shared by the trainer's sample grids and by evaluation. ``make_generate_fn`` jits a
method's ``generate`` for one sampler setting; parameters are a traced argument, so the
same compiled program serves every checkpoint (closing over concrete parameters would
bake them into the program as constants).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from dfm_jax.method import sampling
from dfm_jax.method.methods import Method

Array = jax.Array


def make_generate_fn(
    method: Method, sampler: sampling.SamplerSettings, *, previews: bool = False
) -> Callable[..., Array | tuple[Array, list[Array]]]:
    """A jitted ``generate(params, key, labels)`` -> samples ``(B, *method.example_shape)``.

    With ``previews`` it returns ``(samples, previews)``: ``previews[k]`` the recomposed
    prediction of stage k + 1 at its own resolution, the last the final sample. Noise
    for every scale comes from ``key``; ``labels`` is ``(B,)`` int32.
    """

    @jax.jit
    def generate(params, key: Array, labels: Array):
        return method.generate(params, key, labels, sampler, previews=previews)

    return generate

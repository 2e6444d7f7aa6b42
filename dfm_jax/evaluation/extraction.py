"""Running feature extractors on the mesh: global batches in, process-local rows out.

``FeatureFunction`` jits every needed extractor into one program that takes a
batch-sharded uint8 image (or clip) batch and its sample ids and returns batch-sharded
features (plus the ids, under ``scores.IDS_KEY``), so that ``scores.local_rows``
can pair every feature row with its sample on the process that holds it. Image
networks on clips give ``(B, T, D)`` (one row per frame, see ``features``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dfm_jax import parallel
from dfm_jax.evaluation.features import FeatureExtractor
from dfm_jax.evaluation.scores import IDS_KEY, local_rows
from dfm_jax.utils import viz


class FeatureFunction:
    """The needed outputs of several extractors on one batch, as one jitted program.

    Args:
      extractors: name -> extractor.
      needed: extractor name -> the outputs to return (keys ``"<name>/<output>"``).
      mesh: the mesh; inputs and outputs are split over ``parallel.BATCH_AXES``,
        parameters replicated.
    """

    def __init__(
        self,
        extractors: Mapping[str, FeatureExtractor],
        needed: Mapping[str, set[str]],
        mesh: Mesh,
    ):
        missing = sorted(set(needed) - set(extractors))
        if missing:
            raise ValueError(f"no feature extractor for {missing}")
        for name, outputs in needed.items():
            unknown = sorted(set(outputs) - set(extractors[name].outputs))
            if unknown:
                raise ValueError(
                    f"extractor {name!r} has no outputs {unknown} (it has "
                    f"{sorted(extractors[name].outputs)})"
                )
        self.mesh = mesh
        self.extractors = {name: extractors[name] for name in needed}
        self.needed = {name: sorted(outputs) for name, outputs in needed.items()}
        self.sharding = parallel.batch_sharding(mesh, parallel.BATCH_AXES)
        replicated = parallel.replicated(mesh)
        self.params = {
            name: jax.device_put(extractor.params, replicated)
            for name, extractor in self.extractors.items()
        }

        def features(params, images, ids):
            x = viz.from_uint8(images)
            out = {IDS_KEY: ids}
            for name, extractor in self.extractors.items():
                result = extractor.features(params[name], x)
                for output in self.needed[name]:
                    out[f"{name}/{output}"] = result[output].astype(jnp.float32)
            return out

        self._jitted = jax.jit(
            features,
            in_shardings=(replicated, self.sharding, self.sharding),
            out_shardings=self.sharding,
        )

    def check_input(self, example_shape) -> None:
        for extractor in self.extractors.values():
            extractor.check_input(example_shape)

    def __call__(self, images: jax.Array, ids: jax.Array) -> dict[str, jax.Array]:
        """Batch-sharded outputs for a global uint8 batch and its int32 ids."""
        with jax.set_mesh(self.mesh):
            return self._jitted(self.params, images, ids)

    def local_rows(self, images: jax.Array, ids: jax.Array):
        """``scores.local_rows`` of this batch's features (blocks until computed)."""
        return local_rows(self(images, ids))

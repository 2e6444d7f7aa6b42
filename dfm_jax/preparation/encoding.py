"""Encoding uint8 image batches on a device mesh into the fields a latent record stores.

Every batch is padded to one fixed size (one compile), split over the mesh's batch axes,
encoded by the autoencoder with replicated parameters, and brought back to the host without
the padding. What is stored (`STORES`):

- "moments": the posterior's raw-space "mean" and "std" (training may draw a fresh latent per
  read, `ArrayRecordLatentSource(latent_sample=True)`);
- "mean": the posterior mean as "latent";
- "sample": one posterior sample as "latent", drawn with `fold_in(key(seed), record_id)`, so it
  does not depend on batching, sharding or resumption.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dfm_jax import parallel
from dfm_jax.data import latents
from dfm_jax.utils import viz

#: `--store` values.
STORES = ("moments", "mean", "sample")


def _storage_dtype(name: str):
    if name not in latents.LATENT_DTYPES:
        raise ValueError(f"storage dtype must be one of {latents.LATENT_DTYPES}, got {name!r}")
    return jnp.dtype(name)


class Encoder:
    """Jitted, batch-sharded `uint8 images -> stored latent fields`.

    Args:
      codec: a `dfm_jax.models.autoencoder.Codec` (a pytree: passed to the jitted function as
        an argument, so its parameters are inputs, not compiled-in constants).
      mesh: the devices; batches are split over `parallel.BATCH_AXES`, parameters replicated.
      batch_size: images per call; a multiple of the mesh's data-parallel size.
      store: one of STORES.
      dtype: storage dtype of the outputs (one of `latents.LATENT_DTYPES`).
      seed: seed of the "sample" draws.
    """

    def __init__(self, codec, mesh: Mesh, batch_size: int, store: str, dtype: str, seed: int = 0):
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {store!r}")
        shards = parallel.data_parallel_size(mesh)
        if batch_size < 1 or batch_size % shards:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of the {shards} devices "
                "it is split over"
            )
        self.batch_size = int(batch_size)
        self.store = store
        self.mesh = mesh
        self.sharding = parallel.batch_sharding(mesh, parallel.BATCH_AXES)
        replicated = parallel.replicated(mesh)
        self.codec = jax.device_put(codec, replicated)
        self._key = jax.random.key(seed)
        out_dtype = _storage_dtype(dtype)

        def encode(codec, images, ids, key):
            pixels = viz.from_uint8(images)
            mean, std = codec.encode_moments(pixels)
            if store == "moments":
                return {"mean": mean.astype(out_dtype), "std": std.astype(out_dtype)}
            if store == "mean":
                return {"latent": mean.astype(out_dtype)}

            def one(i, m, s):
                eps = jax.random.normal(jax.random.fold_in(key, i), m.shape, jnp.float32)
                return m + s * eps

            return {"latent": jax.vmap(one)(ids, mean, std).astype(out_dtype)}

        self._encode = jax.jit(
            encode,
            in_shardings=(replicated, self.sharding, self.sharding, replicated),
            out_shardings=self.sharding,
        )

    def submit(self, images: np.ndarray, ids: np.ndarray) -> tuple[dict[str, jax.Array], int]:
        """Starts encoding up to `batch_size` images (B, H, W, 3) uint8; returns a handle.

        `ids` (B,) are the records' ids (the "sample" draws' RNG streams). The computation
        runs asynchronously; `fetch` waits for it.
        """
        n = len(images)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} images, got {n}")
        # Padding rows (zero images, id 0) are encoded and dropped by `fetch`.
        host = parallel.pad_batch(
            {"image": images, "id": np.asarray(ids, np.uint32)}, self.batch_size
        )
        images, ids = (parallel.global_from_host(host[k], self.sharding) for k in ("image", "id"))
        with jax.set_mesh(self.mesh):
            return self._encode(self.codec, images, ids, self._key), n

    @staticmethod
    def fetch(handle: tuple[dict[str, jax.Array], int]) -> dict[str, np.ndarray]:
        """The host arrays of a submitted batch, padding removed."""
        outputs, n = handle
        return {name: np.asarray(value)[:n] for name, value in outputs.items()}

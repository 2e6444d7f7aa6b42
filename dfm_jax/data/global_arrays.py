"""Process-local numpy batches -> global jax.Arrays sharded along the batch axis."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _axes(data_axes: str | Sequence[str]) -> tuple[str, ...]:
    return (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> NamedSharding:
    """Sharding that splits dimension 0 over `data_axes` and replicates over the rest.

    E.g. data_axes=("data", "fsdp") on a ("data", "fsdp", "model") mesh: the batch is split
    over data x fsdp devices and every model-parallel group sees the same examples.
    """
    axes = _axes(data_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"data axes {missing} are not axes of the mesh {mesh.axis_names}")
    return NamedSharding(mesh, PartitionSpec(axes))


def make_global_batch(batch: Any, mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> Any:
    """Turns a pytree of process-local numpy arrays into global, batch-sharded jax.Arrays.

    Every process passes its own local batch (from its `make_dataset` shard); the global
    batch is their concatenation along dimension 0 in process order, of size
    local_batch * process_count, which must be divisible by the product of the data-axis
    sizes. Uses `jax.make_array_from_process_local_data`.
    """
    sharding = batch_sharding(mesh, data_axes)
    num_shards = math.prod(mesh.shape[a] for a in _axes(data_axes))
    process_count = jax.process_count()

    def to_global(local: Any) -> jax.Array:
        local = np.asarray(local)
        if local.ndim == 0:
            raise ValueError("batch leaves need a leading batch dimension, got a scalar")
        global_size = local.shape[0] * process_count
        if global_size % num_shards:
            raise ValueError(
                f"global batch {global_size} (local {local.shape[0]} x {process_count} "
                f"processes) is not divisible by the {num_shards} shards of mesh axes "
                f"{_axes(data_axes)}"
            )
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree.map(to_global, batch)

"""Device meshes, logical-axis sharding rules, global batches and multi-host start-up.

The model annotates parameters and activations with *logical* axis names
(``"batch"``, ``"embed"``, ``"mlp"``, ...; see ``dfm_jax.models.dit``). A rule
table, kept in the config, maps each logical name to mesh axes. The mesh has
three named axes:

* ``data``:  pure data parallelism (parameters replicated);
* ``fsdp``:  data parallelism with parameters and optimizer state sharded
  (ZeRO-3 style); the batch is split over ``data`` and ``fsdp`` together;
* ``model``: tensor parallelism of attention heads and MLP hidden units.

With the default rules a mesh ``{data: 8}`` is plain data parallelism and
``{fsdp: 8}`` shards every large weight matrix over 8 devices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. A name absent from the table is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("classes", None),
    ("freq", None),
)


def check_mesh_shape(mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    """The ``MESH_AXES`` sizes as given (-1 kept); raises ``ValueError`` for unknown axis
    names, more than one -1, or sizes that are neither positive nor -1."""
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = tuple(int(mesh_shape.get(axis, 1)) for axis in MESH_AXES)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(mesh_shape)}")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(mesh_shape)}")
    return sizes


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of the ``MESH_AXES`` for ``num_devices``; one size may be -1 (the rest).

    Raises:
      ValueError: unknown axis names, more than one -1, or sizes whose product is
        not the number of devices.
    """
    sizes = list(check_mesh_shape(mesh_shape))
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(mesh_shape)} cannot be filled with {num_devices} devices: "
                f"{num_devices} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {math.prod(sizes)} devices "
            f"but {num_devices} are available; use -1 for one axis to take the rest"
        )
    return tuple(sizes)


def create_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "model")`` (Auto axis types).

    Args:
      mesh_shape: axis name -> size, e.g. ``{"data": -1}`` or ``{"fsdp": 8}``.
      devices: defaults to all global devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_shape, len(devices))
    if devices[0].platform in ("tpu", "gpu"):
        # Topology-aware: neighbouring mesh coordinates share fast interconnect links.
        device_array = mesh_utils.create_device_mesh(sizes, devices)
    else:
        # CPU devices have no topology; take them in the given order.
        device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards, the product of the data-parallel axis sizes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree whose leaves may carry ``nn.Partitioned`` metadata.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(rule) for rule in rules))


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


#: The sample id of a padding row (real rows have ids >= 0).
PADDING_ID = -1


def pad_batch(
    arrays: Mapping[str, Any], size: int, *, first_id: int | None = None, id_key: str = "id"
) -> dict[str, np.ndarray]:
    """Pads host arrays of ``n <= size`` rows to a fixed batch of ``size`` rows.

    A fixed batch size keeps one compiled program for a ragged last batch. Every
    array ``(n, ...)`` (the same ``n``) becomes ``(size, ...)`` of its dtype, rows
    ``n:`` zero. With ``first_id``, ``batch[id_key]`` is added: int32 ``(size,)``
    sample ids ``first_id, ..., first_id + n - 1``, then ``PADDING_ID`` (-1) on
    the padding rows, so consumers can drop them (``ids >= 0``).

    Turn the result into global arrays with ``global_from_host`` when every
    process holds the same batch, or ``make_global_batch`` when each process
    holds its own local part.
    """
    arrays = {name: np.asarray(values) for name, values in arrays.items()}
    rows = {len(values) for values in arrays.values()}
    if len(rows) > 1 or (rows and max(rows) > size):
        raise ValueError(f"cannot pad arrays of {sorted(rows)} rows to one batch of {size}")
    count = rows.pop() if rows else 0
    padded = {}
    for name, values in arrays.items():
        if count == size:
            padded[name] = np.ascontiguousarray(values)
            continue
        padded[name] = np.zeros((size, *values.shape[1:]), values.dtype)
        padded[name][:count] = values
    if first_id is not None:
        if id_key in padded:
            raise ValueError(f"pad_batch got both first_id and an {id_key!r} array")
        ids = np.full(size, PADDING_ID, np.int32)
        ids[:count] = np.arange(first_id, first_id + count)
        padded[id_key] = ids
    return padded


def global_from_host(values: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array placed by ``sharding`` from a host array every process holds whole.

    Each process builds only its addressable shards (``jax.make_array_from_callback``);
    unlike ``make_global_batch``, the host array is the whole global value.
    """
    values = np.asarray(values)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def maybe_initialize_distributed() -> None:
    """Starts the JAX multi-controller runtime when launched as one of several processes.

    On Cloud TPU VMs, SLURM and GKE ``jax.distributed.initialize()`` discovers the
    coordinator itself; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. A single process does nothing.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = any(
        name in os.environ
        for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    )
    if explicit:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives through gloo (tests, laptops).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif cluster:
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "JAX distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )

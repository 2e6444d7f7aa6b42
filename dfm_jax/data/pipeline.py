"""Grain input pipelines: seeded shuffling, per-process sharding, epochs, batching.

    iterator = make_train_iterator(source, global_batch_size=256, seed=0)
    batch = next(iterator)        # {"image": (B_local, ...), "label": (B_local,)} numpy

The pipeline is Grain's dataset API::

    MapDataset.source(source)
      [shard]          process i of n takes the i-th of n equal contiguous slices
      .shuffle(seed)   a fresh permutation of the shard every epoch
      .repeat(epochs)  None = forever; batches run across epoch boundaries
      .map / .random_map (the source's `operations`, then yours)
      .batch(B_local)
      .to_iter_dataset()          reads with a thread pool
      .mp_prefetch(workers)       when worker_count > 0

Because batching happens before the work is split across worker processes (each worker
builds whole batches and the results are interleaved back in order), the batches do not
depend on `worker_count`. Per-example RNGs of random transforms (e.g. `SampleLatent`) are
seeded from (seed, process_index, transform position) and the example's position in the
stream, so they too are independent of workers, differ across processes and epochs, and
are reproduced exactly on resume.

Checkpointing: `iterator.get_state()` returns a JSON-serialisable dict and
`iterator.set_state(state)` restores it into a fresh iterator of the same pipeline, which
then continues with exactly the batches the uninterrupted one would have produced. With
Orbax, use Grain's handler args (each process writes its own
`process_<i>-of-<n>.json`)::

    manager.save(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator), ...))
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(iterator), ...))

A state restores only into a pipeline with the same source length, seed, shuffle,
process count, batch size and worker count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The per-process batch; ValueError unless `global_batch_size` divides evenly."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count < 1:
        raise ValueError(f"process_count must be positive, got {process_count}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the number of "
            f"processes {process_count}; choose a multiple of {process_count}"
        )
    return global_batch_size // process_count


def _derived_seed(*entropy: int) -> int:
    """A 32-bit seed derived from integers (so processes and transforms get distinct streams)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _apply(ds: grain.MapDataset, op: Any, seed: int) -> grain.MapDataset:
    if isinstance(op, grain.transforms.RandomMap):
        return ds.random_map(op, seed=seed)
    if isinstance(op, grain.transforms.Map) or callable(op):
        return ds.map(op)
    raise TypeError(
        f"unsupported operation {op!r}: pass grain.transforms.Map / RandomMap or a callable "
        "(filters and other many-to-one transforms would make batches depend on workers)"
    )


def _check_arguments(
    process_index: int, process_count: int, seed: Any, num_epochs: int | None, worker_count: int
) -> int:
    """Validates `make_dataset`'s process, seed, epoch and worker arguments; returns the seed."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        raise ValueError(
            "Grain workers (worker_count > 0) need absl flags parsed: run under absl.app.run, "
            "or call absl.flags.FLAGS.mark_as_parsed() first; or use worker_count=0"
        )
    return int(seed)


def _shard_size(
    num_records: int, process_count: int, batch: int, num_epochs: int | None, drop_remainder: bool
) -> int:
    """Records per process (the remainder is dropped); ValueError if no batch would come."""
    shard_size = num_records // process_count
    if shard_size < 1:
        raise ValueError(f"{num_records} examples cannot be split over {process_count} processes")
    if num_epochs is not None and drop_remainder and shard_size * num_epochs < batch:
        raise ValueError(
            f"{num_epochs} epoch(s) of {shard_size} examples per process yield no full batch "
            f"of {batch}; lower the batch size, add epochs, or set drop_remainder=False"
        )
    return shard_size


def make_dataset(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 8,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    operations: Sequence[Any] = (),
) -> grain.IterDataset:
    """A Grain IterDataset of process-local batches of `source`'s examples.

    Args:
      source: a random-access source (`len`, `[i]`); its `operations` attribute, if any
        (e.g. latent sampling), is applied to every example before `operations`.
      global_batch_size: batch size summed over all processes.
      seed: shuffling seed and base of the per-example RNGs; an integer in [0, 2**32).
      process_index: this process; default `jax.process_index()`.
      process_count: number of processes; default `jax.process_count()`. Each process reads
        a disjoint, equally sized contiguous slice of the records (the remainder of
        len(source) / process_count is dropped) and shuffles within it.
      worker_count: Grain worker processes; 0 runs in this process. Workers need absl flags
        parsed (absl.app.run does it) and a picklable source.
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads reading and transforming examples in each (worker) process.
      num_epochs: passes over the data; None repeats forever.
      shuffle: shuffle (a fresh permutation each epoch) or read in order.
      drop_remainder: drop the last incomplete batch (only matters with finite epochs).
      operations: extra per-example transforms (grain.transforms.Map / RandomMap or
        callables), applied before batching.

    Raises:
      ValueError: on an indivisible batch, a bad seed or process index, a finite pipeline
        that would yield no batch, or workers without parsed absl flags.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    batch = local_batch_size(global_batch_size, process_count)
    seed = _check_arguments(process_index, process_count, seed, num_epochs, worker_count)
    shard_size = _shard_size(len(source), process_count, batch, num_epochs, drop_remainder)

    ds = grain.MapDataset.source(source)
    start = process_index * shard_size
    ds = ds[start : start + shard_size]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    for position, op in enumerate([*getattr(source, "operations", ()), *operations]):
        ds = _apply(ds, op, _derived_seed(seed, process_index, position))
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
    if worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return iter_ds


def make_train_iterator(source: Any, **kwargs: Any) -> grain.DatasetIterator:
    """`iter(make_dataset(source, **kwargs))`: a checkpointable iterator of local batches."""
    return iter(make_dataset(source, **kwargs))

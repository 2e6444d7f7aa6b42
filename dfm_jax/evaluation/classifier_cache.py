"""What the demo metrics' classifiers share: batched inference and a checked cache entry.

FD-FMNIST (``fd_fmnist``) and FVD-FMNIST (``fvd_fmnist``) each train a small
classifier once and cache it under a stem ``<cache_dir>/<name>``:

* ``<stem>.msgpack``: the parameters (``flax.serialization``);
* ``<stem>_test_stats.npz``: the reference feature statistics (``RunningStatistics``);
* ``<stem>.json``: the record (test accuracy, settings, cache version) and the
  SHA-256 of the two files above; written last, so its presence marks a complete entry.

Every file is written atomically (``utils.files``). ``load_entry`` checks the
digests, so a truncated or altered file raises ``CorruptCacheError`` instead of
being used (records written before the digests existed are loaded unchecked).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.evaluation import metrics
from dfm_jax.utils import files

PARAMS_SUFFIX = ".msgpack"
STATS_SUFFIX = "_test_stats.npz"
RECORD_SUFFIX = ".json"


class CorruptCacheError(ValueError):
    """A cache entry that exists but cannot be trusted (unreadable, partial or altered)."""


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, inputs):
    """The classifier, compiled once per architecture and batch shape."""
    return model.apply(params, inputs)


def batched_apply(model, params, inputs: np.ndarray, batch_size: int = 1000) -> tuple:
    """Every output of ``model.apply(params, batch)`` over ``inputs``, concatenated on the host.

    The last partial batch is padded to the batch size (and the padding dropped), so
    one compiled shape, ``min(batch_size, len(inputs))``, serves any number of inputs.
    """
    size = max(1, min(batch_size, len(inputs)))
    chunks = []
    for start in range(0, len(inputs), size):
        batch = np.asarray(inputs[start : start + size])
        count = len(batch)
        if count < size:
            batch = np.concatenate([batch, np.zeros((size - count, *batch.shape[1:]), batch.dtype)])
        outputs = _apply(model, params, jnp.asarray(batch))
        chunks.append([np.asarray(out)[:count] for out in outputs])
    return tuple(np.concatenate(parts) for parts in zip(*chunks, strict=True))


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def save_entry(
    stem: str, params: Any, reference: metrics.RunningStatistics, record: dict[str, Any]
) -> None:
    """Writes the parameters, the statistics and then the record (with their digests)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    payload = flax.serialization.to_bytes(params)
    files.atomic_write_bytes(stem + PARAMS_SUFFIX, payload)
    reference.to_npz(stem + STATS_SUFFIX)
    with open(stem + STATS_SUFFIX, "rb") as f:
        stats_digest = _digest(f.read())
    record = {**record, "sha256": {PARAMS_SUFFIX: _digest(payload), STATS_SUFFIX: stats_digest}}
    files.atomic_write_bytes(stem + RECORD_SUFFIX, json.dumps(record, indent=2).encode())


def _read_checked(stem: str, suffix: str, digests: dict[str, str]) -> bytes:
    try:
        with open(stem + suffix, "rb") as f:
            payload = f.read()
    except OSError as e:
        raise CorruptCacheError(f"cache entry {stem}: cannot read {suffix} ({e})") from e
    if suffix in digests and _digest(payload) != digests[suffix]:
        raise CorruptCacheError(f"cache entry {stem}: {stem + suffix} does not match its digest")
    return payload


def load_entry(stem: str, template: Any) -> tuple[Any, metrics.RunningStatistics, dict]:
    """``(params, reference statistics, record)`` of the entry at ``stem``.

    Args:
      stem: the entry's path without suffix (its ``.json`` record must exist).
      template: a parameter pytree of the right structure and shapes (arrays or
        ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape(model.init, ...)``).

    Raises:
      CorruptCacheError: if a file is missing, unreadable or does not match its digest.
    """
    try:
        with open(stem + RECORD_SUFFIX) as f:
            record = json.load(f)
        digests = dict(record.get("sha256", {}))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise CorruptCacheError(f"cache entry {stem}: unreadable record ({e})") from e
    payload = _read_checked(stem, PARAMS_SUFFIX, digests)
    _read_checked(stem, STATS_SUFFIX, digests)
    try:
        params = flax.serialization.from_bytes(template, payload)
        reference = metrics.RunningStatistics.from_npz(stem + STATS_SUFFIX)
    except Exception as e:  # msgpack, zip and shape errors of a damaged entry
        raise CorruptCacheError(f"cache entry {stem}: cannot be decoded ({e})") from e
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
    if shapes != [tuple(leaf.shape) for leaf in jax.tree.leaves(template)]:
        raise CorruptCacheError(f"cache entry {stem}: parameter shapes differ from the model's")
    return params, reference, record

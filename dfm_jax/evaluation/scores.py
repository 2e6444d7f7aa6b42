"""Streaming metric accumulators fed with process-local feature rows.

The evaluation extracts features of each global batch on the mesh; every process
then takes the rows it holds (``local_rows``: one copy of each row, identified by
its global sample id, padding rows dropped) and feeds them to the accumulators.
``result()`` is a collective: it combines the partial results of all processes,
and every process gets the same numbers.

* ``FrechetScore``: ``metrics.RunningStatistics`` (float64, streaming) against
  reference ``mu``/``sigma`` -> FID, FDD, FVD, FD-FMNIST or FVD-FMNIST (per-frame
  features of clips count every frame, ``frame_rows``).
* ``InceptionScoreStream``: the Inception Score of ``metrics.inception_score`` (the
  original TF code's contiguous splits over the sample order), accumulated per split
  from ``sum_x p(y|x)`` and ``sum_x sum_y p log p``, so the logits are never kept.
* ``PrecisionRecallScore``: ``metrics.precision_recall`` (k-NN manifolds), which
  needs every generated feature vector: they are kept (float32) and gathered.
"""

from __future__ import annotations

import jax
import numpy as np
import scipy.special
from jax.experimental import multihost_utils

from dfm_jax.evaluation import metrics
from dfm_jax.evaluation.features import Metric

IDS_KEY = "_ids"


def local_rows(outputs: dict[str, jax.Array]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """This process's rows of batch-sharded outputs, one copy each, padding dropped.

    ``outputs[IDS_KEY]`` holds each row's sample id (negative for padding); every
    output must share its sharding (the evaluation's feature function makes them
    so). Returns ``(ids (n,), {name: (n, ...)})`` as numpy.
    """
    shards = {
        name: {shard.device: shard for shard in array.addressable_shards}
        for name, array in outputs.items()
    }
    ids, blocks = [], {name: [] for name in outputs if name != IDS_KEY}
    for shard in outputs[IDS_KEY].addressable_shards:
        if shard.replica_id != 0:
            continue
        shard_ids = np.asarray(shard.data)
        keep = shard_ids >= 0
        ids.append(shard_ids[keep])
        for name in blocks:
            blocks[name].append(np.asarray(shards[name][shard.device].data)[keep])
    if not ids:  # this process holds only replicas (e.g. a model axis spanning processes)
        ids = [np.zeros(0, np.int32)]
        for name in blocks:
            blocks[name] = [np.asarray(outputs[name].addressable_shards[0].data)[:0]]
    return np.concatenate(ids), {name: np.concatenate(b) for name, b in blocks.items()}


def frame_rows(features: np.ndarray) -> np.ndarray:
    """``(n, D)`` rows of a feature block: per-frame features ``(n, T, D)`` of clips
    (frame-FID / frame-FDD) give one row per frame, ``(n * T, D)``."""
    features = np.asarray(features)
    return features.reshape(-1, features.shape[-1])


def allgather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenates every process's float32 ``(n_p, D)`` rows in process order."""
    rows = np.asarray(rows, np.float32)
    if jax.process_count() == 1:
        return rows
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(rows)], np.int32)))
    counts = counts.reshape(-1)
    padded = np.zeros((int(counts.max()), *rows.shape[1:]), np.float32)
    padded[: len(rows)] = rows
    gathered = metrics.allgather_exact(padded)
    return np.concatenate([g[:n] for g, n in zip(gathered, counts, strict=True)])


class FrechetScore:
    """Frechet distance of streamed features to reference statistics."""

    def __init__(self, metric: Metric, mu: np.ndarray, sigma: np.ndarray):
        self.metric, self.mu, self.sigma = metric, mu, sigma
        self.stats = metrics.RunningStatistics(mu.shape[0])

    def update(self, ids: np.ndarray, features: np.ndarray) -> None:
        del ids
        self.stats.update(frame_rows(features))

    def result(self) -> dict[str, float]:
        total = metrics.gather_across_processes(self.stats)
        distance = metrics.frechet_distance(total.mean, total.covariance, self.mu, self.sigma)
        return {self.metric.columns[0]: distance}


class InceptionScoreStream:
    """``metrics.inception_score`` of ``num_samples`` logits streamed in any order.

    Sample id ``i`` belongs to split ``j`` iff ``j N // splits <= i < (j + 1) N //
    splits``, as in ``metrics.inception_score`` over the samples in id order.
    """

    def __init__(self, metric: Metric, num_samples: int, num_classes: int, splits: int = 10):
        if not 1 <= splits <= num_samples:
            raise ValueError(f"IS splits must be in [1, num_samples={num_samples}], got {splits}")
        self.metric, self.splits, self.num_samples = metric, splits, num_samples
        self.starts = np.arange(splits) * num_samples // splits
        self.counts = np.zeros(splits, np.float64)
        self.sum_probs = np.zeros((splits, num_classes), np.float64)
        self.sum_plogp = np.zeros(splits, np.float64)

    def update(self, ids: np.ndarray, logits: np.ndarray) -> None:
        logits = np.asarray(logits, np.float64)
        if not np.all(np.isfinite(logits)):
            raise ValueError("Inception logits contain NaN or infinite values")
        log_probs = scipy.special.log_softmax(logits, axis=1)
        probs = np.exp(log_probs)
        plogp = np.sum(np.where(probs > 0, probs * log_probs, 0.0), axis=1)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        np.add.at(self.counts, part, 1.0)
        np.add.at(self.sum_probs, part, probs)
        np.add.at(self.sum_plogp, part, plogp)

    def result(self) -> dict[str, float]:
        counts = metrics.allgather_exact(self.counts).sum(0)
        sum_probs = metrics.allgather_exact(self.sum_probs).sum(0)
        sum_plogp = metrics.allgather_exact(self.sum_plogp).sum(0)
        if np.any(counts == 0):
            raise ValueError(f"an IS split received no samples (counts {counts})")
        marginal = sum_probs / counts[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy_marginal = np.sum(
                np.where(marginal > 0, marginal * np.log(marginal), 0.0), axis=1
            )
        scores = np.exp(sum_plogp / counts - entropy_marginal)
        mean_key, std_key = self.metric.columns
        return {mean_key: float(np.mean(scores)), std_key: float(np.std(scores))}


class PrecisionRecallScore:
    """Improved precision/recall of the generated features against reference features."""

    def __init__(self, metric: Metric, reference_features: np.ndarray, k: int = 3):
        self.metric, self.reference, self.k = metric, reference_features, k
        self.rows: list[np.ndarray] = []

    def update(self, ids: np.ndarray, features: np.ndarray) -> None:
        del ids
        self.rows.append(frame_rows(features).astype(np.float32))

    def result(self) -> dict[str, float]:
        dim = self.reference.shape[1]
        local = np.concatenate(self.rows) if self.rows else np.zeros((0, dim), np.float32)
        fake = allgather_rows(local)
        precision, recall = metrics.precision_recall(self.reference, fake, k=self.k)
        precision_key, recall_key = self.metric.columns
        return {precision_key: precision, recall_key: recall}

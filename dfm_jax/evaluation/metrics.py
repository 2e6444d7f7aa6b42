"""Sample-quality metrics: Frechet distance, feature statistics, IS, precision/recall.

Everything here runs on the host in float64 numpy/scipy (DESIGN: "Frechet
statistics in float64"); the feature networks (InceptionV3 pool3 for FID,
DINOv2 for FDD) run elsewhere and hand their ``(N, D)`` features in.

- ``RunningStatistics`` accumulates the mean and the unbiased covariance of a
  stream of features, merges partial results (chunks, processes) and saves them
  as ``.npz`` with ``mu``, ``sigma`` and ``num_samples``, the keys of ADM
  reference batches.
- ``gather_across_processes`` combines the statistics of every JAX process;
  ``allgather_exact`` gathers any float64 / int64 array bit for bit.
- ``frechet_distance`` is the FID/FDD formula of pytorch-fid and ADM:
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``.
- ``inception_score`` follows the original TF code (Salimans et al. 2016).
- ``precision_recall`` is the k-NN manifold estimate of Kynkaanniemi et al. 2019.
- ``load_reference_statistics`` reads ``mu``/``sigma`` from our own ``.npz``
  files and from ADM reference batches (``VIRTUAL_imagenet512.npz``).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import jax
import numpy as np
import scipy.linalg
import scipy.special
from jax.experimental import multihost_utils

from dfm_jax.utils import files

STATISTICS_KEYS = ("mu", "sigma")
SPATIAL_STATISTICS_KEYS = ("mu_s", "sigma_s")


def _host_float64(features: Any) -> list[np.ndarray]:
    """Process-local rows of ``features`` as float64 numpy blocks, each ``(n_i, D)``.

    numpy arrays and fully addressable ``jax.Array`` s come back whole. A global
    ``jax.Array`` spanning several processes contributes the rows this process
    holds (one copy of each, from the shards with ``replica_id == 0``); it must be
    sharded along the batch axis only. Each row then lives in exactly one process,
    so ``gather_across_processes`` afterwards counts every row once.
    """
    if isinstance(features, jax.Array) and not features.is_fully_addressable:
        blocks = []
        for shard in features.addressable_shards:
            if shard.replica_id != 0:
                continue
            if features.ndim == 2 and shard.data.shape[1] != features.shape[1]:
                raise ValueError(
                    f"features {features.shape} are sharded along the feature axis "
                    f"(shard {shard.data.shape}); shard them along the batch axis only"
                )
            blocks.append(np.asarray(shard.data, dtype=np.float64))
        return blocks
    return [np.asarray(features, dtype=np.float64)]


class RunningStatistics:
    """Streaming mean and covariance of ``D``-dimensional features, in float64.

    Holds ``count``, the running ``mean`` and ``m2``, the sum of outer products
    of the deviations from the mean. Chunks and partial results are combined
    with the pairwise update of Chan, Golub and LeVeque (1979)::

        n = n_a + n_b,  delta = mean_b - mean_a,
        mean = mean_a + delta * n_b / n,
        m2 = m2_a + m2_b + outer(delta, delta) * n_a * n_b / n.

    The result is the same for any chunking or merge order up to float64
    rounding, and unlike accumulating raw sums ``sum x x^T`` it does not cancel
    catastrophically when the features' mean is large against their spread.

    Args:
      dim: the feature dimension D (2048 for Inception pool3).
    """

    def __init__(self, dim: int):
        if int(dim) < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self._count = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)

    @property
    def count(self) -> int:
        """The number of feature vectors seen."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        """``(D,)`` float64 mean (``mu``)."""
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """``(D, D)`` float64 unbiased covariance (``sigma``, divided by N - 1).

        This is ``np.cov(features, rowvar=False)``, as in pytorch-fid and ADM.
        """
        if self._count < 2:
            raise ValueError(f"the covariance needs at least 2 samples, have {self._count}")
        return self._m2 / (self._count - 1)

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merges the statistics of another set of ``count`` samples into these."""
        if count == 0:
            return
        if self._count == 0:
            self._count, self._mean, self._m2 = count, mean.copy(), m2.copy()
            return
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self._count * count / total)
        self._count = total

    def update(self, features: Any) -> RunningStatistics:
        """Adds a chunk of features, ``(N, D)`` numpy or jax array of any float dtype.

        The chunk is converted to float64 on the host; a multi-process global
        ``jax.Array`` contributes the rows this process holds (see
        ``gather_across_processes``). Returns ``self``.
        """
        for block in _host_float64(features):
            if block.ndim != 2 or block.shape[1] != self.dim:
                raise ValueError(f"features must be (N, {self.dim}), got shape {block.shape}")
            if block.shape[0] == 0:
                continue
            if not np.all(np.isfinite(block)):
                raise ValueError("features contain NaN or infinite values")
            mean = block.mean(axis=0)
            centred = block - mean
            self._combine(block.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: RunningStatistics) -> RunningStatistics:
        """Adds the samples summarised by ``other`` (same ``dim``). Returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self._combine(other._count, other._mean, other._m2)
        return self

    def to_npz(self, path: str | os.PathLike) -> None:
        """Writes ``mu``, ``sigma`` and ``num_samples`` to ``path`` atomically.

        ``files.atomic_write_bytes`` writes it under a temporary name and renames it
        into place, so readers never see a partial file. ``sigma`` is all NaN for
        fewer than 2 samples. ``from_npz`` resumes from it exactly up to float64
        rounding (``m2 = sigma * (N - 1)``).
        """
        sigma = self.covariance if self._count >= 2 else np.full_like(self._m2, np.nan)
        buffer = io.BytesIO()
        np.savez(buffer, mu=self._mean, sigma=sigma, num_samples=np.int64(self._count))
        files.atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> RunningStatistics:
        """Reads a file written by ``to_npz`` (needs ``mu``, ``sigma``, ``num_samples``)."""
        with _open_npz(path) as data:
            missing = [k for k in ("mu", "sigma", "num_samples") if k not in data.files]
            if missing:
                raise ValueError(
                    f"{os.fspath(path)} lacks {missing} (keys: {sorted(data.files)}); "
                    "RunningStatistics.from_npz needs mu, sigma and num_samples as written "
                    "by to_npz. For reference statistics without a sample count use "
                    "load_reference_statistics."
                )
            mu = np.asarray(data["mu"], np.float64)
            sigma = np.asarray(data["sigma"], np.float64)
            count = int(data["num_samples"])
        _check_statistics(mu, sigma, "")
        stats = cls(mu.shape[0])
        if count > 0:
            m2 = sigma * (count - 1) if count >= 2 else np.zeros_like(sigma)
            stats._combine(count, mu, m2)
        return stats

    def __repr__(self) -> str:
        return f"RunningStatistics(dim={self.dim}, count={self._count})"


def allgather_exact(x: np.ndarray) -> np.ndarray:
    """``(process_count, *x.shape)``: ``x`` of every process in process order, bit for bit.

    A collective: call it on every process, with the same shape and dtype. The
    array travels as its raw bytes viewed as uint32 (with 64-bit types disabled JAX
    would round float64 to float32 and int64 to int32), so its item size must be a
    multiple of 4 bytes. With one process it returns a copy of ``x[None]``.
    """
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None].copy()
    gathered = np.asarray(multihost_utils.process_allgather(x.view(np.uint32)))
    return np.ascontiguousarray(gathered).view(x.dtype).reshape(-1, *x.shape)


def gather_across_processes(stats: RunningStatistics) -> RunningStatistics:
    """Combines the statistics of all JAX processes; every process gets the total.

    Call it on every process (it is a collective). Each process's ``count``,
    ``mean`` and ``m2`` go through ``allgather_exact`` (bit-exact float64) and are
    merged in process order, so all processes compute bitwise the same result.
    With one process it returns an equal copy of ``stats``.
    """
    if jax.process_count() > 1:
        dims = multihost_utils.process_allgather(np.asarray([stats.dim], np.int32))
        if np.any(dims != stats.dim):
            raise ValueError(f"processes hold statistics of different dims {dims.ravel()}")
    counts = allgather_exact(np.asarray([stats.count], np.int64))
    means, m2s = allgather_exact(stats._mean), allgather_exact(stats._m2)
    total = RunningStatistics(stats.dim)
    for count, mean, m2 in zip(counts, means, m2s, strict=True):
        total._combine(int(count[0]), mean, m2)
    return total


def _open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """Opens an ``.npz`` archive lazily, without pickle; rejects a lone ``.npy`` array."""
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{os.fspath(path)} holds a single array, not an .npz archive")
    return data


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    """Raises ``ValueError`` unless ``mu`` is ``(D,)`` and ``sigma`` is ``(D, D)``."""
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector (D,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{name} must be ({mu.shape[0]}, {mu.shape[0]}) to match mu{name} "
            f"{mu.shape}, got shape {sigma.shape}"
        )


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``,
    computed as pytorch-fid's ``calculate_frechet_distance`` and ADM's evaluator:
    if ``scipy.linalg.sqrtm`` of the product is not finite (a near-singular
    product), ``eps * I`` is added to both covariances and it is retried (with a
    warning); a negligible imaginary part (diagonal within 1e-3 of 0) from
    rounding is dropped, a larger one raises ``ValueError``.

    Args:
      mu1, mu2: ``(D,)`` means (scalars for D = 1).
      sigma1, sigma2: ``(D, D)`` covariances (scalar variances for D = 1).
      eps: the diagonal offset of the retry.

    Returns:
      The distance as a Python float (FID when the features are Inception pool3,
      FDD when they are DINOv2).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_statistics(mu1, sigma1, "1")
    _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape} have different dimensions")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinite values")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(
            f"sqrtm(sigma1 @ sigma2) is not finite (singular product); adding {eps} to the "
            "diagonal of both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                "sqrtm(sigma1 @ sigma2) has a non-negligible imaginary component, max |imag| "
                f"= {np.max(np.abs(covmean.imag)):.3g}; are the covariances symmetric PSD?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` without its singular-matrix warning: a (near-)singular
    product is common with few samples, and the caller checks the result instead (as
    pytorch-fid does with ``disp=False``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def inception_score(
    predictions: Any, splits: int = 10, from_logits: bool = True
) -> tuple[float, float]:
    """Inception Score: ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over splits.

    The convention of the original TF code (Salimans et al. 2016), which
    torch-fidelity reproduces: the N samples are cut, in the given order, into
    ``splits`` contiguous parts ``[i N // splits, (i + 1) N // splits)``; in each
    part ``p(y)`` is the mean of the part's ``p(y|x)`` and the score is
    ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))``. Returns the mean and
    the population std (``np.std``, ddof 0, as the TF code) of the per-split
    scores. Differences from torch-fidelity: it shuffles the samples first and
    reports the ddof-1 std; shuffle beforehand to match it. For Inception-v3
    scores use the 1008-way logits of the TF graph (or torch-fidelity's), as in
    the literature.

    Args:
      predictions: ``(N, K)`` class logits (``from_logits=True``; softmax taken
        in float64) or probabilities (``from_logits=False``; rows must be
        non-negative and sum to 1 within 1e-3, then renormalised). ``0 log 0 = 0``.
      splits: the number of parts, ``1 <= splits <= N``.
      from_logits: how to read ``predictions``.

    Returns:
      ``(mean, std)`` as Python floats; 1 for uniform predictions and K for
      confident predictions spread evenly over K classes in every part.
    """
    predictions = np.asarray(predictions, np.float64)
    if predictions.ndim != 2 or predictions.shape[1] < 1:
        raise ValueError(f"predictions must be (N, K), got shape {predictions.shape}")
    num = predictions.shape[0]
    if not 1 <= splits <= num:
        raise ValueError(f"splits must be in [1, N={num}], got {splits}")
    if from_logits:
        if not np.all(np.isfinite(predictions)):
            raise ValueError("logits contain NaN or infinite values")
        log_probs = scipy.special.log_softmax(predictions, axis=1)
        probs = np.exp(log_probs)
    else:
        if np.any(predictions < 0) or not np.all(np.isfinite(predictions)):
            raise ValueError("probabilities must be finite and non-negative")
        sums = predictions.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            worst = sums[np.argmax(np.abs(sums - 1))]
            raise ValueError(
                f"probability rows must sum to 1 (one sums to {worst:.6g}); "
                "pass logits with from_logits=True"
            )
        probs = predictions / sums[:, None]
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs)
    scores = []
    for i in range(splits):
        part = slice(i * num // splits, (i + 1) * num // splits)
        p, log_p = probs[part], log_probs[part]
        marginal = p.mean(axis=0)
        with np.errstate(divide="ignore"):
            log_marginal = np.log(marginal)
        # p(y|x) > 0 implies p(y) > 0; skipping p == 0 leaves no 0 * (-inf) terms.
        log_ratio = np.subtract(log_p, log_marginal[None, :], out=np.zeros_like(p), where=p > 0)
        kl = (p * log_ratio).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x, x)


def _squared_distances(
    a: np.ndarray, a_norms: np.ndarray, b: np.ndarray, b_norms: np.ndarray
) -> np.ndarray:
    """``(len(a), len(b))`` squared Euclidean distances, clamped at 0, float64."""
    return np.maximum(a_norms[:, None] - 2.0 * (a @ b.T) + b_norms[None, :], 0.0)


def knn_radii(features: np.ndarray, k: int = 3, batch_size: int = 512) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row, ``(N,)`` float64.

    Each point's own zero distance is sorted first, so this is entry ``k`` of the
    sorted row of distances (the NVlabs ``ManifoldEstimator`` convention; exact
    duplicates of a point count as neighbours at distance 0).
    """
    features = np.asarray(features, np.float64)
    num = features.shape[0]
    if not 1 <= k < num:
        raise ValueError(f"k must be in [1, N - 1 = {num - 1}], got {k}")
    norms = _squared_norms(features)
    radii = np.empty(num, np.float64)
    for start in range(0, num, batch_size):
        rows = slice(start, start + batch_size)
        dist = _squared_distances(features[rows], norms[rows], features, norms)
        radii[rows] = np.partition(dist, k, axis=1)[:, k]
    return radii


def _fraction_in_manifold(
    queries: np.ndarray, support: np.ndarray, radii: np.ndarray, batch_size: int
) -> float:
    """Fraction of ``queries`` within ``radii`` (squared) of some ``support`` point."""
    support_norms = _squared_norms(support)
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        block = queries[start : start + batch_size]
        dist = _squared_distances(block, _squared_norms(block), support, support_norms)
        inside += int(np.count_nonzero(np.any(dist <= radii[None, :], axis=1)))
    return inside / queries.shape[0]


def precision_recall(
    real_features: Any, fake_features: Any, k: int = 3, batch_size: int = 512
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the
    distance to the point's k-th nearest neighbour in the same set. Precision is
    the fraction of fake samples inside the real manifold, recall the fraction of
    real samples inside the fake manifold (a point on a ball's boundary counts as
    inside, as in the NVlabs code and ADM's evaluator).

    Distances are computed in numpy float64 as ``|a|^2 - 2 a.b + |b|^2``
    (clamped at 0) in blocks of ``batch_size`` rows against the whole other set,
    so peak memory is ``batch_size * N * 8`` bytes and the cost ``O(N^2 D)``:
    float64 keeps the comparison against the radii free of the cancellation
    that float32 suffers for nearly equal points.

    Args:
      real_features: ``(N_real, D)`` features of real data.
      fake_features: ``(N_fake, D)`` features of generated data.
      k: the neighbourhood size (paper: 3), ``1 <= k < N`` for both sets.
      batch_size: rows per distance block.

    Returns:
      ``(precision, recall)`` as Python floats in ``[0, 1]``.
    """
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contain NaN or infinite values")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape}, fake {fake.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = _fraction_in_manifold(fake, real, real_radii, batch_size)
    recall = _fraction_in_manifold(real, fake, fake_radii, batch_size)
    return precision, recall


def load_reference_statistics(
    path: str | os.PathLike, keys: tuple[str, str] = STATISTICS_KEYS
) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu, sigma)`` as float64 from a ``.npz`` file.

    Works for files written by ``RunningStatistics.to_npz`` and for ADM
    reference batches (``VIRTUAL_imagenet512.npz`` etc.), which hold the pool3
    statistics ``mu``/``sigma`` next to images ``arr_0`` and spatial statistics
    ``mu_s``/``sigma_s``; only the requested arrays are read (``np.load`` of an
    npz is lazy) and never with pickle.

    Args:
      path: the ``.npz`` file.
      keys: the names of the mean and the covariance;
        ``SPATIAL_STATISTICS_KEYS`` reads ADM's spatial (sFID) statistics.

    Returns:
      ``mu`` ``(D,)`` and ``sigma`` ``(D, D)``, float64.
    """
    mu_key, sigma_key = keys
    with _open_npz(path) as data:
        missing = [key for key in keys if key not in data.files]
        if missing:
            raise ValueError(
                f"{os.fspath(path)} has no {' or '.join(repr(k) for k in missing)}; its keys "
                f"are {sorted(data.files)}. Reference statistics need '{mu_key}' (D,) and "
                f"'{sigma_key}' (D, D). To compute them, run the feature network over the "
                "reference images (e.g. an ADM batch's 'arr_0'), accumulate the features with "
                "RunningStatistics.update and save them with RunningStatistics.to_npz."
            )
        mu = np.asarray(data[mu_key], np.float64)
        sigma = np.asarray(data[sigma_key], np.float64)
    _check_statistics(mu, sigma, "")
    return mu, sigma

"""Per-scale standard deviations of a latent dataset under named pyramids.

A pyramid name is the key `pyramid.metadata_name` gives a config's decomposition:
`{kind}_{ratios joined by "x"}`, e.g. "laplacian_2" (two scales, x2), "laplacian_2x2"
(three scales), "laplacian_4", "haar_2", and "laplacian_1" for a single scale (Flow
Matching); a temporal Laplacian pyramid (time resized too) ends in "_t", e.g.
"laplacian_2_t". The training setup looks the stds up under that key, and
`pyramid.Standardized` divides scale s by its (scalar) std, so every value is one float per
scale, coarsest first: the standard deviation over all elements (examples, positions and
channels) of that scale.

Moments are accumulated per batch in float32 on the device and merged across batches in
float64 on the host (Chan et al.'s pairwise update), so the result does not drift with the
number of examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.method import pyramid

DEFAULT_PYRAMIDS = ("laplacian_1", "laplacian_2", "laplacian_4", "laplacian_2x2", "haar_2")


def pyramid_from_name(name: str) -> pyramid.Pyramid:
    """The decomposition of this `pyramid.metadata_name` (unstandardised)."""
    temporal = name.endswith(pyramid.TEMPORAL_SUFFIX)
    base = name.removesuffix(pyramid.TEMPORAL_SUFFIX)
    kind, sep, ratio_text = base.partition("_")
    try:
        ratios = tuple(int(r) for r in ratio_text.split("x")) if sep else None
    except ValueError:
        ratios = None
    if kind not in pyramid.KINDS or ratios is None:
        raise ValueError(
            f"bad pyramid name {name!r}: expected <kind>_<ratios>, kind one of "
            f"{pyramid.KINDS} and ratios like 2, 4, 2x2 (1 for a single scale), e.g. "
            "laplacian_2, haar_2x2, laplacian_1, laplacian_2_t (temporal)"
        )
    if ratios == (1,):
        ratios = ()
    expected = pyramid.metadata_name(kind, ratios, temporal and kind == "laplacian")
    if expected != name:
        raise ValueError(f"bad pyramid name {name!r}; did you mean {expected!r}?")
    return pyramid.make(kind, ratios, temporal=temporal)


def parse_pyramids(names: Sequence[str], latent_shape: Sequence[int]) -> dict[str, pyramid.Pyramid]:
    """Name -> pyramid for every name; ValueError when one does not fit the latent size."""
    pyramids = {}
    for name in names:
        p = pyramid_from_name(name)
        try:
            p.scale_shapes((1, *(int(d) for d in latent_shape)))
        except ValueError as e:
            raise ValueError(
                f"pyramid {name!r} does not fit latents of shape {tuple(latent_shape)}: {e}"
            ) from e
        pyramids[name] = p
    return pyramids


class RunningMoments:
    """Count, mean and sum of squared deviations of a stream, merged in float64."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, count: int, mean: float, m2: float) -> None:
        """Merges a block with `count` elements, mean `mean` and squared deviations `m2`."""
        if count == 0:
            return
        total = self.count + count
        delta = float(mean) - self.mean
        self.mean += delta * count / total
        self.m2 += float(m2) + delta * delta * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (NaN before any data)."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")


def _batch_moments(pyramids: dict[str, pyramid.Pyramid]):
    def moments(latents):
        out = {}
        for name, p in pyramids.items():
            per_scale = []
            for scale in p.decompose(latents.astype(jnp.float32)):
                mean = jnp.mean(scale)
                per_scale.append((mean, jnp.sum(jnp.square(scale - mean))))
            out[name] = per_scale
        return out

    return jax.jit(moments)


class ScaleStats:
    """Accumulates per-scale moments of latent batches for several named pyramids."""

    def __init__(self, pyramids: dict[str, pyramid.Pyramid]):
        self.pyramids = dict(pyramids)
        self._moments = _batch_moments(self.pyramids)
        self._running = {
            name: [RunningMoments() for _ in range(p.num_scales)]
            for name, p in self.pyramids.items()
        }

    def add(self, latents: np.ndarray) -> None:
        """Adds a batch of model-space latents (B, H, W, C) or (B, T, H, W, C)."""
        if not self.pyramids or len(latents) == 0:
            return
        moments = jax.device_get(self._moments(jnp.asarray(latents)))
        for name, p in self.pyramids.items():
            shapes = p.scale_shapes(latents.shape)
            for running, shape, (mean, m2) in zip(
                self._running[name], shapes, moments[name], strict=True
            ):
                running.add(int(np.prod(shape)), float(mean), float(m2))

    def stds(self) -> dict[str, list[float]]:
        """Pyramid name -> per-scale stds, coarsest first."""
        return {name: [m.std for m in running] for name, running in self._running.items()}


def sample_indices(num_records: int, num_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of `num_samples` records drawn without replacement (all when fewer).

    A seeded uniform draw over the whole dataset (not the first records, which a class-sorted
    source would fill with a few classes).
    """
    if num_samples <= 0:
        return np.zeros((0,), np.int64)
    if num_samples >= num_records:
        return np.arange(num_records)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_records, size=num_samples, replace=False))


def measure_scale_stds(
    source, pyramids: dict[str, pyramid.Pyramid], indices: Sequence[int], batch_size: int = 256
) -> dict[str, list[float]]:
    """Per-scale stds of `source[i]["image"]` (model-space latents) over `indices`."""
    stats = ScaleStats(pyramids)
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        batch = np.stack([source[int(i)]["image"] for i in indices[start : start + batch_size]])
        stats.add(batch)
    return stats.stds()

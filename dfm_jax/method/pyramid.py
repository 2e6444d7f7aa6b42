"""Multiscale decompositions of images and videos (DFM spec section 1).

A decomposition turns one array X into S scales ``X_1 .. X_S``, coarsest first,
each at its own spatial resolution ``r_1 < ... < r_S = r(X)``, with an exact
inverse:

    D_S = X,  D_(s-1) = down(D_s, ratio_(s-1))        (low-pass images)
    X_1 = D_1,  X_s = D_s - up(D_(s-1), ratio_(s-1))   for s > 1

    recompose:  Y_1 = X_1,  Y_s = up(Y_(s-1)) + X_s,   Y_S == X

The low-pass images are built by successive downsampling, one ratio at a time,
as in the authors' ``LaplacianDecomposer2D`` (for one x2 or x4 step this is the
same as downsampling X directly). ``Y_k`` is the low-resolution preview of stage
k (``preview``).

Two families share this interface:

* ``Laplacian(ratios)``: bilinear resize with half-pixel centres and no
  antialiasing, the same operator as torch ``F.interpolate(mode="bilinear",
  align_corners=False, antialias=False)``. A x2 downsample is a 2x2 average.
* ``HaarDWT(levels)``: the Haar wavelet pyramid. The approximation is the
  2x2 block average and the detail of level s is ``D_s - nearest_up(D_(s-1))``:
  every 2x2 block of a detail scale sums to zero and holds exactly the three
  Haar detail coefficients (LH, HL, HH) of that block, laid out at the full
  resolution of the level so that the per-scale patch sizes of the model work
  unchanged.

Arrays are channel-last: images ``(B, H, W, C)``, videos ``(B, T, H, W, C)``.
Videos are decomposed spatially, each frame independently, unless
``Laplacian(ratios, temporal=True)``: then every ratio-r step also resizes time by r
with the same linear kernel (trilinear, half-pixel centres, no antialias: torch
``F.interpolate(mode="trilinear", align_corners=False)``), as the authors'
``LaplacianDecomposer3D`` does with x2 per level, and scale s of a ``(B, T, H, W, C)``
clip has ``T_s = T / prod(ratios[s:])`` frames. T must then be divisible by the
product of the ratios (odd T, e.g. the 1 + k latent frames of a causal video
autoencoder, is refused, as in the authors' code; crop or pad the clip). All
operations are pure ``jnp`` and jit-able; shape checks raise ``ValueError`` at trace
time from static shapes, before any computation is staged.

``Standardized(pyramid, stds)`` wraps any decomposition and divides scale s by
its data standard deviation ``sigma_s`` (spec section 1, "per-scale
standardisation"); its inverse multiplies back, so it is exactly invertible.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

_SPATIAL_AXES = (-3, -2)  # H, W in channel-last (B, H, W, C) and (B, T, H, W, C)


def _check_rank(x: Array) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(
            f"expected an image batch (B, H, W, C) or a video batch (B, T, H, W, C), "
            f"got an array of shape {tuple(x.shape)}"
        )


def _spatial_shape(x: Array) -> tuple[int, int]:
    return x.shape[-3], x.shape[-2]


def _with_spatial(shape: Sequence[int], height: int, width: int) -> tuple[int, ...]:
    shape = list(shape)
    shape[-3], shape[-2] = height, width
    return tuple(shape)


def resize_bilinear(x: Array, height: int, width: int) -> Array:
    """Bilinear resize of the spatial axes, half-pixel centres, no antialiasing.

    Matches torch ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=False)`` for integer up- and downsampling ratios.

    Args:
      x: ``(..., H, W, C)``.
      height, width: output spatial size.

    Returns:
      ``(..., height, width, C)`` in the dtype of ``x``.
    """
    in_h, in_w = _spatial_shape(x)
    if (in_h, in_w) == (height, width):
        return x
    if in_h % height == 0 and in_w % width == 0 and (in_h // height) == (in_w // width) == 2:
        # Exact and cheaper: a x2 bilinear downsample samples the midpoint of each 2x2 block.
        return _block_mean(x, 2)
    return jax.image.resize(
        x, _with_spatial(x.shape, height, width), method="bilinear", antialias=False
    )


def resize_trilinear(x: Array, frames: int, height: int, width: int) -> Array:
    """Trilinear resize of the time and spatial axes, half-pixel centres, no antialiasing.

    Matches torch ``F.interpolate(mode="trilinear", align_corners=False)`` (whose
    trilinear mode never antialiases) for integer up- and downsampling ratios.

    Args:
      x: ``(B, T, H, W, C)``.
      frames, height, width: output size.

    Returns:
      ``(B, frames, height, width, C)`` in the dtype of ``x``.
    """
    t, h, w = x.shape[-4:-1]
    if (t, h, w) == (frames, height, width):
        return x
    if (t, h, w) == (2 * frames, 2 * height, 2 * width):
        # Exact and cheaper: a x2 trilinear downsample is the mean of each 2x2x2 block.
        return _block_mean(_time_pair_mean(x), 2)
    shape = (*x.shape[:-4], frames, height, width, x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=False)


def _time_pair_mean(x: Array) -> Array:
    """Average over consecutive frame pairs of ``(B, T, H, W, C)``."""
    t = x.shape[-4]
    return x.reshape(*x.shape[:-4], t // 2, 2, *x.shape[-3:]).mean(axis=-4)


def _require_video(shape: Sequence[int]) -> None:
    if len(shape) != 5:
        raise ValueError(
            f"a temporal pyramid decomposes videos (B, T, H, W, C), got shape {tuple(shape)}"
        )


def _block_mean(x: Array, factor: int) -> Array:
    """Average over non-overlapping ``factor x factor`` spatial blocks."""
    h, w = _spatial_shape(x)
    c = x.shape[-1]
    blocks = x.reshape(*x.shape[:-3], h // factor, factor, w // factor, factor, c)
    return blocks.mean(axis=(-4, -2))


def _nearest_up(x: Array, factor: int) -> Array:
    """Repeat every spatial pixel ``factor`` times along H and W."""
    return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


class Pyramid(abc.ABC):
    """Shared machinery: successive low-pass images and their residuals.

    Subclasses define ``ratios`` (the ratio between consecutive scales, coarse
    to fine, length S - 1) and the ``_down`` / ``_up`` operators.
    """

    ratios: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        """Number of scales S."""
        return len(self.ratios) + 1

    @property
    def total_ratio(self) -> int:
        """Ratio between the finest and the coarsest resolution."""
        return math.prod(self.ratios)

    @abc.abstractmethod
    def _down(self, x: Array, factor: int) -> Array:
        """Low-pass downsampling of the spatial axes by ``factor``."""

    @abc.abstractmethod
    def _up(self, x: Array, factor: int) -> Array:
        """Upsampling of the spatial axes by ``factor``."""

    def _validate_ratios(self) -> None:
        if not all(isinstance(r, int) and r >= 2 for r in self.ratios):
            raise ValueError(f"ratios must be integers >= 2, got {self.ratios}")

    def scale_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size of every scale, coarsest first, for an input of this size.

        Raises:
          ValueError: if the size is not divisible by the product of the ratios.
        """
        total = self.total_ratio
        if height % total or width % total:
            raise ValueError(
                f"spatial size {height}x{width} is not divisible by {total}, the product of "
                f"the pyramid ratios {self.ratios}; pad or crop the input to a multiple of "
                f"{total} or choose other ratios"
            )
        sizes = [(height, width)]
        for ratio in reversed(self.ratios):
            h, w = sizes[0]
            sizes.insert(0, (h // ratio, w // ratio))
        return sizes

    def scale_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Full shape of every scale for an input of ``shape``, coarsest first.

        ``(B, H, W, C)`` -> ``(B, H_s, W_s, C)``; ``(B, T, H, W, C)`` -> ``(B, T_s, H_s,
        W_s, C)`` with ``T_s = T`` unless the pyramid is temporal.
        """
        return [_with_spatial(shape, h, w) for h, w in self.scale_sizes(shape[-3], shape[-2])]

    def decompose(self, x: Array) -> list[Array]:
        """Splits ``x`` into S scales, coarsest first.

        Args:
          x: ``(B, H, W, C)`` or ``(B, T, H, W, C)``; H and W (and T for a temporal
            pyramid) divisible by the product of the ratios.

        Returns:
          A list of S arrays; scale s has shape ``scale_shapes(x.shape)[s]``.
        """
        _check_rank(x)
        self.scale_shapes(x.shape)  # validates rank and divisibility
        lowpass = [x]
        for ratio in reversed(self.ratios):
            lowpass.insert(0, self._down(lowpass[0], ratio))
        scales = [lowpass[0]]
        for ratio, coarse, fine in zip(self.ratios, lowpass[:-1], lowpass[1:], strict=True):
            scales.append(fine - self._up(coarse, ratio))
        return scales

    def preview(self, scales: Sequence[Array], k: int) -> Array:
        """Recomposition of scales 1..k at the resolution of scale k (k counts from 1).

        Only ``scales[:k]`` are read, so later scales may be absent or arbitrary.
        """
        if not 1 <= k <= self.num_scales:
            raise ValueError(f"preview stage k must be in [1, {self.num_scales}], got {k}")
        if len(scales) < k:
            raise ValueError(f"preview of stage {k} needs {k} scales, got {len(scales)}")
        self._check_scale_shapes(scales[:k])
        image = scales[0]
        for ratio, detail in zip(self.ratios[: k - 1], scales[1:k], strict=True):
            image = self._up(image, ratio) + detail
        return image

    def recompose(self, scales: Sequence[Array]) -> Array:
        """Inverse of ``decompose``: the full-resolution array from all S scales."""
        if len(scales) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} scales, got {len(scales)}")
        return self.preview(scales, self.num_scales)

    def _finer_shape(self, shape: Sequence[int], ratio: int) -> tuple[int, ...]:
        """Shape of the next finer scale (ratio ``ratio``) after a scale of ``shape``."""
        return _with_spatial(shape, shape[-3] * ratio, shape[-2] * ratio)

    def _check_scale_shapes(self, scales: Sequence[Array]) -> None:
        for s, (coarse, fine) in enumerate(itertools.pairwise(scales)):
            _check_rank(fine)
            ratio = self.ratios[s]
            expected = self._finer_shape(coarse.shape, ratio)
            if tuple(fine.shape) != expected:
                raise ValueError(
                    f"scale {s + 2} has shape {tuple(fine.shape)} but scale {s + 1} of shape "
                    f"{tuple(coarse.shape)} with ratio {ratio} needs {expected}"
                )


@dataclasses.dataclass(frozen=True)
class Laplacian(Pyramid):
    """Laplacian pyramid with bilinear (no antialias) resizing.

    ``Laplacian((2,))``: two scales, x2 apart. ``Laplacian((2, 2))``: three
    scales. ``Laplacian((4,))``: two scales, x4 apart. Ratios run coarse to fine.
    """

    ratios: tuple[int, ...] = (2,)
    temporal: bool = False  # resize time too (videos only): the authors' 3-D decomposer

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(self.ratios))
        self._validate_ratios()

    def scale_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        shapes = super().scale_shapes(shape)
        if not self.temporal or not self.ratios:
            return shapes
        _require_video(shape)
        frames, total = shape[1], self.total_ratio
        if frames % total:
            raise ValueError(
                f"{frames} frames (data.frames, or the latent frames of a video autoencoder) "
                f"are not divisible by {total}, the product of the temporal pyramid ratios "
                f"{self.ratios}; use a multiple of {total} frames or pyramid.temporal=False"
            )
        out = []
        for s, scale_shape in enumerate(shapes):
            scale_shape = list(scale_shape)
            scale_shape[1] = frames // math.prod(self.ratios[s:])
            out.append(tuple(scale_shape))
        return out

    def _finer_shape(self, shape: Sequence[int], ratio: int) -> tuple[int, ...]:
        finer = list(super()._finer_shape(shape, ratio))
        if self.temporal:
            _require_video(shape)
            finer[1] *= ratio
        return tuple(finer)

    def _down(self, x: Array, factor: int) -> Array:
        h, w = _spatial_shape(x)
        if self.temporal:
            return resize_trilinear(x, x.shape[1] // factor, h // factor, w // factor)
        return resize_bilinear(x, h // factor, w // factor)

    def _up(self, x: Array, factor: int) -> Array:
        h, w = _spatial_shape(x)
        if self.temporal:
            return resize_trilinear(x, x.shape[1] * factor, h * factor, w * factor)
        return resize_bilinear(x, h * factor, w * factor)


@dataclasses.dataclass(frozen=True)
class HaarDWT(Pyramid):
    """Haar wavelet pyramid with ``levels`` x2 levels (S = levels + 1 scales).

    Approximation: 2x2 block mean. Detail of a level: the input minus the
    nearest-neighbour upsampled approximation, i.e. the three Haar detail
    coefficients of every 2x2 block in a zero-sum layout at the level's
    resolution.
    """

    levels: int = 1

    def __post_init__(self):
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"HaarDWT needs levels >= 1, got {self.levels!r}")

    @property
    def ratios(self) -> tuple[int, ...]:
        return (2,) * self.levels

    def _down(self, x: Array, factor: int) -> Array:
        return _block_mean(x, factor)

    def _up(self, x: Array, factor: int) -> Array:
        return _nearest_up(x, factor)


@dataclasses.dataclass(frozen=True)
class Standardized:
    """A decomposition whose scale s is divided by its data std ``stds[s]``.

    ``stds`` are measured from data (stored with a prepared dataset). The
    inverse operations multiply back before recomposing, so
    ``recompose(decompose(x)) == x`` up to float rounding.
    """

    pyramid: Pyramid
    stds: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "stds", tuple(float(s) for s in self.stds))
        if len(self.stds) != self.pyramid.num_scales:
            raise ValueError(
                f"got {len(self.stds)} per-scale stds for a pyramid of "
                f"{self.pyramid.num_scales} scales"
            )
        if not all(s > 0 and math.isfinite(s) for s in self.stds):
            raise ValueError(f"per-scale stds must be positive and finite, got {self.stds}")

    @property
    def num_scales(self) -> int:
        return self.pyramid.num_scales

    @property
    def ratios(self) -> tuple[int, ...]:
        return self.pyramid.ratios

    @property
    def temporal(self) -> bool:
        return getattr(self.pyramid, "temporal", False)

    def scale_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        return self.pyramid.scale_sizes(height, width)

    def scale_shapes(self, shape: Sequence[int]) -> list[tuple[int, ...]]:
        return self.pyramid.scale_shapes(shape)

    def standardize(self, scales: Sequence[Array]) -> list[Array]:
        """Divides scale s by ``stds[s]``; accepts the first k <= S scales."""
        return [x / jnp.asarray(std, x.dtype) for x, std in zip(scales, self.stds)]  # noqa: B905

    def unstandardize(self, scales: Sequence[Array]) -> list[Array]:
        """Multiplies scale s by ``stds[s]``; accepts the first k <= S scales."""
        return [x * jnp.asarray(std, x.dtype) for x, std in zip(scales, self.stds)]  # noqa: B905

    def decompose(self, x: Array) -> list[Array]:
        return self.standardize(self.pyramid.decompose(x))

    def recompose(self, scales: Sequence[Array]) -> Array:
        return self.pyramid.recompose(self.unstandardize(scales))

    def preview(self, scales: Sequence[Array], k: int) -> Array:
        return self.pyramid.preview(self.unstandardize(scales[:k]), k)


Decomposition = Pyramid | Standardized
"""Anything with ``decompose`` / ``recompose`` / ``preview`` / ``num_scales``."""

#: Decomposition families by name (``make``).
KINDS = ("laplacian", "haar")


def make(
    kind: str,
    ratios: Sequence[int],
    stds: Sequence[float] | None = None,
    temporal: bool = False,
) -> Decomposition:
    """The decomposition ``kind`` with coarse-to-fine ``ratios``, standardised by ``stds``.

    ``"laplacian"``: ``Laplacian(ratios, temporal)``; ``"haar"``: ``HaarDWT(len(ratios))``
    (x2 levels only, spatial only); no ratios is the one-scale identity (Flow
    Matching). ``stds``, one per scale, wrap it in ``Standardized``.
    """
    ratios = tuple(int(r) for r in ratios)
    if kind not in KINDS:
        raise ValueError(f"unknown decomposition {kind!r}; expected one of {KINDS}")
    if temporal and kind != "laplacian":
        raise ValueError(f"only the Laplacian pyramid can be temporal, got kind {kind!r}")
    if kind == "haar" and ratios:
        if any(r != 2 for r in ratios):
            raise ValueError(f"the Haar pyramid has x2 levels only, got ratios {ratios}")
        decomposition = HaarDWT(len(ratios))
    else:
        decomposition = Laplacian(ratios, temporal=temporal)
    return decomposition if stds is None else Standardized(decomposition, tuple(stds))


#: Suffix of the metadata name of a temporal pyramid.
TEMPORAL_SUFFIX = "_t"


def metadata_name(kind: str, ratios: Sequence[int], temporal: bool = False) -> str:
    """The key of a decomposition's per-scale stds in dataset metadata, e.g. "laplacian_2x2",
    "laplacian_2x2_t" (temporal). A one-scale pyramid ("laplacian_1") is never temporal."""
    name = f"{kind}_{'x'.join(str(int(r)) for r in ratios) or '1'}"
    return name + TEMPORAL_SUFFIX if temporal and ratios else name

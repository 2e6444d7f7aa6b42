"""The CogVideoX video autoencoder (diffusers' ``AutoencoderKLCogVideoX``), channel-last.

Computes the same function as diffusers'
``diffusers/models/autoencoders/autoencoder_kl_cogvideox.py`` (with
``CogVideoXDownsample3D`` / ``CogVideoXUpsample3D``), in Flax Linen on
``(B, T, H, W, C)`` videos.

Architecture (diffusers' names; the Flax parameter tree uses the same names with list
indices joined by ``_``, e.g. ``encoder/down_blocks_0/resnets_1/conv1/conv/kernel``;
:mod:`dfm_jax.weights.cogvideox` maps the diffusers state dict onto it):

* ``CausalConv3d`` (``conv_in``, ``conv1``, ``conv2``, ``conv_out``): a k x k x k
  convolution, spatially zero-padded, temporally *causal*: the input is preceded by
  ``k - 1`` frames, copies of the first frame at the start of a clip, or the last
  ``k - 1`` input frames of the previous chunk (the *conv cache*) when a clip is
  processed chunk by chunk. Time stride 1, so T frames give T frames.
* ``ResnetBlock3D``: ``norm1`` -> SiLU -> ``conv1`` -> ``norm2`` -> SiLU -> ``conv2``
  plus the input (through the 1x1x1 ``conv_shortcut`` where the width changes). The
  encoder's norms are GroupNorms over (T, H, W) and the group's channels; the
  decoder's are ``SpatialNorm3D``: GroupNorm, then ``* conv_y(zq) + conv_b(zq)``
  with 1x1x1 convs of the decoder's input latent ``zq``, nearest-resized to the
  feature's (T, H, W) (the first latent frame to the first frame, the rest to the
  rest, when the feature has an odd number T > 1 of frames).
* ``Downsample3D`` (encoder ``down_blocks_i/downsamplers_0``, all blocks but the
  last): if ``compress_time`` (block i < log2(temporal ratio)), average pairs of
  frames (an odd count keeps the first frame alone: 1 + 2k -> 1 + k); then per frame
  a zero pad of one pixel at the bottom/right and a 3x3 stride-2 conv.
* ``Upsample3D`` (decoder ``up_blocks_i/upsamplers_0``): nearest x2 in H, W and, if
  ``compress_time``, in T (an odd count > 1 keeps the first frame single:
  1 + k -> 1 + 2k); then a per-frame 3x3 conv.
* ``encoder``: ``conv_in`` -> ``down_blocks_i`` (``layers_per_block`` resnets) ->
  ``mid_block`` (2 resnets) -> ``norm_out`` -> SiLU -> ``conv_out`` to
  ``2 * latent_channels`` (mean, log-variance). No quant convs.
* ``decoder``: ``conv_in`` -> ``mid_block`` -> ``up_blocks_i`` (reversed widths,
  ``layers_per_block + 1`` resnets) -> ``norm_out`` (SpatialNorm3D) -> SiLU ->
  ``conv_out`` to 3 channels.

Frames and chunks
-----------------
T = 1 + r * k frames (r: temporal ratio, 4 for CogVideoX) encode to 1 + k latent
frames (49 -> 13); as in diffusers, an odd number T' of latent frames decodes to
1 + r (T' - 1) frames, an even one per chunk to r frames per latent frame
(:meth:`CogVideoXConfig.decoded_frames`), so clips of 1 + 2 r m frames (9, 17, 49)
round-trip to their length. Like diffusers, :func:`encode_video` runs the encoder on chunks of
``encode_chunk_frames`` (8) frames and :func:`decode_video` the decoder on chunks of
``decode_chunk_latents`` (2) latent frames, the remainder going to the first chunk
(13 latents: 3, 2, 2, 2, 2, 2), carrying the conv cache from chunk to chunk (a
``jax.lax.scan``, so memory is that of one chunk). GroupNorm statistics, and the
odd-first-frame rule of the resamplers, apply *per chunk*: the chunk sizes are part
of the function (the released models are used this way), so decoding all frames at
once (chunk size 0) is a different function; the causal convolutions alone are
exactly chunk-invariant through the cache. :class:`VideoCodec` can also decode in
spatial tiles (:func:`dfm_jax.models.autoencoder.decode_tiled`: equal tiles blended
linearly; diffusers blends differently, so tiled outputs differ slightly from both).

Pixels are ``(B, T, H, W, 3)`` in [-1, 1]; H, W multiples of the spatial factor f.
Latents ``(B, T', H/f, W/f, latent_channels)``; model space
``(z - shift_factor) * scaling_factor`` (shift 0 for CogVideoX). Parameters are
float32; computation in ``config.dtype``, GroupNorm statistics in float32, outputs
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models.autoencoder import (
    LOGVAR_RANGE,
    BoundCodec,
    GroupNorm,
    decode_tiled,
    from_model_space,
    posterior_std,
    sample_latent,
    to_model_space,
)

Array = jax.Array
Cache = dict[str, Any]

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_PRECISIONS = (None, "default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
    """Architecture and latent-space constants of an ``AutoencoderKLCogVideoX``. Hashable.

    Attributes:
      name: preset name (informational; see :data:`VIDEO_PRESETS`).
      in_channels: pixel channels (3); also the decoder's output channels.
      latent_channels: latent channels (16 for CogVideoX).
      block_out_channels: encoder block widths (decoder: reversed); every block but
        the last halves H and W.
      layers_per_block: resnets per encoder block (decoder: one more).
      norm_num_groups: GroupNorm groups; must divide every width.
      temporal_compression_ratio: frames per latent frame (a power of two); the first
        log2(ratio) resampling blocks also halve (double) time.
      scaling_factor: model-space latent = (z - shift_factor) * scaling_factor.
      shift_factor: 0 for CogVideoX.
      dtype: computation dtype; parameters float32, GroupNorm statistics float32.
      precision: conv precision (None, "default", "high", "highest").
      encode_chunk_frames: frames per encoder chunk (diffusers: 8); 0: all at once.
      decode_chunk_latents: latent frames per decoder chunk (diffusers: 2); 0: all.
    """

    name: str
    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426
    shift_factor: float = 0.0
    dtype: str = "float32"
    precision: str | None = "highest"
    encode_chunk_frames: int = 8
    decode_chunk_latents: int = 2

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError as e:
            raise ValueError(f"CogVideoXConfig.dtype: unknown dtype {self.dtype!r}") from e
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along H and W: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        """How many resampling blocks also resample time: log2 of the temporal ratio."""
        return round(math.log2(self.temporal_compression_ratio))

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` = 1 + r * k frames: 1 + k."""
        return 1 + (frames - 1) // self.temporal_compression_ratio

    def decoded_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames``, chunk by chunk as diffusers: a chunk of
        c latent frames gives 1 + r (c - 1) frames if c is odd, r c if even (so odd
        ``latent_frames`` give 1 + r (latent_frames - 1): 13 -> 49)."""
        r = self.temporal_compression_ratio
        return sum(
            1 + r * (c - 1) if c % 2 else r * c
            for c in _schedule(latent_frames, self.decode_chunk_latents)
        )

    def validate(self) -> None:
        """Raise ValueError naming the offending field if the configuration is invalid."""

        def bad(msg: str):
            raise ValueError(f"CogVideoXConfig({self.name!r}): {msg}")

        for field in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                bad(f"{field} must be a positive integer, got {value!r}")
        if not self.block_out_channels or any(
            w % self.norm_num_groups for w in self.block_out_channels
        ):
            bad(
                f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups"
            )
        r = self.temporal_compression_ratio
        if r < 1 or 2**self.temporal_levels != r:
            bad(f"temporal_compression_ratio must be a power of two, got {r!r}")
        if self.temporal_levels > len(self.block_out_channels) - 1:
            bad(f"temporal ratio {r} needs {self.temporal_levels} resampling blocks")
        if not self.scaling_factor > 0:
            bad(f"scaling_factor must be positive, got {self.scaling_factor!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            bad(f"dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.precision not in _PRECISIONS:
            bad(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        for field in ("encode_chunk_frames", "decode_chunk_latents"):
            if getattr(self, field) < 0:
                bad(f"{field} must be >= 0")


_COGVIDEOX = dict(
    latent_channels=16,
    block_out_channels=(128, 256, 256, 512),
    layers_per_block=3,
    norm_num_groups=32,
    temporal_compression_ratio=4,
)

#: Preset name -> keyword arguments of :class:`CogVideoXConfig`: the ``vae/`` configs of
#: ``THUDM/CogVideoX-2b`` and ``THUDM/CogVideoX-5b`` (same architecture, different
#: scaling factors); "tiny-video" is a random-weight model for tests (spatial /4,
#: temporal /4).
VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    "cogvideox-2b": dict(_COGVIDEOX, scaling_factor=1.15258426),
    "cogvideox-5b": dict(_COGVIDEOX, scaling_factor=0.7),
    "tiny-video": dict(
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        scaling_factor=0.5,
    ),
}

#: Where the weights of each released preset are published (diffusers layout).
VIDEO_WEIGHTS_SOURCES = {
    "cogvideox-2b": "https://huggingface.co/THUDM/CogVideoX-2b (the vae/ folder: "
    "diffusion_pytorch_model.safetensors and config.json)",
    "cogvideox-5b": "https://huggingface.co/THUDM/CogVideoX-5b (the vae/ folder: "
    "diffusion_pytorch_model.safetensors and config.json)",
}


def video_autoencoder_config(name: str, **overrides: Any) -> CogVideoXConfig:
    """The :class:`CogVideoXConfig` of a preset of :data:`VIDEO_PRESETS`, fields overridden.

    Raises:
      ValueError: unknown name (the message lists the valid ones) or invalid fields.
    """
    if name not in VIDEO_PRESETS:
        raise ValueError(
            f"unknown video autoencoder {name!r}; expected one of {sorted(VIDEO_PRESETS)}"
        )
    return CogVideoXConfig(name=name, **{**VIDEO_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------
# Resampling helpers (channel-last videos (B, T, H, W, C))
# ----------------------------------------------------------------------------


def _nearest(x: Array, size: tuple[int, int, int]) -> Array:
    """torch ``interpolate(mode="nearest", size=size)`` over (T, H, W) of (B, T, H, W, C):
    output index i reads input index floor(i * in / out)."""
    for axis, out in zip((1, 2, 3), size, strict=True):
        n = x.shape[axis]
        if n != out:
            x = jnp.take(x, (np.arange(out) * n) // out, axis=axis)
    return x


def _resize_like_first(zq: Array, t: int, h: int, w: int) -> Array:
    """Resize the latent zq (B, t', h', w', C) to (B, t, h, w, C) as ``SpatialNorm3D``:
    for odd t > 1 the first frame maps to the first frame, the rest to the rest."""
    if t > 1 and t % 2 == 1:
        first = _nearest(zq[:, :1], (1, h, w))
        rest = _nearest(zq[:, 1:], (t - 1, h, w))
        return jnp.concatenate([first, rest], axis=1)
    return _nearest(zq, (t, h, w))


def _pool_time(x: Array) -> Array:
    """Average pairs of frames; an odd count keeps the first frame alone. (B, T, ...)."""
    first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 else (x[:, :0], x)
    b, t = rest.shape[:2]
    rest = rest.reshape(b, t // 2, 2, *rest.shape[2:])
    pooled = jnp.mean(rest.astype(jnp.float32), axis=2).astype(x.dtype)
    return jnp.concatenate([first, pooled], axis=1)


def _repeat_time(x: Array) -> Array:
    """Repeat every frame twice; an odd count > 1 keeps the first frame single. (B, T, ...)."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] % 2:
        return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
    return jnp.repeat(x, 2, axis=1)


# ----------------------------------------------------------------------------
# Layers. Every layer maps (x, cache) -> (y, cache); cache None: start of a clip.
# ----------------------------------------------------------------------------


class _Layer(nn.Module):
    config: CogVideoXConfig

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def conv(self, features: int, kernel: tuple[int, ...], name: str, **kw) -> nn.Conv:
        return nn.Conv(
            features,
            kernel,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            precision=self.config.precision,
            name=name,
            **kw,
        )

    def group_norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.config.norm_num_groups, dtype=self.dtype, name=name)


class CausalConv3d(_Layer):
    """``CogVideoXCausalConv3d`` (pad mode "first"): (B, T, H, W, C) -> (B, T, H, W, out).

    The k - 1 frames before the input come from ``cache`` (B, k - 1, H, W, C) or, if
    None, repeat the first frame; the returned cache holds the last k - 1 frames of
    the padded input (None for k = 1).
    """

    features: int = 0
    kernel: int = 3

    @nn.compact
    def __call__(self, x: Array, cache: Array | None = None) -> tuple[Array, Array | None]:
        k, p = self.kernel, self.kernel // 2
        new_cache = None
        if k > 1:
            past = jnp.repeat(x[:, :1], k - 1, axis=1) if cache is None else cache.astype(x.dtype)
            x = jnp.concatenate([past, x], axis=1)
            new_cache = x[:, -(k - 1) :]
        pad = ((0, 0), (p, p), (p, p))
        return self.conv(self.features, (k, k, k), "conv", padding=pad)(x), new_cache


class SpatialNorm3D(_Layer):
    """``CogVideoXSpatialNorm3D``: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized to f.

    f: (B, T, H, W, C); zq: the decoder's input latent (B, t, h, w, Cz). -> like f.
    """

    @nn.compact
    def __call__(self, f: Array, zq: Array) -> Array:
        c = f.shape[-1]
        zq = _resize_like_first(zq, *f.shape[1:4])
        y, _ = CausalConv3d(self.config, c, 1, name="conv_y")(zq)
        b, _ = CausalConv3d(self.config, c, 1, name="conv_b")(zq)
        return self.group_norm("norm_layer")(f) * y + b


class ResnetBlock3D(_Layer):
    """``CogVideoXResnetBlock3D`` (no time embedding): (B, T, H, W, C) -> (B, T, H, W, out).

    With ``zq`` (the decoder), the norms are :class:`SpatialNorm3D`, else GroupNorms.
    """

    out_channels: int = 0

    @nn.compact
    def __call__(self, x: Array, zq: Array | None, cache: Cache | None) -> tuple[Array, Cache]:
        cache = cache or {}

        def norm(h, name):
            if zq is None:
                return self.group_norm(name)(h)
            return SpatialNorm3D(self.config, name=name)(h, zq)

        h, c1 = CausalConv3d(self.config, self.out_channels, name="conv1")(
            nn.silu(norm(x, "norm1")), cache.get("conv1")
        )
        h, c2 = CausalConv3d(self.config, self.out_channels, name="conv2")(
            nn.silu(norm(h, "norm2")), cache.get("conv2")
        )
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, (1, 1, 1), "conv_shortcut")(x)
        return x + h, {"conv1": c1, "conv2": c2}


class Resample(_Layer):
    """``CogVideoXDownsample3D`` (``up=False``) or ``CogVideoXUpsample3D`` (``up=True``).

    Down: (B, T, H, W, C) -> (B, T', H/2, W/2, C), T' = ceil(T / 2) if ``compress_time``.
    Up: -> (B, T', 2H, 2W, C), T' = 2T (T even) or 2T - 1 (T odd > 1) if ``compress_time``.
    """

    up: bool = False
    compress_time: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.compress_time:
            x = _repeat_time(x) if self.up else _pool_time(x)
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            pad, strides = ((1, 1), (1, 1)), (1, 1)
        else:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
            pad, strides = ((0, 0), (0, 0)), (2, 2)
        b, t = x.shape[:2]
        conv = self.conv(x.shape[-1], (3, 3), "conv", strides=strides, padding=pad)
        y = conv(x.reshape(b * t, *x.shape[2:]))
        return y.reshape(b, t, *y.shape[1:])


class Block(_Layer):
    """A down block (``zq`` None), up block or mid block (``resample`` None): resnets
    ``resnets_j`` to ``out_channels``, then ``downsamplers_0`` / ``upsamplers_0``."""

    out_channels: int = 0
    num_layers: int = 1
    resample: str | None = None  # None, "down" or "up"
    compress_time: bool = False

    @nn.compact
    def __call__(self, x: Array, zq: Array | None, cache: Cache | None) -> tuple[Array, Cache]:
        cache, new = cache or {}, {}
        for j in range(self.num_layers):
            name = f"resnets_{j}"
            resnet = ResnetBlock3D(self.config, self.out_channels, name=name)
            x, new[name] = resnet(x, zq, cache.get(name))
        if self.resample is not None:
            up = self.resample == "up"
            name = "upsamplers_0" if up else "downsamplers_0"
            x = Resample(self.config, up, self.compress_time, name=name)(x)
        return x, new


class Encoder(_Layer):
    """Pixels (B, T, H, W, in) -> moments (B, T', H/f, W/f, 2 * latent), one chunk."""

    @nn.compact
    def __call__(self, x: Array, cache: Cache | None) -> tuple[Array, Cache]:
        cfg, cache, new = self.config, cache or {}, {}
        widths = cfg.block_out_channels
        x, new["conv_in"] = CausalConv3d(cfg, widths[0], name="conv_in")(x, cache.get("conv_in"))
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            name = f"down_blocks_{i}"
            block = Block(
                cfg,
                width,
                cfg.layers_per_block,
                None if last else "down",
                i < cfg.temporal_levels,
                name=name,
            )
            x, new[name] = block(x, None, cache.get(name))
        x, new["mid_block"] = Block(cfg, widths[-1], 2, name="mid_block")(
            x, None, cache.get("mid_block")
        )
        x = nn.silu(self.group_norm("norm_out")(x))
        conv_out = CausalConv3d(cfg, 2 * cfg.latent_channels, name="conv_out")
        x, new["conv_out"] = conv_out(x, cache.get("conv_out"))
        return x, new


class Decoder(_Layer):
    """Raw latent (B, t, h, w, latent) -> pixels (B, T, h*f, w*f, in), one chunk."""

    @nn.compact
    def __call__(self, z: Array, cache: Cache | None) -> tuple[Array, Cache]:
        cfg, cache, new = self.config, cache or {}, {}
        widths = tuple(reversed(cfg.block_out_channels))
        x, new["conv_in"] = CausalConv3d(cfg, widths[0], name="conv_in")(z, cache.get("conv_in"))
        x, new["mid_block"] = Block(cfg, widths[0], 2, name="mid_block")(
            x, z, cache.get("mid_block")
        )
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            name = f"up_blocks_{i}"
            block = Block(
                cfg,
                width,
                cfg.layers_per_block + 1,
                None if last else "up",
                i < cfg.temporal_levels,
                name=name,
            )
            x, new[name] = block(x, z, cache.get(name))
        x = nn.silu(SpatialNorm3D(cfg, name="norm_out")(x, z))
        x, new["conv_out"] = CausalConv3d(cfg, cfg.in_channels, name="conv_out")(
            x, cache.get("conv_out")
        )
        return x, new


class CogVideoXAutoencoder(nn.Module):
    """diffusers' ``AutoencoderKLCogVideoX``, one temporal chunk at a time (see module doc).

    Methods (``apply(..., method=...)``): ``encode_chunk(x, cache)`` -> (moments
    (B, T', h, w, 2C) float32, cache); ``decode_chunk(z, cache)`` -> (pixels float32,
    cache); ``__call__(x)``: encode then decode the mean, whole (for initialisation).
    """

    config: CogVideoXConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode_chunk(self, x: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        h, cache = self.encoder(x.astype(self.config.dtype), cache)
        return h.astype(jnp.float32), cache

    def decode_chunk(self, z: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        x, cache = self.decoder(z.astype(self.config.dtype), cache)
        return x.astype(jnp.float32), cache

    def __call__(self, x: Array) -> Array:
        h, _ = self.encode_chunk(x)
        mean = h[..., : self.config.latent_channels]
        return self.decode_chunk(mean)[0]


# ----------------------------------------------------------------------------
# Chunked encode / decode
# ----------------------------------------------------------------------------


def _schedule(t: int, chunk: int) -> list[int]:
    """diffusers' chunk lengths of t frames: chunks of ``chunk``, the remainder in the
    first one (one chunk if ``chunk`` is 0 or t < 2 * chunk)."""
    if chunk <= 0 or t < 2 * chunk:
        return [t]
    return [chunk + t % chunk] + [chunk] * (t // chunk - 1)


def _chunked(step: Callable, x: Array, chunk: int) -> Array:
    """Run ``step(x_chunk, cache) -> (y, cache)`` over time chunks of x (B, T, ...).

    diffusers' schedule: chunks of ``chunk`` frames, the remainder T mod chunk in the
    first one (whole if ``chunk`` is 0 or >= T); the first starts a clip (cache
    None), the others run in a ``jax.lax.scan`` carrying the cache. Returns the
    outputs concatenated along time.
    """
    lengths = _schedule(x.shape[1], chunk)
    first, n = lengths[0], len(lengths) - 1
    y0, cache = step(x[:, :first], None)
    if n == 0:
        return y0
    rest = x[:, first:].reshape(x.shape[0], n, chunk, *x.shape[2:]).swapaxes(0, 1)

    def body(carry, xc):
        y, carry = step(xc, carry)
        return carry, y

    _, ys = jax.lax.scan(body, cache, rest)  # (n, B, t', ...)
    ys = ys.swapaxes(0, 1).reshape(y0.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


def encode_video(config: CogVideoXConfig, params, x: Array) -> tuple[Array, Array]:
    """Pixels (B, T, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, T', H/f, W/f, C).

    T' = 1 + (T - 1) / r; raw latent space, float32, logvar clamped to [-30, 20].
    Chunks of ``config.encode_chunk_frames`` frames (see :func:`_chunked`).
    """
    f = config.downsample_factor
    if x.ndim != 5 or x.shape[-1] != config.in_channels:
        raise ValueError(f"expected videos (B, T, H, W, {config.in_channels}), got {x.shape}")
    if x.shape[2] % f or x.shape[3] % f or (x.shape[1] - 1) % config.temporal_compression_ratio:
        raise ValueError(
            f"video {x.shape[1:4]} (T, H, W): need T = 1 + {config.temporal_compression_ratio}k "
            f"and H, W multiples of {f}"
        )
    model = CogVideoXAutoencoder(config)

    def step(xc, cache):
        return model.apply({"params": params}, xc, cache, method="encode_chunk")

    h = _chunked(step, x, config.encode_chunk_frames)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def decode_video(config: CogVideoXConfig, params, z: Array) -> Array:
    """Raw latent (B, T', h, w, C) -> pixels (B, T, h*f, w*f, 3), float32, not clipped.

    Chunks of ``config.decode_chunk_latents`` latent frames; T =
    ``config.decoded_frames(T')``, 1 + r (T' - 1) for odd T'.
    """
    if z.ndim != 5 or z.shape[-1] != config.latent_channels:
        raise ValueError(f"expected latents (B, T, h, w, {config.latent_channels}), got {z.shape}")
    model = CogVideoXAutoencoder(config)

    def step(zc, cache):
        return model.apply({"params": params}, zc, cache, method="decode_chunk")

    return _chunked(step, z, config.decode_chunk_latents)


def abstract_params(config: CogVideoXConfig) -> dict[str, Any]:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the parameters, without computing."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, 1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(CogVideoXAutoencoder(config).init, jax.random.key(0), x)["params"]


def init_params(config: CogVideoXConfig, seed: int = 0) -> dict[str, Any]:
    """Random float32 parameters, drawn with numpy (deterministic in ``seed``).

    Kernels ``N(0, 1 / fan_in)``, GroupNorm scales 1, biases 0; nothing is compiled.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)
        return np.full(spec.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


# ----------------------------------------------------------------------------
# VideoCodec: a bound video autoencoder
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _encode_moments(config: CogVideoXConfig, params, pixels: Array) -> tuple[Array, Array]:
    mean, logvar = encode_video(config, params, pixels)
    return mean, posterior_std(logvar)


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: CogVideoXConfig, params, pixels: Array, key: Array | None) -> Array:
    mean, logvar = encode_video(config, params, pixels)
    z = mean if key is None else sample_latent(mean, logvar, key)
    return to_model_space(z, config)


def decode_model_latents(
    config: CogVideoXConfig, params, latents: Array, tile: int = 0, overlap: int = 0
) -> Array:
    """Model-space latents (B, T', h, w, C) -> pixels (B, T, h*f, w*f, 3) in [-1, 1].

    Pure (traceable under ``jax.jit``): undoes :func:`to_model_space`, decodes with
    the chunked conv-cache decoder, in ``tile x tile`` latent tiles with ``overlap``
    if ``tile > 0`` (:func:`dfm_jax.models.autoencoder.decode_tiled`, every tile
    decoded over all frames), and clips to [-1, 1].
    """
    z = from_model_space(latents, config)
    if tile <= 0:
        return jnp.clip(decode_video(config, params, z), -1.0, 1.0)
    b, t, h, w, c = z.shape
    frames = config.decoded_frames(t)

    def decode(tile_z):  # (B, th, tw, T' * C) -> (B, th*f, tw*f, T * 3)
        zt = tile_z.reshape(*tile_z.shape[:3], t, c).transpose(0, 3, 1, 2, 4)
        x = decode_video(config, params, zt)
        return x.transpose(0, 2, 3, 1, 4).reshape(*x.shape[:1], *x.shape[2:4], -1)

    flat = z.transpose(0, 2, 3, 1, 4).reshape(b, h, w, t * c)
    x = decode_tiled(decode, flat, tile, overlap)
    x = x.reshape(*x.shape[:3], frames, config.in_channels).transpose(0, 3, 1, 2, 4)
    return jnp.clip(x, -1.0, 1.0)


_decode_jit = jax.jit(decode_model_latents, static_argnums=(0, 3, 4))


@jax.tree_util.register_pytree_node_class
class VideoCodec(BoundCodec):
    """A video autoencoder bound to its parameters (see
    :class:`dfm_jax.models.autoencoder.BoundCodec`, shared with the image ``Codec``):
    pixels (B, T, H, W, 3) <-> model-space latents (B, T', H/f, W/f, C)."""

    moments_function = staticmethod(_encode_moments)
    encode_function = staticmethod(_encode)
    decode_function = staticmethod(decode_model_latents)
    decode_jit = _decode_jit

    @classmethod
    def load(
        cls,
        name: str,
        weights: str | os.PathLike = "",
        dtype: str = "float32",
        decode_tile: int = 0,
        seed: int = 0,
    ) -> VideoCodec:
        """Build the preset ``name`` (:data:`VIDEO_PRESETS`) and load its weights.

        ``weights``: the diffusers ``vae/`` folder (``diffusion_pytorch_model.safetensors``
        and ``config.json``), the file, or the pipeline directory; its ``config.json``
        gives the architecture and scaling factor. Empty: random parameters from
        ``seed``, allowed only for "tiny-video".

        Raises:
          FileNotFoundError: no weights for a released preset, or not found (the
            message says what to download). ValueError: unknown preset or mismatch.
        """
        config = video_autoencoder_config(name, dtype=dtype)
        if not weights:
            if name != "tiny-video":
                raise FileNotFoundError(
                    f"video autoencoder {name!r} needs weights: pass the diffusers vae/ folder, "
                    f"from {VIDEO_WEIGHTS_SOURCES.get(name, 'the diffusers release')}. "
                    "Only 'tiny-video' may run with random weights."
                )
            params = init_params(config, seed)
        else:
            from dfm_jax.weights.cogvideox import load_cogvideox

            config, params = load_cogvideox(weights, name, dtype=dtype)
        return cls(config, jax.device_put(params), decode_tile)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first)."""
        return self.config.temporal_compression_ratio

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T', h, w, C) of the latent of a ``frames x height x width`` clip (frames = 1 + r k)."""
        f = self.config.downsample_factor
        return (
            self.config.latent_frames(frames),
            height // f,
            width // f,
            self.config.latent_channels,
        )

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"VideoCodec({cfg.name!r}, latent_channels={cfg.latent_channels}, "
            f"f={cfg.downsample_factor}, r={cfg.temporal_compression_ratio}, dtype={cfg.dtype}, "
            f"decode_tile={self.decode_tile})"
        )

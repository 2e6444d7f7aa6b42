"""AutoencoderKL: the Stable Diffusion VAE and the FLUX autoencoder, channel-last.

A port of diffusers' ``AutoencoderKL`` (``diffusers/models/autoencoders/autoencoder_kl.py``
with ``vae.py`` ``Encoder``/``Decoder``, ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D`` and the single-head mid-block ``Attention``) in Flax Linen, NHWC.
Same family, different sizes:

* **SD-VAE** (``stabilityai/sd-vae-ft-ema`` / ``-ft-mse``): 4 latent channels,
  ``quant_conv`` and ``post_quant_conv`` (1x1), scaling factor 0.18215.
* **FLUX AE** (``black-forest-labs/FLUX.1-dev``, diffusers ``vae/``): 16 latent
  channels, no quant convs, scaling factor 0.3611 and shift factor 0.1159.

Both: ``block_out_channels`` (128, 256, 512, 512), 2 resnets per encoder block
(3 per decoder block), GroupNorm with 32 groups and epsilon 1e-6, SiLU, a mid block
``resnet -> attention -> resnet``, downsampling factor 8.

Architecture (diffusers' names; the Flax parameter tree uses the same names with
list indices joined by ``_``, e.g. ``encoder/down_blocks_0/resnets_1/norm1/scale``;
:mod:`dfm_jax.weights.autoencoder` maps the diffusers state dict onto it):

* ``encoder``: ``conv_in`` 3x3 -> ``down_blocks_i`` (``layers_per_block`` resnets,
  then, except in the last block, ``downsamplers_0``: zero-pad bottom/right by one
  pixel and a 3x3 stride-2 conv without padding) -> ``mid_block`` ->
  ``conv_norm_out`` (GroupNorm) -> SiLU -> ``conv_out`` 3x3 to ``2 * latent_channels``
  (mean and log-variance).
* ``quant_conv`` (1x1, SD only).
* ``post_quant_conv`` (1x1, SD only).
* ``decoder``: ``conv_in`` 3x3 -> ``mid_block`` -> ``up_blocks_i`` over the reversed
  channels (``layers_per_block + 1`` resnets, then, except in the last block,
  ``upsamplers_0``: nearest-neighbour x2 and a 3x3 conv) -> ``conv_norm_out`` ->
  SiLU -> ``conv_out`` 3x3 to 3 channels.
* ``ResnetBlock2D``: ``norm1`` -> SiLU -> ``conv1`` -> ``norm2`` -> SiLU ->
  ``conv2``, plus the input (through the 1x1 ``conv_shortcut`` where the width
  changes). Dropout is zero (inference).
* mid-block ``Attention``: ``group_norm`` -> single-head attention over the H*W
  positions (``to_q``, ``to_k``, ``to_v``, ``to_out_0``; scale ``C**-0.5``, softmax
  in float32) plus the input.

Conventions
-----------
Pixels are ``(B, H, W, 3)`` float in [-1, 1]; H and W multiples of the
downsampling factor ``f`` (:attr:`AutoencoderConfig.downsample_factor`). Latents
``(B, H/f, W/f, latent_channels)``. The *raw* latent space is what the
encoder/decoder see; the *model* space, where diffusion models are trained, is
``(z - shift_factor) * scaling_factor`` (:func:`to_model_space`,
:func:`from_model_space`) as in diffusers' pipelines. Parameters are float32;
computation runs in ``config.dtype`` ("float32" or "bfloat16"), with GroupNorm
statistics and the attention softmax in float32; outputs are float32. The network
is small (84M parameters for SD/FLUX) and meant to be replicated: it carries no
logical axis names, and jitted calls with batch-sharded inputs and replicated
parameters need no annotations.

:class:`Codec` binds a configuration and parameters into jitted
``encode``/``decode`` in the model space, the object used by training, evaluation
and dataset preparation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from dfm_jax.models.cogvideox import CogVideoXConfig, VideoCodec

Array = jax.Array

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_PRECISIONS = (None, "default", "high", "highest")
#: GroupNorm epsilon of every normalisation in the network (diffusers' ``resnet_eps``).
GROUP_NORM_EPS = 1e-6
#: diffusers' clamp of the log-variance (``DiagonalGaussianDistribution``).
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and latent-space constants of an AutoencoderKL. Immutable, hashable.

    Attributes:
      name: preset name (informational; see :data:`PRESETS`).
      in_channels: image channels (3); also the decoder's output channels.
      latent_channels: latent channels C (4 for SD, 16 for FLUX).
      block_out_channels: widths of the encoder blocks (the decoder uses them reversed);
        every block but the last halves the resolution.
      layers_per_block: resnets per encoder block (decoder: one more).
      norm_num_groups: GroupNorm groups; must divide every width.
      use_quant_conv: 1x1 conv after the encoder (SD: True; FLUX: False).
      use_post_quant_conv: 1x1 conv before the decoder (SD: True; FLUX: False).
      mid_block_add_attention: attention in the mid blocks (True for SD and FLUX).
      scaling_factor: model-space latent = (z - shift_factor) * scaling_factor.
      shift_factor: see ``scaling_factor`` (0 for SD, 0.1159 for FLUX).
      dtype: computation dtype ("float32", "bfloat16" or "float16"); parameters stay
        float32, GroupNorm statistics and softmax run in float32, outputs are float32.
      precision: conv/matmul precision (None, "default", "high", "highest").
        "highest" (default) keeps float32 convolutions exact on GPUs/TPUs (no TF32 or
        bf16 passes); it does not slow bfloat16 computation.
      attention_chunk: the mid-block attention processes queries in chunks of this
        many positions (0: all at once), bounding the (B, chunk, H*W) float32 score
        matrix; at 1024 px the latent is 128 x 128 and unchunked scores take 1 GiB
        per image. The result does not depend on it.
    """

    name: str
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: str = "float32"
    precision: str | None = "highest"
    attention_chunk: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError as e:
            raise ValueError(f"AutoencoderConfig.dtype: unknown dtype {self.dtype!r}") from e
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        """Raise ValueError naming the offending field if the configuration is invalid."""

        def bad(msg: str):
            raise ValueError(f"AutoencoderConfig({self.name!r}): {msg}")

        for field in ("in_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                bad(f"{field} must be a positive integer, got {value!r}")
        if not self.block_out_channels:
            bad("block_out_channels must not be empty")
        for width in self.block_out_channels:
            if not isinstance(width, (int, np.integer)) or width < 1:
                bad(f"block_out_channels must be positive integers, got {self.block_out_channels}")
            if width % self.norm_num_groups:
                bad(f"width {width} is not divisible by norm_num_groups {self.norm_num_groups}")
        if not self.scaling_factor > 0:
            bad(f"scaling_factor must be positive, got {self.scaling_factor!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            bad(f"dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.precision not in _PRECISIONS:
            bad(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.attention_chunk, (int, np.integer)) or self.attention_chunk < 0:
            bad(f"attention_chunk must be an integer >= 0, got {self.attention_chunk!r}")


_SD = dict(
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    use_quant_conv=True,
    use_post_quant_conv=True,
    scaling_factor=0.18215,
    shift_factor=0.0,
)

#: Preset name -> keyword arguments of :class:`AutoencoderConfig` (diffusers' configs
#: of ``stabilityai/sd-vae-ft-ema``, ``stabilityai/sd-vae-ft-mse`` and the ``vae/`` of
#: ``black-forest-labs/FLUX.1-dev``; "tiny" is a random-weight model for tests and
#: demos, downsampling factor 2).
PRESETS: dict[str, dict[str, Any]] = {
    "sd-vae-ft-ema": _SD,
    "sd-vae-ft-mse": _SD,
    "flux-ae": dict(
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    "tiny": dict(
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        use_quant_conv=True,
        use_post_quant_conv=True,
        scaling_factor=0.5,
        shift_factor=0.1,
    ),
}

#: Video autoencoders (:data:`dfm_jax.models.cogvideox.VIDEO_PRESETS`): :meth:`Codec.load`
#: builds them as a :class:`dfm_jax.models.cogvideox.VideoCodec` (same methods).
VIDEO_PRESET_NAMES = ("cogvideox-2b", "cogvideox-5b", "tiny-video")

#: Where the weights of each released preset are published (diffusers layout).
WEIGHTS_SOURCES = {
    "sd-vae-ft-ema": "https://huggingface.co/stabilityai/sd-vae-ft-ema "
    "(diffusion_pytorch_model.safetensors)",
    "sd-vae-ft-mse": "https://huggingface.co/stabilityai/sd-vae-ft-mse "
    "(diffusion_pytorch_model.safetensors)",
    "flux-ae": "https://huggingface.co/black-forest-labs/FLUX.1-dev "
    "(vae/diffusion_pytorch_model.safetensors; the top-level ae.safetensors is the original "
    "BFL layout, not the diffusers one)",
}


def autoencoder_config(name: str, **overrides: Any) -> AutoencoderConfig:
    """The :class:`AutoencoderConfig` of a preset, with any field overridden by keyword.

    Names: "sd-vae-ft-ema", "sd-vae-ft-mse", "flux-ae", "tiny" (see :data:`PRESETS`).

    Raises:
      ValueError: unknown name (the message lists the valid ones) or invalid fields.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder {name!r}; expected one of {sorted(PRESETS)}")
    return AutoencoderConfig(name=name, **{**PRESETS[name], **overrides})


def preset_config(name: str, **overrides: Any) -> AutoencoderConfig | CogVideoXConfig:
    """The config of any preset, image (:func:`autoencoder_config`) or video
    (:data:`VIDEO_PRESET_NAMES`: a :class:`dfm_jax.models.cogvideox.CogVideoXConfig`).

    Both have ``name``, ``latent_channels``, ``downsample_factor``, ``scaling_factor``,
    ``shift_factor`` and ``dtype``; video configs add ``latent_frames(frames)``.
    """
    if name in VIDEO_PRESET_NAMES:
        from dfm_jax.models.cogvideox import video_autoencoder_config

        return video_autoencoder_config(name, **overrides)
    if name not in PRESETS:
        raise ValueError(
            f"unknown autoencoder {name!r}; expected one of "
            f"{sorted((*PRESETS, *VIDEO_PRESET_NAMES))}"
        )
    return autoencoder_config(name, **overrides)


# ----------------------------------------------------------------------------
# Latent-space helpers
# ----------------------------------------------------------------------------


def to_model_space(z: Array, config: AutoencoderConfig) -> Array:
    """Raw latent -> model space: ``(z - shift_factor) * scaling_factor`` (any shape)."""
    return (z - config.shift_factor) * config.scaling_factor


def from_model_space(z: Array, config: AutoencoderConfig) -> Array:
    """Model space -> raw latent: ``z / scaling_factor + shift_factor`` (any shape)."""
    return z / config.scaling_factor + config.shift_factor


def posterior_std(logvar: Array) -> Array:
    """Standard deviation of the posterior: ``exp(0.5 * clip(logvar, -30, 20))``.

    The clamp is diffusers' ``DiagonalGaussianDistribution``'s. Same shape as ``logvar``.
    """
    return jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))


def sample_latent(mean: Array, logvar: Array, key: Array) -> Array:
    """A sample ``mean + posterior_std(logvar) * N(0, 1)`` of the posterior (raw space).

    Args:
      mean, logvar: (B, h, w, C) moments from :meth:`AutoencoderKL.encode`.
      key: a JAX PRNG key.

    Returns:
      (B, h, w, C) in the dtype of ``mean``.
    """
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean + posterior_std(logvar) * noise).astype(mean.dtype)


# ----------------------------------------------------------------------------
# Tiled decoding
# ----------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles covering [0, size) with at least ``overlap`` overlap."""
    if tile >= size:
        return [0]
    n = -(-(size - tile) // (tile - overlap)) + 1
    return [(i * (size - tile)) // (n - 1) for i in range(n)]


def _blend_weights(n: int, tile: int, ramp: int) -> np.ndarray:
    """(n, tile) weights of n tiles in a row: linear ramps of ``ramp`` samples on the
    interior edges, 1 elsewhere."""
    w = np.ones((n, tile), np.float32)
    if ramp > 0 and n > 1:
        up = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        w[1:, :ramp] *= up
        w[:-1, tile - ramp :] *= up[::-1]
    return w


def decode_tiled(decode_fn: Callable[[Array], Array], z: Array, tile: int, overlap: int) -> Array:
    """Decode a large latent in overlapping tiles, blended linearly across the seams.

    The latent is covered by equal ``tile x tile`` tiles (fewer along a side not
    longer than ``tile``), spaced evenly so that neighbours overlap by at least
    ``overlap`` latent pixels (the last tile ends at the border). Each tile is
    decoded by ``decode_fn`` (one trace, run sequentially with ``jax.lax.map``, so
    the decoder's activation memory is that of one tile), and the decoded tiles are averaged with
    weights that ramp linearly across the first and last ``overlap * f`` pixels of
    every interior tile edge (f: the decoder's upsampling factor, read from the
    first tile's output) and are 1 elsewhere. This is diffusers' ``tiled_decode``
    blending in latent-tile units, with equal tiles (one compile) and a normalised
    weighted average instead of a crop.

    Tiles see only their own latent pixels, so the result differs from a whole
    decode near the seams (receptive field, zero padding) and, since GroupNorm
    normalises with per-image statistics, slightly everywhere (diffusers' tiling has
    the same limits). For a decoder whose output pixels depend only on their own
    latent pixel it equals the whole decode exactly.

    Args:
      decode_fn: raw or model-space latent (B, th, tw, C) -> pixels (B, th*f, tw*f, K),
        traceable (e.g. :attr:`Codec.decode_fn` or a ``functools.partial`` of
        :meth:`AutoencoderKL.decode` via ``apply``).
      z: (B, h, w, C) latent.
      tile: tile side in latent pixels; 0, or ``tile >= max(h, w)``, decodes whole.
      overlap: overlap in latent pixels, ``0 <= overlap < tile``.

    Returns:
      (B, h*f, w*f, K), the dtype of ``decode_fn``'s output.
    """
    _, h, w, _ = z.shape
    if tile <= 0 or tile >= max(h, w):
        return decode_fn(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"decode_tiled: need 0 <= overlap < tile, got {overlap=}, {tile=}")
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    tiles = jnp.stack([z[:, y : y + th, x : x + tw] for y in ys for x in xs])  # (T,B,th,tw,C)
    out = jax.lax.map(decode_fn, tiles)  # (T, B, th*f, tw*f, K)
    f = out.shape[2] // th
    if out.shape[2] != th * f or out.shape[3] != tw * f:
        raise ValueError(
            f"decode_tiled: decode_fn mapped a {th}x{tw} tile to {out.shape[2]}x{out.shape[3]}"
        )
    wy = _blend_weights(len(ys), th * f, overlap * f)
    wx = _blend_weights(len(xs), tw * f, overlap * f)
    b, k = out.shape[1], out.shape[-1]
    acc = jnp.zeros((b, h * f, w * f, k), jnp.float32)
    norm = np.zeros((h * f, w * f), np.float32)
    t = 0
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            wt = wy[i][:, None] * wx[j][None, :]
            ys_, xs_ = slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f)
            acc = acc.at[:, ys_, xs_].add(out[t].astype(jnp.float32) * wt[None, :, :, None])
            norm[ys_, xs_] += wt
            t += 1
    return (acc / norm[None, :, :, None]).astype(out.dtype)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """torch ``GroupNorm`` over channel-last input, statistics in float32.

    Normalises each of ``num_groups`` channel groups over all positions and the
    group's channels (biased variance, two-pass), then applies the per-channel
    affine ``scale``/``bias`` (float32 parameters). Call: (B, ..., C) -> same shape,
    in ``dtype``.
    """

    num_groups: int
    epsilon: float = GROUP_NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # positions and channels within a group
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class _Layer(nn.Module):
    """Shared configuration of the layers."""

    config: AutoencoderConfig

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def conv(self, features: int, kernel: int, name: str, strides: int = 1, padding=None):
        pad = kernel // 2 if padding is None else padding
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)) if isinstance(pad, int) else pad,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            precision=self.config.precision,
            name=name,
        )

    def norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.config.norm_num_groups, dtype=self.dtype, name=name)


class ResnetBlock(_Layer):
    """diffusers ``ResnetBlock2D`` without time embedding: (B, H, W, C_in) -> (B, H, W, out)."""

    out_channels: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = self.conv(self.out_channels, 3, "conv1")(nn.silu(self.norm("norm1")(x)))
        h = self.conv(self.out_channels, 3, "conv2")(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class Attention(_Layer):
    """Single-head self-attention over positions with GroupNorm and a residual.

    diffusers' mid-block ``Attention`` (``heads=1``, ``dim_head=C``, ``bias=True``,
    ``residual_connection=True``, ``rescale_output_factor=1``). Scores and softmax
    in float32; queries processed in chunks of ``config.attention_chunk``.
    Call: (B, H, W, C) -> (B, H, W, C).
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        dense = functools.partial(
            nn.Dense,
            c,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            precision=self.config.precision,
        )
        h = self.norm("group_norm")(x).reshape(b, hh * ww, c)
        q = dense(name="to_q")(h)
        k = dense(name="to_k")(h)
        v = dense(name="to_v")(h)
        precision = self.config.precision
        scale = 1.0 / math.sqrt(c)

        def attend(qc: Array) -> Array:  # (B, L, C) -> (B, L, C)
            s = jnp.einsum(
                "bqc,bkc->bqk", qc, k, precision=precision, preferred_element_type=jnp.float32
            )
            p = jax.nn.softmax(s * scale, axis=-1).astype(v.dtype)
            return jnp.einsum("bqk,bkc->bqc", p, v, precision=precision)

        n, chunk = hh * ww, self.config.attention_chunk
        if chunk <= 0 or n <= chunk:
            o = attend(q)
        else:
            m = -(-n // chunk)
            qp = jnp.pad(q, ((0, 0), (0, m * chunk - n), (0, 0)))
            qp = qp.reshape(b, m, chunk, c).transpose(1, 0, 2, 3)
            o = jax.lax.map(attend, qp).transpose(1, 0, 2, 3).reshape(b, m * chunk, c)[:, :n]
        o = dense(name="to_out_0")(o).reshape(b, hh, ww, c)
        return x + o


class Downsample(_Layer):
    """Zero-pad bottom and right by one, 3x3 conv stride 2 (``Downsample2D``, padding 0)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x.shape[-1], 3, "conv", strides=2, padding=0)(x)


class Upsample(_Layer):
    """Nearest-neighbour x2, then a 3x3 conv (``Upsample2D``)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x.shape[-1], 3, "conv")(x)


class MidBlock(_Layer):
    """``resnets_0`` -> ``attentions_0`` (if enabled) -> ``resnets_1`` at constant width."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        x = ResnetBlock(self.config, c, name="resnets_0")(x)
        if self.config.mid_block_add_attention:
            x = Attention(self.config, name="attentions_0")(x)
        return ResnetBlock(self.config, c, name="resnets_1")(x)


class DownBlock(_Layer):
    """``DownEncoderBlock2D``: ``layers_per_block`` resnets (``resnets_j``) to ``out_channels``,
    then ``downsamplers_0`` if ``downsample``. (B, H, W, C) -> (B, H', W', out_channels)."""

    out_channels: int = 0
    downsample: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.config.layers_per_block):
            x = ResnetBlock(self.config, self.out_channels, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample(self.config, name="downsamplers_0")(x)
        return x


class UpBlock(_Layer):
    """``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets (``resnets_j``) to
    ``out_channels``, then ``upsamplers_0`` if ``upsample``. (B, H, W, C) -> (B, H', W',
    out_channels)."""

    out_channels: int = 0
    upsample: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.config.layers_per_block + 1):
            x = ResnetBlock(self.config, self.out_channels, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample(self.config, name="upsamplers_0")(x)
        return x


class Encoder(_Layer):
    """Pixels (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        widths = cfg.block_out_channels
        x = self.conv(widths[0], 3, "conv_in")(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = DownBlock(cfg, width, not last, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = nn.silu(self.norm("conv_norm_out")(x))
        return self.conv(2 * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(_Layer):
    """Raw latent (B, h, w, latent_channels) -> pixels (B, h*f, w*f, in_channels)."""

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        widths = tuple(reversed(cfg.block_out_channels))
        x = self.conv(widths[0], 3, "conv_in")(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = UpBlock(cfg, width, not last, name=f"up_blocks_{i}")(x)
        x = nn.silu(self.norm("conv_norm_out")(x))
        return self.conv(cfg.in_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (SD-VAE, FLUX AE), channel-last. See the module docstring.

    Attributes:
      config: the :class:`AutoencoderConfig`.

    Methods (use with ``apply(..., method=...)``):
      encode: pixels (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, C),
        raw latent space, float32.
      decode: raw latent (B, h, w, C) -> pixels (B, h*f, w*f, 3), float32, not clipped.
      __call__: encode then decode (the mean, or a posterior sample if ``rng`` is
        given); used to initialise the parameters.
    """

    config: AutoencoderConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

        def conv1x1(features: int):
            return nn.Conv(
                features,
                (1, 1),
                dtype=dtype,
                param_dtype=jnp.float32,
                precision=cfg.precision,
            )

        if cfg.use_quant_conv:
            self.quant_conv = conv1x1(2 * cfg.latent_channels)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv1x1(cfg.latent_channels)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Pixels (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, C), float32.

        Raw latent space (before scaling and shift). ``logvar`` is clamped to
        [-30, 20] as diffusers' ``latent_dist.logvar``. H and W must be multiples of f.
        """
        cfg = self.config
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected pixels (B, H, W, {cfg.in_channels}), got shape {x.shape}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                f"autoencoder's downsampling factor {f}"
            )
        h = self.encoder(x.astype(cfg.dtype))
        if cfg.use_quant_conv:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """Raw latent (B, h, w, C) -> pixels (B, h*f, w*f, 3), float32, not clipped."""
        cfg = self.config
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"expected latents (B, h, w, {cfg.latent_channels}), got {z.shape}")
        z = z.astype(cfg.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, rng: Array | None = None) -> Array:
        """Encode, then decode the mean (or a posterior sample drawn with ``rng``)."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else sample_latent(mean, logvar, rng)
        return self.decode(z)


def init_params(config: AutoencoderConfig, seed: int = 0) -> dict[str, Any]:
    """Random float32 parameters of ``AutoencoderKL(config)``, drawn with numpy.

    Kernels ``N(0, 1 / fan_in)`` (fan_in: all kernel axes but the output one, as
    Flax's ``lecun_normal``), GroupNorm scales 1, biases 0. Built from
    :func:`abstract_params`, so nothing is compiled. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)
        return np.full(spec.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def abstract_params(config: AutoencoderConfig) -> dict[str, Any]:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the parameters, without computing."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"]


# ----------------------------------------------------------------------------
# Codec: a bound autoencoder
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _encode_moments(config: AutoencoderConfig, params, pixels: Array) -> tuple[Array, Array]:
    mean, logvar = AutoencoderKL(config).apply({"params": params}, pixels, method="encode")
    return mean, posterior_std(logvar)


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: AutoencoderConfig, params, pixels: Array, key: Array | None) -> Array:
    mean, logvar = AutoencoderKL(config).apply({"params": params}, pixels, method="encode")
    z = mean if key is None else sample_latent(mean, logvar, key)
    return to_model_space(z, config)


def decode_model_latents(
    config: AutoencoderConfig, params, latents: Array, tile: int = 0, overlap: int = 0
) -> Array:
    """Model-space latents (B, h, w, C) -> pixels (B, h*f, w*f, 3) in [-1, 1], float32.

    Pure (traceable under ``jax.jit``): undoes :func:`to_model_space`, decodes (in
    ``tile``-sized latent tiles with ``overlap`` if ``tile > 0``, see
    :func:`decode_tiled`) and clips to [-1, 1].
    """
    model = AutoencoderKL(config)

    def decode(z):
        return model.apply({"params": params}, from_model_space(z, config), method="decode")

    return jnp.clip(decode_tiled(decode, latents, tile, overlap), -1.0, 1.0)


_decode_jit = jax.jit(decode_model_latents, static_argnums=(0, 3, 4))


class BoundCodec:
    """An autoencoder bound to its parameters: jitted encode/decode in the model space.

    A pytree (the parameters are its leaves; config and tiling are static), so a codec
    can be passed into ``jax.jit``-ed functions as an argument, where its methods and
    :attr:`decode_fn` trace with the parameters as inputs. (Closing a jitted function
    over a codec instead embeds the parameters in the compiled program as constants --
    fine for "tiny", slow to compile for the 84M-parameter real models.) Inputs may be
    batch-sharded; parameters are used as given (typically replicated).

    The shared part of :class:`Codec` (images) and
    :class:`dfm_jax.models.cogvideox.VideoCodec` (videos): subclasses set the module's
    pure functions ``(config, params, ...)`` below and register as pytree nodes.

    Attributes:
      config: the architecture.
      params: float32 parameters of the autoencoder module.
      decode_tile: decode in spatial tiles of this many latent pixels (0: whole), see
        :func:`decode_tiled`.
      decode_overlap: tile overlap in latent pixels (default ``decode_tile // 4``).
    """

    #: ``(config, params, pixels) -> (mean, std)`` in raw latent space.
    moments_function: ClassVar[Callable]
    #: ``(config, params, pixels, key | None) -> model-space latents``.
    encode_function: ClassVar[Callable]
    #: ``(config, params, latents, tile=, overlap=) -> pixels``, traceable.
    decode_function: ClassVar[Callable]
    #: the same, jitted with config, tile and overlap static.
    decode_jit: ClassVar[Callable]

    def __init__(self, config, params, decode_tile: int = 0, decode_overlap: int | None = None):
        self.config = config
        self.params = params
        self.decode_tile = int(decode_tile)
        self.decode_overlap = (
            max(self.decode_tile // 4, 0) if decode_overlap is None else int(decode_overlap)
        )
        if self.decode_tile > 0 and not 0 <= self.decode_overlap < self.decode_tile:
            raise ValueError(
                f"{type(self).__name__}: need 0 <= decode_overlap < decode_tile, got "
                f"{self.decode_overlap}, {self.decode_tile}"
            )

    def tree_flatten(self):
        return (self.params,), (self.config, self.decode_tile, self.decode_overlap)

    @classmethod
    def tree_unflatten(cls, aux, children):
        config, tile, overlap = aux
        return cls(config, children[0], tile, overlap)

    def replicated(self, mesh: jax.sharding.Mesh):
        """The same codec with its parameters replicated over ``mesh`` (every device)."""
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put(self.params, sharding)
        return type(self)(self.config, params, self.decode_tile, self.decode_overlap)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return self.config.downsample_factor

    def encode_moments(self, pixels: Array) -> tuple[Array, Array]:
        """Pixels (B, [T,] H, W, 3) in [-1, 1] -> (mean, std) latents, raw space."""
        return type(self).moments_function(self.config, self.params, pixels)

    def encode(self, pixels: Array, key: Array | None = None) -> Array:
        """Pixels (B, [T,] H, W, 3) in [-1, 1] -> model-space latents, float32.

        The posterior mean if ``key`` is None, else a posterior sample.
        """
        return type(self).encode_function(self.config, self.params, pixels, key)

    def decode(self, latents: Array) -> Array:
        """Model-space latents (B, [T',] h, w, C) -> pixels (B, [T,] h*f, w*f, 3) in [-1, 1]."""
        decode = type(self).decode_jit
        return decode(self.config, self.params, latents, self.decode_tile, self.decode_overlap)

    def __call__(self, latents: Array) -> Array:
        """Traceable :meth:`decode`: use it inside a jitted function that takes the codec
        as an argument (``jax.jit(lambda codec, z: codec(z))(codec, z)``)."""
        return self.decode_fn(latents)

    @property
    def decode_fn(self) -> Callable[[Array], Array]:
        """A pure function model-space latents -> clipped pixels, closing over the params.

        Traceable inside callers' ``jax.jit`` (see the class docstring about passing
        the codec as an argument rather than closing over it).
        """
        return functools.partial(
            type(self).decode_function,
            self.config,
            self.params,
            tile=self.decode_tile,
            overlap=self.decode_overlap,
        )


@jax.tree_util.register_pytree_node_class
class Codec(BoundCodec):
    """An image autoencoder (:class:`AutoencoderConfig`) bound to its parameters (see
    :class:`BoundCodec`): pixels (B, H, W, 3) <-> model-space latents (B, H/f, W/f, C)."""

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
    ) -> Codec | VideoCodec:
        """Build the preset ``name`` and load its weights.

        A video preset (:data:`VIDEO_PRESET_NAMES`) gives a
        :class:`dfm_jax.models.cogvideox.VideoCodec` (:meth:`VideoCodec.load
        <dfm_jax.models.cogvideox.VideoCodec.load>`; random weights only for "tiny-video").

        Args:
          name: a preset of :data:`PRESETS`.
          weights: diffusers ``diffusion_pytorch_model.safetensors`` (or the directory
            holding it, or a diffusers pipeline directory with a ``vae/`` subfolder).
            Empty: random parameters from ``seed``, allowed only for "tiny".
          dtype: computation dtype (parameters stay float32).
          decode_tile: see :class:`Codec`.
          seed: initialisation seed for random "tiny" parameters.

        Raises:
          FileNotFoundError: no weights given for a real preset, or not found (the
            message says where to download them).
          ValueError: unknown preset, or weights not matching the preset.
        """
        if name in VIDEO_PRESET_NAMES:
            from dfm_jax.models.cogvideox import VideoCodec

            return VideoCodec.load(name, weights, dtype, decode_tile, seed)
        config = autoencoder_config(name, dtype=dtype)
        if not weights:
            if name != "tiny":
                raise FileNotFoundError(
                    f"autoencoder {name!r} needs weights: pass the diffusers-layout "
                    "diffusion_pytorch_model.safetensors (or its directory), from "
                    f"{WEIGHTS_SOURCES.get(name, 'the diffusers release of the model')}. "
                    "Only 'tiny' may run with random weights."
                )
            params = init_params(config, seed)
        else:
            from dfm_jax.weights.autoencoder import load_autoencoder_params

            params = load_autoencoder_params(weights, config)
        return cls(config, jax.device_put(params), decode_tile)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of the latent of an ``height x width`` image."""
        f = self.config.downsample_factor
        return height // f, width // f, self.config.latent_channels

    def __repr__(self) -> str:
        return (
            f"Codec({self.config.name!r}, latent_channels={self.config.latent_channels}, "
            f"f={self.config.downsample_factor}, dtype={self.config.dtype}, "
            f"decode_tile={self.decode_tile})"
        )

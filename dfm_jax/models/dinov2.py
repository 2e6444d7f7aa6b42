"""DINOv2 vision transformers (Oquab et al., 2023) for FDD, the Frechet distance on DINOv2.

The architecture of facebookresearch/dinov2 ``vision_transformer.py`` (and of
transformers' ``Dinov2Model``), channel-last:

1. Patch embedding: Conv p x p, stride p (p = 14), VALID (pixels past the last full
   patch are dropped, as PyTorch's Conv2d does). Tokens row-major (B, gh*gw, D).
2. Prepend the CLS token, add learned position embeddings (``pos_embed``, (1, 1+M*M,
   D) for an M x M grid, M = 37 = 518/14 for the released models), bicubically
   interpolated to the token grid; then insert ``num_register_tokens`` register
   tokens after CLS (DINOv2-with-registers; 0 for the plain models).
3. ``depth`` pre-norm blocks: ``x += ls1 * attn(norm1(x))``, ``x += ls2 * ffn(norm2(x))``
   with LayerScale vectors ``gamma``, LayerNorm eps 1e-6 (two-pass variance, as
   PyTorch), multi-head attention with a fused qkv projection (scale head_dim^-0.5),
   and FFN either an MLP (fc1, exact erf GELU, fc2) or, for ViT-g, the fused SwiGLU
   (``w12`` -> chunks (x1, x2) -> ``silu(x1) * x2`` -> ``w3``, hidden
   ``ceil8(int(2/3 * int(4 D)))``).
4. Final LayerNorm ``norm``. The FDD feature is the CLS token after it (the
   official ``x_norm_clstoken``; transformers' ``pooler_output``).

Position-embedding interpolation
--------------------------------
``interpolate_pos_embed`` reproduces the official ``interpolate_pos_encoding``: no
interpolation when the token count equals M*M and the image is square; otherwise
PyTorch ``F.interpolate(mode="bicubic", align_corners=False)`` of the M x M table,
in float32, either with ``scale_factor = (g + offset) / M`` (the plain models:
``interpolate_offset=0.1``, the "historical kludge" of DINO -- note that PyTorch then
samples at ``(i + 0.5) * M / (g + 0.1) - 0.5``, not at ``M / g`` steps) or with
``size = g`` (``interpolate_offset=0``: transformers >= 5's ``Dinov2Model`` and the
register models), and with ``antialias`` (True for the register models). The
resampling is a pair of constant (out, in) matrices built in numpy
(``bicubic_weights``) that follow PyTorch's CPU kernels: Keys cubic a = -0.75 with
border-clamped taps without antialiasing; PIL-style a = -0.5 filter stretched by the
downscale factor and normalised with it.

FDD preprocessing (``fdd_preprocess``)
--------------------------------------
dgm-eval's DINOv2 encoder (Stein et al., 2023) loads the official torch-hub model
and transforms PIL images with ``Resize((224, 224), BICUBIC)``, ``ToTensor()`` and
the ImageNet ``Normalize``. PIL's bicubic is the antialiased a = -0.5 filter, whose
floating-point twin is ``F.interpolate(mode="bicubic", antialias=True)``; so images
in [-1, 1] are mapped to [0, 1], resized that way (``antialias=False`` gives plain
``F.interpolate`` bicubic instead), clipped to [0, 1] (PIL's uint8 output is) and
normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). What remains
different from dgm-eval is PIL's uint8 arithmetic: it rounds (and clips) after each
1-D pass, about one grey level on natural images; PyTorch's plain bicubic
(a = -0.75, no antialiasing) is several grey levels off and aliases when
downsampling.

Parameter tree (names mirror the official state dict): ``patch_embed/proj/{kernel
(p, p, C, D), bias}``, ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1+M*M, D),
``register_tokens`` (1, R, D) if R > 0, ``blocks_{i}/{norm1, attn/qkv, attn/proj,
ls1/gamma, norm2, mlp/{fc1, fc2} or mlp/{w12, w3}, ls2/gamma}``, ``norm/{scale,
bias}``. Dense kernels are (in, out). ``dfm_jax.weights.dinov2`` imports the released
checkpoints into it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: ImageNet normalisation of the DINOv2 preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Input resolution of the FDD feature extractor (dgm-eval).
FDD_RESOLUTION = 224

#: Released DINOv2 models: width, depth, heads, ffn (all patch 14, head dim 64).
DINOV2_SIZES: dict[str, tuple[int, int, int, str]] = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}

_FFNS = ("mlp", "swiglu")
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_PRECISIONS = (None, "default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """Architecture of a DINOv2 ViT. Immutable and hashable; validated on construction.

    Attributes:
      width: hidden size D.
      depth: number of blocks.
      num_heads: attention heads; D must be divisible by it.
      patch_size: p (14 for the released models).
      in_channels: image channels (3).
      mlp_ratio: FFN expansion; MLP hidden ``int(D * mlp_ratio)``, SwiGLU hidden
        ``ceil8(int(2/3 * int(D * mlp_ratio)))``.
      ffn: "mlp" (fc1-GELU-fc2) or "swiglu" (the fused SwiGLU of ViT-g).
      num_register_tokens: register tokens R inserted after CLS (0: plain models).
      pos_grid: side M of the learned position-embedding grid (37 = 518/14).
      interpolate_offset: the official kludge: interpolate the position table with
        ``scale_factor = (g + offset) / M`` (0.1 for the plain models); 0 uses
        ``size = g`` (register models; transformers >= 5 for all models).
      interpolate_antialias: antialiased bicubic for the position table (register
        models).
      layer_norm_eps: LayerNorm epsilon.
      dtype: computation dtype ("float32", "bfloat16" or "float16"); LayerNorm
        statistics, softmax and the position interpolation stay in float32.
      precision: matmul/conv precision (None, "default", "high", "highest").
        "highest" (default) keeps float32 matmuls exact on TPU/GPU, as PyTorch's
        reference features are.
    """

    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 14
    in_channels: int = 3
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    num_register_tokens: int = 0
    pos_grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    precision: str | None = "highest"

    def __post_init__(self):
        try:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        except TypeError as e:
            raise ValueError(f"DINOv2Config.dtype: unknown dtype {self.dtype!r}") from e
        self.validate()

    @property
    def head_dim(self) -> int:
        """Per-head dimension D // num_heads."""
        return self.width // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """Hidden size of the FFN (per branch for SwiGLU)."""
        hidden = int(self.width * self.mlp_ratio)
        if self.ffn == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def validate(self) -> None:
        """Raise ValueError naming the offending field if the configuration is invalid."""

        def bad(msg: str):
            raise ValueError(f"DINOv2Config: {msg}")

        for field in ("width", "depth", "num_heads", "patch_size", "in_channels", "pos_grid"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                bad(f"{field} must be a positive integer, got {value!r}")
        if self.width % self.num_heads:
            bad(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not self.mlp_ratio > 0 or self.ffn_hidden < 1:
            bad(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.ffn not in _FFNS:
            bad(f"ffn must be one of {_FFNS}, got {self.ffn!r}")
        if not isinstance(self.num_register_tokens, (int, np.integer)) or (
            self.num_register_tokens < 0
        ):
            bad(f"num_register_tokens must be >= 0, got {self.num_register_tokens!r}")
        if not self.interpolate_offset >= 0:
            bad(f"interpolate_offset must be >= 0, got {self.interpolate_offset!r}")
        if not self.layer_norm_eps > 0:
            bad(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            bad(f"dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.precision not in _PRECISIONS:
            bad(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")


def dinov2_config(name: str, **overrides: Any) -> DINOv2Config:
    """The ``DINOv2Config`` of a released model.

    Names: "vits14", "vitb14", "vitl14", "vitg14" (width/depth/heads 384/12/6,
    768/12/12, 1024/24/16, 1536/40/24; ViT-g with the SwiGLU FFN), optionally with
    the suffix "_reg" for the models with 4 registers (which interpolate positions
    with ``size`` and antialiasing). Any field can be overridden by keyword.
    """
    arch, reg, rest = name.partition("_reg")
    if arch not in DINOV2_SIZES or rest:
        raise ValueError(
            f"unknown DINOv2 model {name!r}; expected one of {sorted(DINOV2_SIZES)}, "
            "optionally with '_reg'"
        )
    width, depth, heads, ffn = DINOV2_SIZES[arch]
    kwargs: dict[str, Any] = dict(width=width, depth=depth, num_heads=heads, ffn=ffn)
    if reg:
        kwargs.update(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    kwargs.update(overrides)
    return DINOv2Config(**kwargs)


# ----------------------------------------------------------------------------
# Bicubic resampling (PyTorch F.interpolate semantics)
# ----------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a at distances x, in float32."""
    x = np.abs(np.asarray(x, np.float32))
    a = np.float32(a)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def bicubic_weights(
    in_size: int,
    out_size: int,
    *,
    antialias: bool = False,
    scale_factor: float | None = None,
) -> np.ndarray:
    """Resampling matrix of 1-D bicubic ``F.interpolate(align_corners=False)``.

    Without antialiasing (PyTorch ``upsample_bicubic2d``): output i samples the
    source coordinate ``s = scale * (i + 0.5) - 0.5`` with taps floor(s) - 1 ...
    floor(s) + 2 clamped to the border and Keys weights with a = -0.75. With
    antialiasing (``_upsample_bicubic2d_aa``, PIL's filter): the a = -0.5 kernel,
    stretched by ``scale`` when downsampling, over the taps within its support
    around ``scale * (i + 0.5)``, normalised to sum 1. ``scale`` is
    ``1 / scale_factor`` when a scale factor is given (PyTorch then uses it for the
    coordinates although the output size is ``floor(in_size * scale_factor)``),
    else ``in_size / out_size``.

    Coordinates and weights are rounded to float32 where PyTorch's CPU kernels round
    them: with exact (float64) coordinates the result moves by up to ~1e-4 (e.g.
    256 -> 224 on white noise); with PyTorch's rounding the weights agree to ~1e-6.

    Args:
      in_size, out_size: lengths of the input and output axes.
      antialias: PyTorch's ``antialias`` flag.
      scale_factor: PyTorch's ``scale_factor`` for this axis, or None.

    Returns:
      (out_size, in_size) float64 (holding float32 values); output = weights @ input
      along the axis.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    f32 = np.float32
    scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
    w = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if not antialias:
        # One rounding of scale * (i + 0.5) - 0.5: PyTorch's kernel is built with FMA.
        src = (float(scale) * (rows + 0.5) - 0.5).astype(f32)
        base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        t = np.clip(src - base.astype(f32), f32(0), f32(1))
        for k in range(4):
            cols = np.clip(base - 1 + k, 0, in_size - 1)
            np.add.at(w, (rows, cols), _cubic(t + f32(1 - k), -0.75))
        return w
    support = f32(2.0 * scale) if scale >= 1.0 else f32(2.0)
    invscale = f32(1.0 / scale) if scale >= 1.0 else f32(1.0)
    max_taps = math.ceil(support) * 2 + 1
    for i in rows:
        center = f32(float(scale) * (i + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)  # int() truncates like C++
        hi = min(int(float(center) + float(support) + 0.5), in_size, lo + max_taps)
        cols = np.arange(lo, hi)
        dist = ((cols - center).astype(f32).astype(np.float64) + 0.5) * float(invscale)
        taps = _cubic(dist, -0.5)
        total = taps.sum(dtype=f32)
        w[i, cols] = taps / total if total != 0 else taps
    return w


def bicubic_resize(
    x: Array,
    size: tuple[int, int],
    *,
    antialias: bool = False,
    precision: str | None = "highest",
) -> Array:
    """Bicubic resize of channel-last images, as ``F.interpolate(mode="bicubic")``.

    Matches ``torch.nn.functional.interpolate(x, size, mode="bicubic",
    align_corners=False, antialias=antialias)`` (see ``bicubic_weights``); values
    are not clipped (bicubic overshoots). Note ``jax.image.resize``'s "bicubic" is
    the a = -0.5 kernel with renormalised borders and does not match it.

    Args:
      x: (..., H, W, C).
      size: output (h, w).
      antialias: PyTorch's antialias flag (PIL-style filtering when downsampling).
      precision: matmul precision of the two resampling contractions.

    Returns:
      (..., h, w, C) in x's floating dtype (float32 for integer input).
    """
    *_, in_h, in_w, _ = x.shape
    out_h, out_w = size
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    wh = jnp.asarray(bicubic_weights(in_h, out_h, antialias=antialias), x.dtype)
    ww = jnp.asarray(bicubic_weights(in_w, out_w, antialias=antialias), x.dtype)
    x = jnp.einsum("oh,...hwc->...owc", wh, x, precision=precision)
    return jnp.einsum("pw,...owc->...opc", ww, x, precision=precision)


def interpolate_pos_embed(
    pos_embed: Array,
    grid: tuple[int, int],
    image_hw: tuple[int, int],
    *,
    offset: float,
    antialias: bool,
) -> Array:
    """Position embeddings for a token grid, as the official ``interpolate_pos_encoding``.

    Args:
      pos_embed: (1, 1 + M*M, D), CLS position first.
      grid: token grid (gh, gw).
      image_hw: input image (H, W) in pixels (the square test uses the image).
      offset: ``interpolate_offset`` (> 0: scale factors (g + offset) / M; 0: sizes).
      antialias: ``interpolate_antialias``.

    Returns:
      (1, 1 + gh*gw, D) float32.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    gh, gw = grid
    pos_embed = pos_embed.astype(jnp.float32)
    if gh * gw == n and image_hw[0] == image_hw[1]:
        return pos_embed
    sf_h = (gh + offset) / m if offset else None
    sf_w = (gw + offset) / m if offset else None
    wh = bicubic_weights(m, gh, antialias=antialias, scale_factor=sf_h)
    ww = bicubic_weights(m, gw, antialias=antialias, scale_factor=sf_w)
    table = pos_embed[0, 1:].reshape(m, m, -1)
    table = jnp.einsum(
        "hm,wn,mnd->hwd",
        jnp.asarray(wh, jnp.float32),
        jnp.asarray(ww, jnp.float32),
        table,
        precision="highest",
    )
    return jnp.concatenate([pos_embed[:, :1], table.reshape(1, gh * gw, -1)], axis=1)


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------

_trunc_normal = nn.initializers.truncated_normal(0.02)


def _dense(features: int, name: str, cfg: DINOv2Config) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=cfg.dtype,
        precision=cfg.precision,
        kernel_init=_trunc_normal,
        name=name,
    )


def _layer_norm(name: str, cfg: DINOv2Config) -> nn.LayerNorm:
    # Two-pass variance (E[(x - mean)^2]) as PyTorch, not flax's fast E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, use_fast_variance=False, name=name
    )


class PatchEmbed(nn.Module):
    """Conv p x p, stride p, VALID (parameter ``proj``). (B, H, W, C) -> (B, gh*gw, D)."""

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        p = cfg.patch_size
        x = nn.Conv(
            cfg.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=cfg.dtype,
            precision=cfg.precision,
            name="proj",
        )(x)
        b, gh, gw, d = x.shape
        return x.reshape(b, gh * gw, d)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` (D -> 3D) and ``proj`` (D -> D).

    The qkv output is laid out (3, heads, head_dim) as the official model's
    ``reshape(B, N, 3, heads, head_dim)``. Softmax in float32.

    Call: (B, L, D) -> (B, L, D).
    """

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        b, length, d = x.shape
        qkv = _dense(3 * d, "qkv", cfg)(x).reshape(b, length, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, N, H)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=cfg.precision)
        logits = logits.astype(jnp.float32) * cfg.head_dim**-0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v, precision=cfg.precision)
        return _dense(d, "proj", cfg)(out.reshape(b, length, d))


class Mlp(nn.Module):
    """``fc1`` (D -> hidden), exact (erf) GELU, ``fc2`` (hidden -> D). (B, L, D) -> (B, L, D)."""

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = nn.gelu(_dense(cfg.ffn_hidden, "fc1", cfg)(x), approximate=False)
        return _dense(cfg.width, "fc2", cfg)(h)


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU: ``w12`` (D -> 2 hidden), chunks (x1, x2), ``w3(silu(x1) * x2)``.

    Call: (B, L, D) -> (B, L, D).
    """

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x1, x2 = jnp.split(_dense(2 * cfg.ffn_hidden, "w12", cfg)(x), 2, axis=-1)
        return _dense(cfg.width, "w3", cfg)(nn.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (D,), initialised to ``init_value``. x -> x * gamma."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm block: ``x += ls1(attn(norm1(x)))``; ``x += ls2(mlp(norm2(x)))``.

    Call: (B, L, D) -> (B, L, D).
    """

    config: DINOv2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        ffn = SwiGLUFFN if cfg.ffn == "swiglu" else Mlp
        x = x + LayerScale(name="ls1")(Attention(cfg, name="attn")(_layer_norm("norm1", cfg)(x)))
        return x + LayerScale(name="ls2")(ffn(cfg, name="mlp")(_layer_norm("norm2", cfg)(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT. Call: images (B, H, W, C), already normalised -> tokens after ``norm``.

    Returns (B, 1 + R + gh*gw, D) in float32: the CLS token, R register tokens, then
    the patch tokens (row-major), after the final LayerNorm. The FDD feature is
    ``[:, 0]`` (see ``fdd_features``).
    """

    config: DINOv2Config

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        b, h, w, _ = images.shape
        p, d, m = cfg.patch_size, cfg.width, cfg.pos_grid
        if h < p or w < p:
            raise ValueError(f"images of size {h}x{w} are smaller than one {p}x{p} patch")
        x = PatchEmbed(cfg, name="patch_embed")(images.astype(cfg.dtype))
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
        pos_embed = self.param("pos_embed", _trunc_normal, (1, 1 + m * m, d))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)).astype(x.dtype), x], axis=1)
        pos = interpolate_pos_embed(
            pos_embed,
            (h // p, w // p),
            (h, w),
            offset=cfg.interpolate_offset,
            antialias=cfg.interpolate_antialias,
        )
        x = x + pos.astype(x.dtype)
        if cfg.num_register_tokens:
            reg = self.param(
                "register_tokens", nn.initializers.normal(1e-6), (1, cfg.num_register_tokens, d)
            )
            reg = jnp.broadcast_to(reg, (b, cfg.num_register_tokens, d)).astype(x.dtype)
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        for i in range(cfg.depth):
            x = Block(cfg, name=f"blocks_{i}")(x)
        return _layer_norm("norm", cfg)(x).astype(jnp.float32)


# ----------------------------------------------------------------------------
# FDD features
# ----------------------------------------------------------------------------


def fdd_preprocess(
    images: Array, resolution: int = FDD_RESOLUTION, *, antialias: bool = True
) -> Array:
    """Map images in [-1, 1] to DINOv2 inputs with dgm-eval's FDD convention.

    [-1, 1] -> [0, 1] -> bicubic resize to resolution^2 (``bicubic_resize``; with
    ``antialias`` the PIL/torchvision-on-PIL filter, else plain ``F.interpolate``
    bicubic) -> clip to [0, 1] -> ImageNet mean/std.

    Args:
      images: (B, H, W, 3) in [-1, 1].
      resolution: output side (224).
      antialias: PIL-style antialiased bicubic (dgm-eval) or PyTorch's plain one.

    Returns:
      (B, resolution, resolution, 3) float32.
    """
    x = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
    if x.shape[-3:-1] != (resolution, resolution):
        x = bicubic_resize(x, (resolution, resolution), antialias=antialias)
    x = jnp.clip(x, 0.0, 1.0)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def fdd_features(
    model: DINOv2,
    params: Any,
    images: Array,
    *,
    resolution: int = FDD_RESOLUTION,
    antialias: bool = True,
) -> Array:
    """FDD features: the normalised CLS token of DINOv2 on preprocessed images.

    Pure and jit-friendly: ``jax.jit(functools.partial(fdd_features, model))(params,
    images)``.

    Args:
      model: a ``DINOv2`` module (e.g. from ``dfm_jax.weights.dinov2.load_dinov2``).
      params: its parameters (the ``"params"`` collection).
      images: (B, H, W, 3) in [-1, 1], any size.
      resolution, antialias: see ``fdd_preprocess``.

    Returns:
      (B, D) float32.
    """
    x = fdd_preprocess(images, resolution, antialias=antialias)
    return model.apply({"params": params}, x)[:, 0]

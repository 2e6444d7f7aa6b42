"""Building blocks of the DFM-DiT: embeddings, positions, attention, adaLN-Zero blocks.

Conventions
-----------
* Channel-last arrays. Token sequences are (B, L, D): batch, length, width.
  Attention heads are laid out (B, L, N, H): batch, length, heads, head dim,
  the layout of ``jax.nn.dot_product_attention``.
* Images are (B, H, W, C), videos (B, T, H, W, C). ``patchify`` cuts non-overlapping
  p x p patches per frame; tokens are ordered frame-major, then row-major
  (t, then h, then w). Inside a token the p*p*C values are ordered
  (patch row, patch column, channel), i.e. a Dense over them equals a Conv with
  kernel = stride = p and an HWIO kernel reshaped to (p*p*C, D).
* Parameters carry logical axis names through ``nn.with_logical_partitioning`` and
  the main activations through ``nn.with_logical_constraint``; see
  ``dfm_jax.models.dit`` for the table of names. Without a mesh and rules both
  are no-ops, so the modules run with plain ``init``/``apply`` on CPU.
* Every module takes ``dtype`` (computation) and ``param_dtype`` (storage).
  Normalisation statistics, RoPE rotations and the sinusoidal timestep features
  are computed in float32; fixed position tables are built in float64 numpy.

Initialisation follows DiT (Peebles & Xie, ``initialize_weights``): xavier-uniform
Dense kernels with zero bias, timestep-MLP kernels normal(0.02), label table
normal(0.02), adaLN modulation and final projections zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models import blockwise_attention

Array = jax.Array
Dtype = Any
Initializer = Any

LAYER_NORM_EPS = 1e-6

xavier_uniform = nn.initializers.xavier_uniform
zeros_init = nn.initializers.zeros_init
normal_init = nn.initializers.normal


def _flat_init(init: Initializer, n_in: int) -> Initializer:
    """Apply a 2-D initialiser to the kernel flattened to (prod(in axes), prod(out axes))."""

    def f(rng, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return jnp.reshape(init(rng, flat, dtype), shape)

    return f


class LogicalDense(nn.Module):
    """Dense layer contracting the last ``n_in`` input axes into ``features`` axes.

    The kernel has shape ``x.shape[-n_in:] + features`` and one logical name per axis
    (``names``); the bias has shape ``features`` and the names of the feature axes.
    Unlike ``nn.DenseGeneral`` the logical-partitioning box is created on the final
    (not the flattened) kernel shape, so multi-axis kernels such as the attention
    projections (D, 3, N, H) and (N, H, D) stay valid under a mesh.

    Attributes:
      features: output feature axes.
      names: logical names of every kernel axis (input axes first).
      n_in: number of trailing input axes contracted.
      use_bias: add a bias.
      kernel_init: initialiser applied to the kernel flattened to
        (prod(input axes), prod(feature axes)) (so xavier-uniform uses the fans of
        the equivalent 2-D matrix), then reshaped.
      bias_init: bias initialiser.
      dtype, param_dtype: computation and parameter dtypes.

    Call: (..., *in_axes) -> (..., *features).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = True
    kernel_init: Initializer = xavier_uniform()
    bias_init: Initializer = zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = self.n_in, len(self.features)
        if len(self.names) != n_in + n_out:
            raise ValueError(f"{len(self.names)} logical names for a {n_in + n_out}-axis kernel")
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_flat_init(self.kernel_init, n_in), self.names),
            tuple(x.shape[-n_in:]) + tuple(self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(self.bias_init, self.names[n_in:]),
                tuple(self.features),
                self.param_dtype,
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # The leading axes as one: the kernel gradient then contracts one axis, which the
        # XLA CPU backend runs as a plain matmul (contracting (B, L) was ~1.8x slower).
        leading = x.shape[:-n_in]
        x = x.reshape((-1, *x.shape[-n_in:]))
        contract = (tuple(range(1, 1 + n_in)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        y = y.reshape((*leading, *self.features))
        if bias is not None:
            y = y + bias
        return y


def logical_dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    *,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    n_in: int = 1,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
) -> LogicalDense:
    """A ``LogicalDense``; defaults: xavier-uniform kernel, zero bias."""
    return LogicalDense(
        features=(features,) if isinstance(features, int) else tuple(features),
        names=tuple(names),
        n_in=n_in,
        use_bias=use_bias,
        kernel_init=xavier_uniform() if kernel_init is None else kernel_init,
        bias_init=zeros_init() if bias_init is None else bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm without affine parameters, eps 1e-6 (DiT); statistics in float32."""
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS, use_bias=False, use_scale=False, dtype=dtype, name=name
    )


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale broadcast over tokens.

    Args:
      x: (B, L, D) tokens.
      shift, scale: (B, 1, D) or broadcastable.
    """
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------


def patchify(x: Array, patch_size: int) -> Array:
    """Cut an image or video into non-overlapping 2-D patches, one token per patch.

    Args:
      x: (B, H, W, C) or (B, T, H, W, C); H and W divisible by ``patch_size``.
      patch_size: p.

    Returns:
      (B, L, p*p*C) with L = H/p * W/p (images) or T * H/p * W/p (videos, frame-major).
      Token features are ordered (patch row, patch column, channel).
    """
    p = patch_size
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // p, p, w // p, p, c)
    x = jnp.swapaxes(x, -4, -3)  # (..., H/p, W/p, p, p, C)
    return x.reshape(lead[0], -1, p * p * c)


def unpatchify(tokens: Array, patch_size: int, grid: Sequence[int], channels: int) -> Array:
    """Inverse of ``patchify``.

    Args:
      tokens: (B, L, p*p*C).
      patch_size: p.
      grid: token grid, (gh, gw) for images or (T, gh, gw) for videos; prod(grid) = L.
      channels: C.

    Returns:
      (B, gh*p, gw*p, C) or (B, T, gh*p, gw*p, C).
    """
    p = patch_size
    b = tokens.shape[0]
    *lead, gh, gw = tuple(grid)
    x = tokens.reshape(b, *lead, gh, gw, p, p, channels)
    x = jnp.swapaxes(x, -4, -3)  # (..., gh, p, gw, p, C)
    return x.reshape(b, *lead, gh * p, gw * p, channels)


class PatchEmbed(nn.Module):
    """Patch embedding: a Dense over flattened p x p x C patches (= Conv, kernel = stride = p).

    The kernel (p*p*C, D) is xavier-uniform on the flattened shape and the bias zero,
    as DiT initialises its Conv2d. Parameter: ``proj/{kernel,bias}``.

    Call: (B, H, W, C) or (B, T, H, W, C) -> (B, L, D).
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        tokens = patchify(x, self.patch_size)
        return logical_dense(
            self.width,
            ("patch", "embed"),
            name="proj",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(tokens)


# ----------------------------------------------------------------------------
# Conditioning embedders
# ----------------------------------------------------------------------------


def timestep_embedding(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """Sinusoidal timestep features of DiT/SiT ``TimestepEmbedder.timestep_embedding``.

    ``freqs_i = exp(-log(max_period) * i / half)`` for i < half = dim // 2, features
    ``[cos(t * freqs), sin(t * freqs)]`` (cosines first), zero-padded when dim is odd.
    The raw t is used (no x1000 scaling), as in the official DFM code.

    Args:
      t: (B,) float times.
      dim: number of output features.
      max_period: controls the lowest frequency.

    Returns:
      (B, dim) float32.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (``freq_dim``) then Linear-SiLU-Linear to ``width``.

    Parameters ``mlp_0`` (freq_dim -> D) and ``mlp_2`` (D -> D), kernels normal(0.02),
    zero biases (names follow the PyTorch ``mlp.{0,2}``).

    Call: t (B,) -> (B, D).
    """

    width: int
    freq_dim: int = 256
    max_period: float = 10000.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        h = timestep_embedding(t, self.freq_dim, self.max_period).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=normal_init(0.02))
        h = logical_dense(self.width, (None, "mlp"), name="mlp_0", **kw)(h)
        h = nn.silu(h)
        return logical_dense(self.width, ("mlp", "embed"), name="mlp_2", **kw)(h)


class EmbeddingTable(nn.Module):
    """A learned lookup table (parameter ``embedding_table``, normal(0.02) init).

    Used for the class labels (``num_embeddings = num_classes + 1``; row
    ``num_classes`` is the null class for classifier-free guidance; label dropout is
    done by the objective, not here) and for the stage index.

    Attributes:
      num_embeddings: rows. width: D.
      row_axis: logical axis name of the rows ("classes" for labels, None for the
        tiny stage table).

    Call: ids (B,) int -> (B, D).

    The table is gathered whole (its "embed" axis unsharded) before the lookup, as FSDP
    does for every kernel: a lookup from a table split along the axis that also splits
    the batch has no efficient SPMD partition (XLA then replicates and re-partitions the
    result, "Involuntary full rematerialization").
    """

    num_embeddings: int
    width: int
    row_axis: str | None = "classes"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        table = self.param(
            "embedding_table",
            nn.with_logical_partitioning(normal_init(0.02), (self.row_axis, "embed")),
            (self.num_embeddings, self.width),
            self.param_dtype,
        )
        table = nn.with_logical_constraint(table, (self.row_axis, None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE/DiT 1-D sin-cos embedding: ``[sin(pos * omega), cos(pos * omega)]``.

    ``omega_i = 1 / 10000^(i / (embed_dim/2))``. Returns (pos.size, embed_dim) float64.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding in the MAE/DiT ``get_2d_sincos_pos_embed`` layout.

    Tokens row-major (h, then w). The first ``embed_dim/2`` channels embed the column
    index w and the last ``embed_dim/2`` the row index h (MAE builds
    ``np.meshgrid(grid_w, grid_h)`` and embeds ``grid[0]`` first).

    Returns:
      (grid_h * grid_w, embed_dim) float64.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, ww)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, hh)
    return np.concatenate([emb_w, emb_h], axis=1)


def get_3d_sincos_pos_embed(embed_dim: int, grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 3-D sin-cos embedding for video tokens (frame-major, then row-major).

    The CogVideoX layout: the first ``embed_dim/4`` channels are a 1-D sin-cos
    embedding of the frame index, the remaining ``3*embed_dim/4`` the 2-D embedding
    of ``get_2d_sincos_pos_embed`` (w half first, then h half), repeated over frames.

    Returns:
      (grid_t * grid_h * grid_w, embed_dim) float64. Needs embed_dim % 16 == 0.
    """
    if embed_dim % 16:
        raise ValueError(
            f"3-D sin-cos embedding needs a dimension divisible by 16, got {embed_dim}"
        )
    dim_t = embed_dim // 4
    spatial = get_2d_sincos_pos_embed(embed_dim - dim_t, grid_h, grid_w)  # (HW, 3D/4)
    temporal = get_1d_sincos_pos_embed(dim_t, np.arange(grid_t))  # (T, D/4)
    n_sp = grid_h * grid_w
    spatial = np.broadcast_to(spatial[None], (grid_t, n_sp, spatial.shape[-1]))
    temporal = np.broadcast_to(temporal[:, None], (grid_t, n_sp, dim_t))
    return np.concatenate([temporal, spatial], axis=-1).reshape(grid_t * n_sp, embed_dim)


def sincos_pos_embed(embed_dim: int, grid: Sequence[int]) -> np.ndarray:
    """2-D (grid (gh, gw)) or 3-D (grid (T, gh, gw)) fixed sin-cos embedding, (L, D)."""
    if len(grid) == 2:
        return get_2d_sincos_pos_embed(embed_dim, *grid)
    if len(grid) == 3:
        return get_3d_sincos_pos_embed(embed_dim, *grid)
    raise ValueError(f"token grid must have 2 or 3 axes, got {tuple(grid)}")


def rope_pairs_per_axis(head_dim: int, num_axes: int) -> tuple[int, ...]:
    """How many rotary pairs (of head_dim // 2) each position axis gets.

    2-D (h, w): half each (h gets the smaller half if the count is odd).
    3-D (t, h, w): h and w get ``pairs // 3`` each, t the rest (>= the spatial share).
    1-D: all pairs.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    pairs = head_dim // 2
    if num_axes == 1:
        return (pairs,)
    if num_axes == 2:
        return (pairs // 2, pairs - pairs // 2)
    if num_axes == 3:
        sp = pairs // 3
        if sp == 0:
            raise ValueError(f"3-D RoPE needs a head dimension >= 6, got {head_dim}")
        return (pairs - 2 * sp, sp, sp)
    raise ValueError(f"RoPE supports 1 to 3 position axes, got {num_axes}")


def grid_coordinates(grid: Sequence[int]) -> np.ndarray:
    """Integer coordinates of every token of a grid, in token order: (L, len(grid))."""
    axes = np.meshgrid(*[np.arange(n) for n in grid], indexing="ij")
    return np.stack([a.reshape(-1) for a in axes], axis=-1)


def rope_angles(
    coords: np.ndarray, head_dim: int, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """Axial multi-dimensional RoPE tables.

    The head_dim // 2 rotary pairs are split among the position axes by
    ``rope_pairs_per_axis``; an axis with n pairs rotates pair i by
    ``coord * theta^(-i/n)`` (the usual 1-D RoPE frequencies for a 2n-dim head).

    Args:
      coords: (L, A) integer positions, A in {1, 2, 3} (e.g. (h, w) or (t, h, w)).
      head_dim: per-head dimension H.
      theta: RoPE base.

    Returns:
      (cos, sin), each (L, H // 2) float32.
    """
    coords = np.asarray(coords, np.float64)
    parts = []
    for a, n in enumerate(rope_pairs_per_axis(head_dim, coords.shape[-1])):
        freqs = theta ** (-np.arange(n, dtype=np.float64) / n)
        parts.append(coords[:, a : a + 1] * freqs[None])
    ang = np.concatenate(parts, axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate query/key features (rotate-half layout).

    Pair i is (x[..., i], x[..., i + H/2]) and is rotated by the angle whose cosine and
    sine are ``cos[:, i]``, ``sin[:, i]``. Computed in float32, returned in x.dtype.

    Args:
      x: (B, L, N, H).
      cos, sin: (L, H // 2).
    """
    dt = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = jnp.asarray(cos, jnp.float32)[None, :, None, :]
    s = jnp.asarray(sin, jnp.float32)[None, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.astype(dt)


# ----------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------


def einsum_attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax attention written out in the (B, N, L, H) layout; (B, L, N, H) in and out.

    The scores and the softmax are float32 (as in ``jax.nn.dot_product_attention``'s XLA
    path); the output has ``v``'s dtype. On the XLA CPU backend this layout runs the
    forward and backward pass 30 % faster than ``jax.nn.dot_product_attention`` (B 16,
    L 256, D 384: 85 vs 122 ms at head dim 64, 155 vs 234 ms at 24; docs/benchmarks.md).
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = jnp.einsum("bnlh,bnmh->bnlm", q * scale, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnlm,bnmh->bnlh", weights, v).transpose(0, 2, 1, 3)


def attend(q: Array, k: Array, v: Array, implementation: str | None) -> Array:
    """Attention of (B, L, N, H) ``q, k, v`` by ``implementation``: "blockwise"
    (``blockwise_attention.blockwise_attention``), "einsum" (``einsum_attention``), "xla"
    or "cudnn" (``jax.nn.dot_product_attention``), or None: "blockwise" on the CPU
    backend (the fastest there), JAX's own choice elsewhere."""
    if implementation is None and jax.default_backend() == "cpu":
        implementation = "blockwise"
    if implementation == "blockwise":
        return blockwise_attention.blockwise_attention(q, k, v)
    if implementation == "einsum":
        return einsum_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE and a backend switch.

    Parameters: ``qkv`` kernel (D, 3, N, H) with logical axes ("embed", None, "heads",
    "kv") (xavier-uniform as the (D, 3D) matrix of PyTorch's ``attn.qkv``), ``proj``
    kernel (N, H, D) with axes ("heads", "kv", "embed").

    Attributes:
      width: D. num_heads: N (H = D // N).
      implementation: "blockwise" (``blockwise_attention``), "einsum"
        (``einsum_attention``), "xla" or "cudnn" (GPU, bf16/fp16 only; both
        ``jax.nn.dot_product_attention``) or None (``attend``: blockwise on CPU, JAX's
        choice elsewhere).
      qkv_bias: bias on the qkv projection (DiT: True).

    Call: x (B, L, D), rope: optional (cos, sin) each (L, H // 2) -> (B, L, D).
    """

    width: int
    num_heads: int
    implementation: str | None = None
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array] | None = None) -> Array:
        head_dim = self.width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = logical_dense(
            (3, self.num_heads, head_dim),
            ("embed", None, "heads", "kv"),
            name="qkv",
            use_bias=self.qkv_bias,
            **kw,
        )(x)  # (B, L, 3, N, H)
        names = ("batch", "length", "heads", "kv")
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], names) for i in range(3))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        out = attend(q, k, v, self.implementation)
        out = nn.with_logical_constraint(out, names)
        return logical_dense(self.width, ("heads", "kv", "embed"), name="proj", n_in=2, **kw)(out)


class Mlp(nn.Module):
    """Linear (``fc1``, D -> hidden) - GELU(tanh) - Linear (``fc2``, hidden -> D).

    Call: (B, L, D) -> (B, L, D).
    """

    width: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = logical_dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=True)
        return logical_dense(self.width, ("mlp", "embed"), name="fc2", **kw)(h)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning.

    ``adaLN_modulation`` = SiLU then a zero-initialised Dense c -> 6D, chunked in DiT
    order (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
    ``x += gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))`` and the same for
    the MLP. LayerNorms have no affine parameters (eps 1e-6).

    Call: x (B, L, D), c (B, D), rope optional (cos, sin) -> (B, L, D).
    """

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    implementation: str | None = None
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, rope: tuple[Array, Array] | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = logical_dense(
            6 * self.width,
            ("embed", "mlp"),
            name="adaLN_modulation",
            kernel_init=zeros_init(),
            **kw,
        )(nn.silu(c))
        # Replicated over features: the modulation vectors are broadcast over tokens whose
        # feature axis is not model-sharded. (Leaving them "mlp"-sharded also triggers an
        # XLA SPMD miscompile on CPU with jax 0.10.2 when one example is left per shard.)
        mod = nn.with_logical_constraint(mod, ("batch", None))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            mod[:, None, :], 6, axis=-1
        )
        h = modulate(layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        h = Attention(
            self.width,
            self.num_heads,
            implementation=self.implementation,
            qkv_bias=self.qkv_bias,
            name="attn",
            **kw,
        )(h, rope)
        x = nn.with_logical_constraint(x + gate_msa * h, ("batch", "length", "embed"))
        h = modulate(layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = Mlp(self.width, int(self.width * self.mlp_ratio), name="mlp", **kw)(h)
        return nn.with_logical_constraint(x + gate_mlp * h, ("batch", "length", "embed"))


class FinalLayer(nn.Module):
    """DiT final layer for one scale: adaLN (shift, scale), LayerNorm, Linear to p*p*C.

    ``adaLN_modulation`` (c -> 2D, chunk order shift, scale) and ``linear``
    (D -> p*p*C, axes ("embed", "patch")) are both zero-initialised, so the model
    output is exactly zero at initialisation.

    Call: x (B, L, D), c (B, D) -> (B, L, p*p*C) in the computation dtype.
    """

    width: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=zeros_init())
        mod = logical_dense(2 * self.width, ("embed", "mlp"), name="adaLN_modulation", **kw)(
            nn.silu(c)
        )
        mod = nn.with_logical_constraint(mod, ("batch", None))  # see DiTBlock
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        x = modulate(layer_norm(self.dtype, "norm_final")(x), shift, scale)
        p = self.patch_size
        return logical_dense(p * p * self.out_channels, ("embed", "patch"), name="linear", **kw)(x)

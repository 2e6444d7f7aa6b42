"""DFM-DiT: a DiT with per-scale patch embedders, timestep embedders and output heads.

Decomposable Flow Matching (Haji-Ali et al., NeurIPS 2025, Fig. 2c). A sample is a
tuple of S scales, coarsest first; every scale has its own patch size so that all
scales give the same token grid, e.g. latents 32^2 and 64^2 with patches (1, 2).

Forward pass (``DiT.__call__(scales, t, mask, labels)``):

1. Scale s input: zeroed where ``mask[:, s] == 0`` (a masked scale contributes no
   input and receives exactly zero gradient); optionally multiplied by the
   preconditioning ``c_in = 1/sqrt(t_s^2 sigma_s^2 + (1 - t_s)^2)``.
2. Per-scale patch embedding (Dense over p_s x p_s x C patches, pt_s x p_s x p_s x C
   with temporal patches); the S token
   sequences are SUMMED into one sequence; plus fixed sin-cos positions if
   ``positions == "sincos"``.
3. Conditioning ``c = sum_s t_embedder_s(t[:, s]) + y_embedder(labels)
   [+ stage_embedder(stage - 1)]`` where stage = number of active scales
   (``mask.sum(-1)``, clipped to [1, S]) indexes an (S, D) table (the paper's
   embedding of the current stage; the official reimplementation has none).
   The timestep embedders of masked scales are still applied (to their t, 0 by
   convention), as in the official code.
4. ``depth`` shared adaLN-Zero DiT blocks (RoPE on q and k if ``positions == "rope"``).
5. Per-scale final layers (adaLN, LayerNorm, Linear to p_s*p_s*C, zero-init),
   unpatchified to the scale's resolution; optionally times
   ``c_out = sqrt(sigma_s^2 + 1)``.

Conventions: channel-last; images (B, H, W, C), videos (B, T, H, W, C) (2-D patches
per frame, tokens frame-major; with ``temporal_patch_sizes`` scale s of a temporal
pyramid, T_s frames, is cut into pt_s x p_s x p_s patches so that every scale gives
the same (T_s / pt_s, H_s / p_s, W_s / p_s) token grid); paper time t = 0 noise,
t = 1 data, t shape (B, S); mask (B, S) bool or {0, 1} float, 1 = active; labels (B,)
int32 in [0, num_classes] with ``num_classes`` the null class. Output: tuple of
per-scale velocities, the shapes of the inputs, float32 whatever the compute dtype.
The raw t in [0, 1] feeds the sinusoidal embedding (no x1000), as in the official
code.

Positions
---------
* ``"sincos"``: fixed (not a parameter) MAE/DiT 2-D sin-cos embedding added to the
  tokens; for videos a 3-D extension (CogVideoX layout: first D/4 channels encode
  the frame index, last 3D/4 the 2-D (w, h) embedding; needs D % 16 == 0).
* ``"rope"``: axial RoPE on q and k in every attention layer. Images: half of the
  head_dim/2 rotary pairs for rows, half for columns. Videos: 3-D RoPE, pairs split
  among (t, h, w) as ``layers.rope_pairs_per_axis`` (h, w get pairs//3 each, t the
  rest). Integer token coordinates, base ``rope_theta``.

Logical axis names
------------------
Parameters (``nn.with_logical_partitioning``):

=========  ==============================================================
"embed"    model width D (every Dense in/out of the residual stream)
"mlp"      MLP hidden, adaLN modulation outputs, timestep-MLP hidden
"heads"    attention heads N (qkv kernel, out-projection kernel)
"kv"       per-head dimension H
"patch"    flattened patch features p*p*C (patch embedders, final linears)
"classes"  rows of the label table (num_classes + 1)
None       small axes: the q/k/v selector (3), sinusoidal features (256),
           stage-table rows (S)
=========  ==============================================================

Activations (``nn.with_logical_constraint``): tokens ("batch", "length", "embed"),
conditioning c ("batch", "embed"), adaLN modulation vectors ("batch", None), q/k/v
and attention output ("batch", "length", "heads", "kv"), MLP hidden ("batch",
"length", "mlp"). A trainer maps these names to mesh axes with rules such as
``(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads",
"model"), ("kv", None), ("length", None), ("patch", None), ("classes", None))``;
flax leaves an axis unsharded when its mesh axis is already used by an earlier
dimension of the same array. Without a mesh/rules (plain
``init``/``apply``) the annotations are no-ops.

Parameter tree (names mirror the official PyTorch state dict): ``x_embedder_{s}/proj``,
``t_embedder_{s}/mlp_{0,2}``, ``y_embedder/embedding_table``,
``stage_embedder/embedding_table``, ``blocks_{i}/{adaLN_modulation, attn/qkv,
attn/proj, mlp/fc1, mlp/fc2}``, ``final_layer_{s}/{adaLN_modulation, linear}``.
``model.init`` returns parameters boxed in ``nn.LogicallyPartitioned``; ``apply``
accepts boxed or unboxed (``nn.unbox``) trees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models import layers

Array = jax.Array

#: Named DiT sizes: depth, width, heads (Peebles & Xie; MLP ratio 4).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

_POSITIONS = ("rope", "sincos")
_ATTENTION_IMPLS = (None, "blockwise", "einsum", "xla", "cudnn")
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_PARAM_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DFM-DiT. Immutable and hashable; validated on construction.

    Attributes:
      depth: number of shared DiT blocks.
      width: hidden size D.
      num_heads: attention heads N; D must be divisible by N.
      patch_sizes: one patch size per scale, coarsest scale first; S =
        len(patch_sizes). Scale s of spatial size (H_s, W_s) gives a token grid
        (H_s/p_s, W_s/p_s) which must be the same for every scale. A single entry is
        the plain (Flow Matching) DiT.
      temporal_patch_sizes: frames per patch pt_s of every scale (videos of a
        temporal pyramid, whose scale s has T_s frames: token grid (T_s/pt_s, H_s/p_s,
        W_s/p_s)); None: 1 for every scale (2-D patches per frame).
      in_channels: channels C of every scale (output channels are the same).
      num_classes: number of classes; the label table has num_classes + 1 rows and
        id ``num_classes`` is the null (unconditional) class.
      mlp_ratio: MLP hidden size = int(width * mlp_ratio).
      positions: "rope" (2-D/3-D axial RoPE in attention, the paper) or "sincos"
        (fixed absolute 2-D/3-D sin-cos embedding, the official reimplementation).
      rope_theta: RoPE frequency base.
      stage_embedding: add a learned embedding of the current stage index (number
        of active scales, from mask.sum(-1)) to the conditioning vector (paper).
      preconditioning: scale input s by ``1/sqrt(t_s^2 sigma_s^2 + (1-t_s)^2)`` and
        output s by ``sqrt(sigma_s^2 + 1)`` (EDM-style; the official code has none).
      scale_stds: per-scale data std sigma_s (S floats > 0), required when
        ``preconditioning``; otherwise unused (may be None).
      attention_impl: "blockwise" (``blockwise_attention``: blocks of heads, its own
        backward pass), "einsum" (``layers.einsum_attention``, the (B, N, L, H) layout),
        "xla" or "cudnn" (``jax.nn.dot_product_attention``; cudnn: NVIDIA GPU, bf16/fp16
        compute only) or None (``layers.attend``: blockwise on CPU, JAX's choice
        elsewhere).
      qkv_bias: bias in the qkv projection (DiT: True).
      time_freq_dim: number of sinusoidal timestep features (DiT: 256).
      time_max_period: max period of the sinusoidal timestep features (10000).
      dtype: computation dtype ("float32", "bfloat16" or "float16"; a jnp dtype is
        accepted and normalised to its name).
      param_dtype: parameter storage dtype ("float32" or "bfloat16").
      remat: rematerialise every DiT block in the backward pass (``nn.remat``).
      remat_policy: name of a ``jax.checkpoint_policies`` policy used when
        ``remat`` (e.g. "nothing_saveable", "dots_with_no_batch_dims_saveable").
    """

    depth: int
    width: int
    num_heads: int
    patch_sizes: tuple[int, ...]
    in_channels: int
    num_classes: int
    mlp_ratio: float = 4.0
    positions: str = "rope"
    rope_theta: float = 10000.0
    stage_embedding: bool = True
    preconditioning: bool = False
    scale_stds: tuple[float, ...] | None = None
    attention_impl: str | None = None
    qkv_bias: bool = True
    time_freq_dim: int = 256
    time_max_period: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    temporal_patch_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        # Normalise containers (configs may hand over lists) and dtypes (names).
        if isinstance(self.patch_sizes, int):
            object.__setattr__(self, "patch_sizes", (self.patch_sizes,))
        object.__setattr__(self, "patch_sizes", tuple(self.patch_sizes))
        if self.temporal_patch_sizes is not None:
            object.__setattr__(self, "temporal_patch_sizes", tuple(self.temporal_patch_sizes))
        if self.scale_stds is not None:
            object.__setattr__(self, "scale_stds", tuple(float(v) for v in self.scale_stds))
        for field in ("dtype", "param_dtype"):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, jnp.dtype(value).name)
            except TypeError as e:
                raise ValueError(f"DiTConfig.{field}: unknown dtype {value!r}") from e
        self.validate()

    @property
    def num_scales(self) -> int:
        """S, the number of scales."""
        return len(self.patch_sizes)

    @property
    def frames_per_patch(self) -> tuple[int, ...]:
        """pt_s for every scale (``temporal_patch_sizes``, or all 1)."""
        return self.temporal_patch_sizes or (1,) * self.num_scales

    @property
    def head_dim(self) -> int:
        """Per-head dimension H = width // num_heads."""
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden size."""
        return int(self.width * self.mlp_ratio)

    def validate(self) -> None:
        """Raise ValueError naming the offending field if the configuration is invalid."""

        def bad(msg: str):
            raise ValueError(f"DiTConfig: {msg}")

        for field in ("depth", "width", "num_heads", "in_channels", "time_freq_dim"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                bad(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
            bad(f"num_classes must be a non-negative integer, got {self.num_classes!r}")
        if self.width % self.num_heads:
            bad(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not self.mlp_ratio > 0 or self.mlp_hidden < 1:
            bad(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if not self.patch_sizes:
            bad("patch_sizes must name at least one scale")
        for p in self.patch_sizes:
            if not isinstance(p, (int, np.integer)) or p < 1:
                bad(f"patch sizes must be positive integers, got {self.patch_sizes}")
        tps = self.temporal_patch_sizes
        if tps is not None and (
            len(tps) != self.num_scales
            or not all(isinstance(p, (int, np.integer)) and p >= 1 for p in tps)
        ):
            bad(
                f"temporal_patch_sizes must be one positive integer per scale "
                f"(patch_sizes {self.patch_sizes}), got {tps}"
            )
        if self.positions not in _POSITIONS:
            bad(f"positions must be one of {_POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            bad(f"RoPE needs an even head dimension, got width/num_heads = {self.head_dim}")
        if self.positions == "rope" and not self.rope_theta > 0:
            bad(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.positions == "sincos" and self.width % 4:
            bad(f"sin-cos positions need width divisible by 4, got {self.width}")
        if self.scale_stds is not None:
            if len(self.scale_stds) != self.num_scales:
                bad(
                    f"scale_stds has {len(self.scale_stds)} entries but there are "
                    f"{self.num_scales} scales (patch_sizes {self.patch_sizes})"
                )
            if not all(v > 0 and math.isfinite(v) for v in self.scale_stds):
                bad(f"scale_stds must be positive and finite, got {self.scale_stds}")
        if self.preconditioning and self.scale_stds is None:
            bad("preconditioning needs scale_stds (one data std per scale)")
        if self.attention_impl not in _ATTENTION_IMPLS:
            bad(f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            bad(f"attention_impl 'cudnn' needs dtype bfloat16 or float16, got {self.dtype!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            bad(f"dtype must be one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.param_dtype not in _PARAM_DTYPES:
            bad(f"param_dtype must be one of {_PARAM_DTYPES}, got {self.param_dtype!r}")
        if self.remat and not callable(getattr(jax.checkpoint_policies, self.remat_policy, None)):
            bad(f"remat_policy {self.remat_policy!r} is not in jax.checkpoint_policies")


def dit_config(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    patch_sizes: Sequence[int] | None = None,
    **overrides: Any,
) -> DiTConfig:
    """A ``DiTConfig`` of a named size: "S", "B", "L", "XL", optionally with "/p".

    Sizes (depth/width/heads): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16.
    A suffix "/p" names the patch size of the FINEST scale (DiT naming, e.g.
    "DFM-XL/2" has patches (1, 2)): without ``patch_sizes`` it gives the single-scale
    model ``patch_sizes=(p,)``; with ``patch_sizes`` their last entry must equal p.
    Without a suffix ``patch_sizes`` is required.

    Examples:
      ``dit_config("XL", patch_sizes=(1, 2), in_channels=16, num_classes=1000)``
      ``dit_config("XL/2", in_channels=16, num_classes=1000)``  # FM baseline

    Any other ``DiTConfig`` field can be overridden by keyword.
    """
    size, sep, patch = name.partition("/")
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown DiT size {name!r}; expected one of {sorted(MODEL_SIZES)}")
    if sep:
        if not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"bad patch suffix in {name!r}; expected e.g. 'XL/2'")
        p = int(patch)
        if patch_sizes is None:
            patch_sizes = (p,)
        elif tuple(patch_sizes)[-1] != p:
            raise ValueError(
                f"{name!r} names finest patch size {p} but patch_sizes={tuple(patch_sizes)}"
            )
    elif patch_sizes is None:
        raise ValueError(f"{name!r} has no '/p' suffix: pass patch_sizes")
    depth, width, heads = MODEL_SIZES[size]
    kwargs = dict(depth=depth, width=width, num_heads=heads)
    kwargs.update(overrides)
    return DiTConfig(
        patch_sizes=tuple(patch_sizes),
        in_channels=in_channels,
        num_classes=num_classes,
        **kwargs,
    )


def token_grid(config: DiTConfig, scale_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Check per-example scale shapes against the config and return the shared token grid.

    Shapes are static, so this runs in Python (before tracing) and raises ValueError
    naming the shapes and patch sizes when: the number of scales differs from
    ``len(config.patch_sizes)``; shapes are neither all (H, W, C) nor all
    (T, H, W, C); channels differ from ``in_channels``; H or W is not divisible by
    the scale's patch size (T by its temporal patch size); the token grids differ
    between scales; or the grid is incompatible with the position encoding.

    Args:
      config: the model configuration.
      scale_shapes: per-example shapes WITHOUT the batch axis, coarsest first.

    Returns:
      (gh, gw) for images, (T_s / pt_s, gh, gw) for videos; L = prod of it.
    """
    shapes = [tuple(int(d) for d in s) for s in scale_shapes]
    ps, pts = config.patch_sizes, config.frames_per_patch
    where = f"scale shapes {shapes} with patch sizes {ps}"
    if config.temporal_patch_sizes is not None:
        where += f" and temporal patch sizes {pts}"
    if len(shapes) != len(ps):
        raise ValueError(f"{len(shapes)} scales given but the model has {len(ps)}: {where}")
    ndims = {len(s) for s in shapes}
    if len(ndims) != 1 or ndims.pop() not in (3, 4):
        raise ValueError(f"every scale must be (H, W, C) or every (T, H, W, C): {where}")
    grids = []
    for s, (shape, p, pt) in enumerate(zip(shapes, ps, pts, strict=True)):
        *lead, h, w, c = shape
        if c != config.in_channels:
            raise ValueError(
                f"scale {s} has {c} channels, model expects in_channels={config.in_channels}: "
                f"{where}"
            )
        if h % p or w % p or h < 1 or w < 1:
            raise ValueError(
                f"scale {s} of size {h}x{w} is not divisible by its patch size {p}: {where}"
            )
        if pt > 1 and (not lead or lead[0] % pt):
            raise ValueError(
                f"scale {s} is not a video whose frame count is divisible by its temporal "
                f"patch size {pt}: {where}"
            )
        grids.append((*(n // pt for n in lead), h // p, w // p))
    if len(set(grids)) != 1:
        raise ValueError(f"scales give different token grids {grids}: {where}")
    grid = grids[0]
    if len(grid) == 3 and config.positions == "sincos" and config.width % 16:
        raise ValueError(
            f"video inputs with sin-cos positions need width divisible by 16, got {config.width}"
        )
    if len(grid) == 3 and config.positions == "rope" and config.head_dim < 6:
        raise ValueError(f"video inputs with RoPE need head_dim >= 6, got {config.head_dim}")
    return grid


class DiT(nn.Module):
    """The DFM-DiT (per-scale patch/timestep embedders and heads, shared blocks).

    Attributes:
      config: a ``DiTConfig``.

    Call ``model.apply({"params": params}, scales, t, mask, labels)``:
      scales: sequence of S arrays (B, H_s, W_s, C) or (B, T, H_s, W_s, C), coarsest
        first, giving the same token grid with ``config.patch_sizes``.
      t: (B, S) times, paper convention (0 noise, 1 data).
      mask: (B, S) bool or {0,1}; 1 = scale active. Inactive scales' inputs are
        replaced by zeros before their embedder.
      labels: (B,) int in [0, num_classes]; num_classes = null class.

    Returns:
      tuple of S float32 velocity predictions with the shapes of ``scales``.
    """

    config: DiTConfig

    @nn.compact
    def __call__(
        self,
        scales: Sequence[Array],
        t: Array,
        mask: Array,
        labels: Array,
    ) -> tuple[Array, ...]:
        scales = tuple(scales)
        grid = self._check_inputs(scales, t, mask, labels)
        t = t.astype(jnp.float32)
        active = mask.astype(jnp.float32) > 0.5
        tokens = self._embed_scales(scales, t, active, grid)
        c = self._conditioning(t, active, labels)
        tokens = self._blocks(tokens, c, grid)
        return self._heads(tokens, c, grid)

    def _module_kwargs(self) -> dict[str, Any]:
        """The compute and parameter dtypes every submodule takes."""
        return dict(
            dtype=jnp.dtype(self.config.dtype), param_dtype=jnp.dtype(self.config.param_dtype)
        )

    def _check_inputs(
        self, scales: tuple[Array, ...], t: Array, mask: Array, labels: Array
    ) -> tuple[int, ...]:
        """Checks the static shapes (see the class docstring); returns the token grid."""
        cfg = self.config
        grid = token_grid(cfg, [x.shape[1:] for x in scales])
        n_scales = cfg.num_scales
        batch = scales[0].shape[0]
        for x in scales:
            if x.shape[0] != batch:
                raise ValueError(f"scales have different batch sizes: {[x.shape for x in scales]}")
        if t.shape != (batch, n_scales) or mask.shape != (batch, n_scales):
            raise ValueError(
                f"t and mask must be (B, S) = {(batch, n_scales)}, got {t.shape} and {mask.shape}"
            )
        if labels.shape != (batch,):
            raise ValueError(f"labels must be (B,) = {(batch,)}, got {labels.shape}")
        return grid

    def _embed_scales(
        self, scales: tuple[Array, ...], t: Array, active: Array, grid: tuple[int, ...]
    ) -> Array:
        """Masked, preconditioned scales -> summed patch embeddings ``(B, L, width)``.

        Inactive scales (``active`` (B, S) False) enter as zeros; with
        ``preconditioning`` scale s is multiplied by ``c_in = 1 / sqrt(t^2 sigma_s^2 +
        (1 - t)^2)`` (t (B, S) float32, paper convention). Sin-cos positions are
        added here; RoPE is applied in the blocks.
        """
        cfg, kw = self.config, self._module_kwargs()
        batch = scales[0].shape[0]
        tokens = None
        for s, (x, p, pt) in enumerate(
            zip(scales, cfg.patch_sizes, cfg.frames_per_patch, strict=True)
        ):
            bshape = (batch,) + (1,) * (x.ndim - 1)
            x = jnp.where(active[:, s].reshape(bshape), x.astype(jnp.float32), 0.0)
            if cfg.preconditioning:
                sig2 = cfg.scale_stds[s] ** 2
                ts = t[:, s]
                c_in = jax.lax.rsqrt(ts**2 * sig2 + (1.0 - ts) ** 2)
                x = x * c_in.reshape(bshape)
            emb = layers.PatchEmbed(p, cfg.width, name=f"x_embedder_{s}", **kw)(
                _fold_time(x, pt).astype(kw["dtype"])
            )
            tokens = emb if tokens is None else tokens + emb
        if cfg.positions == "sincos":
            pos = layers.sincos_pos_embed(cfg.width, grid).astype(np.float32)
            tokens = tokens + jnp.asarray(pos, kw["dtype"])[None]
        return nn.with_logical_constraint(tokens, ("batch", "length", "embed"))

    def _conditioning(self, t: Array, active: Array, labels: Array) -> Array:
        """The conditioning vector ``c`` (B, width).

        The sum of the per-scale timestep embeddings of ``t`` (B, S), the class
        embedding of ``labels`` (B,) (row ``num_classes`` is the null class) and,
        with ``stage_embedding``, the embedding of the number of active scales - 1.
        """
        cfg, kw = self.config, self._module_kwargs()
        n_scales = cfg.num_scales
        c = None
        for s in range(n_scales):
            emb = layers.TimestepEmbedder(
                cfg.width,
                freq_dim=cfg.time_freq_dim,
                max_period=cfg.time_max_period,
                name=f"t_embedder_{s}",
                **kw,
            )(t[:, s])
            c = emb if c is None else c + emb
        c = c + layers.EmbeddingTable(
            cfg.num_classes + 1, cfg.width, row_axis="classes", name="y_embedder", **kw
        )(labels)
        if cfg.stage_embedding:
            stage = jnp.sum(active.astype(jnp.int32), axis=-1)  # number of active scales
            c = c + layers.EmbeddingTable(
                n_scales, cfg.width, row_axis=None, name="stage_embedder", **kw
            )(jnp.clip(stage - 1, 0, n_scales - 1))
        return nn.with_logical_constraint(c, ("batch", "embed"))

    def _blocks(self, tokens: Array, c: Array, grid: tuple[int, ...]) -> Array:
        """The ``depth`` shared ``DiTBlock`` s (``blocks_{i}``) on ``(B, L, width)`` tokens."""
        cfg, kw = self.config, self._module_kwargs()
        rope = None
        if cfg.positions == "rope":
            cos, sin = layers.rope_angles(
                layers.grid_coordinates(grid), cfg.head_dim, cfg.rope_theta
            )
            rope = (jnp.asarray(cos), jnp.asarray(sin))
        block_cls = layers.DiTBlock
        if cfg.remat:
            block_cls = nn.remat(
                layers.DiTBlock, policy=getattr(jax.checkpoint_policies, cfg.remat_policy)
            )
        for i in range(cfg.depth):
            tokens = block_cls(
                cfg.width,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                implementation=cfg.attention_impl,
                qkv_bias=cfg.qkv_bias,
                name=f"blocks_{i}",
                **kw,
            )(tokens, c, rope)
        return tokens

    def _heads(self, tokens: Array, c: Array, grid: tuple[int, ...]) -> tuple[Array, ...]:
        """Per-scale ``FinalLayer`` s -> S float32 velocities with the shapes of the scales.

        With ``preconditioning`` scale s's output is multiplied by
        ``c_out = sqrt(sigma_s^2 + 1)``.
        """
        cfg, kw = self.config, self._module_kwargs()
        outs = []
        for s, (p, pt) in enumerate(zip(cfg.patch_sizes, cfg.frames_per_patch, strict=True)):
            channels = pt * cfg.in_channels
            y = layers.FinalLayer(cfg.width, p, channels, name=f"final_layer_{s}", **kw)(tokens, c)
            y = _unfold_time(layers.unpatchify(y, p, grid, channels), pt).astype(jnp.float32)
            if cfg.preconditioning:
                y = y * math.sqrt(cfg.scale_stds[s] ** 2 + 1.0)
            outs.append(y)
        return tuple(outs)


def _fold_time(x: Array, frames: int) -> Array:
    """``(B, T, H, W, C)`` -> ``(B, T / frames, H, W, frames * C)``: consecutive frames
    stacked on the channels (so 2-D patches of the result are 3-D patches of ``x``).
    Identity for ``frames == 1``."""
    if frames == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // frames, frames, h, w, c)
    return jnp.moveaxis(x, 2, 4).reshape(b, t // frames, h, w, frames * c)


def _unfold_time(x: Array, frames: int) -> Array:
    """Inverse of ``_fold_time``: ``(B, T', H, W, frames * C)`` -> ``(B, T' * frames, H, W,
    C)``."""
    if frames == 1:
        return x
    b, t, h, w, fc = x.shape
    x = x.reshape(b, t, h, w, frames, fc // frames)
    return jnp.moveaxis(x, 4, 2).reshape(b, t * frames, h, w, fc // frames)


def _default_scale_shapes(config: DiTConfig) -> list[tuple[int, int, int]]:
    """The smallest valid shapes: a 1 x 1 token grid (1 x 1 x 1 clips with temporal
    patches)."""
    if config.temporal_patch_sizes is not None:
        return [
            (pt, p, p, config.in_channels)
            for p, pt in zip(config.patch_sizes, config.frames_per_patch, strict=True)
        ]
    return [(p, p, config.in_channels) for p in config.patch_sizes]


def dummy_inputs(
    config: DiTConfig,
    scale_shapes: Sequence[Sequence[int]] | None = None,
    batch_size: int = 1,
) -> tuple[tuple[jax.ShapeDtypeStruct, ...], Any, Any, Any]:
    """Abstract model inputs ``(scales, t, mask, labels)`` as ``jax.ShapeDtypeStruct``.

    For ``jax.eval_shape(model.init, rng, *dummy_inputs(config, shapes, b))`` or for
    lowering. ``scale_shapes`` are per-example shapes (no batch); default: the
    smallest valid images (one token). Parameters do not depend on the shapes.
    """
    shapes = _default_scale_shapes(config) if scale_shapes is None else scale_shapes
    token_grid(config, shapes)
    f32 = jnp.float32
    scales = tuple(jax.ShapeDtypeStruct((batch_size, *s), f32) for s in shapes)
    n = config.num_scales
    return (
        scales,
        jax.ShapeDtypeStruct((batch_size, n), f32),
        jax.ShapeDtypeStruct((batch_size, n), jnp.bool_),
        jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    )


def param_shapes(config: DiTConfig) -> Any:
    """Abstract (unboxed) parameter tree of ``DiT(config)``; nothing is allocated."""
    model = DiT(config)
    variables = jax.eval_shape(
        lambda rng, *args: model.init(rng, *args), jax.random.key(0), *dummy_inputs(config)
    )
    return nn.unbox(variables["params"])


def count_params(config: DiTConfig) -> int:
    """Number of trainable parameters (fixed sin-cos positions are not parameters)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes(config)))


def forward_flops(config: DiTConfig, scale_shapes: Sequence[Sequence[int]]) -> int:
    """Analytic forward FLOPs for ONE example: 2 x multiply-accumulates of all matmuls.

    Counts the patch embedders, timestep MLPs, adaLN modulations, qkv / out
    projections, attention scores (QK^T) and values (PV), MLPs and final linears, for
    every scale (masked scales are computed too). Elementwise work (norms, softmax,
    activations, biases, RoPE) and the label-table gather are not counted.

    Args:
      config: the model configuration.
      scale_shapes: per-example shapes without the batch axis, (H, W, C) or (T, H, W, C).
    """
    grid = token_grid(config, scale_shapes)
    n_tok = math.prod(grid)
    d, c, f = config.width, config.in_channels, config.time_freq_dim
    flops = 0
    for p, pt in zip(config.patch_sizes, config.frames_per_patch, strict=True):
        flops += 2 * n_tok * (pt * p * p * c) * d  # patch embedding
        flops += 2 * (f * d + d * d)  # timestep MLP
        flops += 2 * d * (2 * d)  # final adaLN
        flops += 2 * n_tok * d * (pt * p * p * c)  # final linear
    block = 2 * d * (6 * d)  # adaLN modulation
    block += 2 * n_tok * d * (3 * d)  # qkv
    block += 2 * 2 * n_tok * n_tok * d  # scores and values, all heads
    block += 2 * n_tok * d * d  # out projection
    block += 2 * 2 * n_tok * d * config.mlp_hidden  # fc1, fc2
    return flops + config.depth * block

"""Import released DINOv2 weights into ``dfm_jax.models.dinov2``.

Two layouts are read; the size (width, depth, patch, FFN, registers, position grid)
is inferred from the tensors:

* **official** (facebookresearch/dinov2, ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``,
  e.g. :data:`OFFICIAL_URL`): ``cls_token``, ``pos_embed``, ``register_tokens``,
  ``mask_token`` (unused), ``patch_embed.proj.{weight,bias}``,
  ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 |
  mlp.w12, mlp.w3, ls2.gamma}``, ``norm.{weight,bias}``. Read with
  ``torch.load(path, map_location="cpu", weights_only=True)`` (PyTorch imported
  lazily), which refuses arbitrary pickled objects.
* **transformers** (``model.safetensors`` of ``facebook/dinov2-{small,base,large,
  giant}``, e.g. :data:`HF_URL`, or a directory holding it): ``embeddings.cls_token``,
  ``embeddings.position_embeddings``, ``embeddings.register_tokens``,
  ``embeddings.patch_embeddings.projection.*``, ``encoder.layer.{i}.{norm1,
  attention.attention.{query,key,value}, attention.output.dense,
  layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2 | mlp.weights_in, mlp.weights_out,
  layer_scale2.lambda1}``, ``layernorm.*``; the renamed transformers >= 5 state dict
  (``attention.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) is accepted too. Read
  with ``safetensors.numpy`` (no PyTorch). A ``config.json`` next to the file gives
  the number of heads and the LayerNorm epsilon.

The layout is recognised from the keys, whatever the container; ``*.safetensors``
(or a directory) is read with safetensors, anything else as a torch file. Any
missing, unexpected or mis-shaped tensor is an error.

The number of heads is not stored in the tensors: it comes from ``num_heads``, else
``config.json``, else the released model of that width (head dim 64). The position
interpolation defaults to the official models' (plain: ``interpolate_offset=0.1``;
with registers: ``size`` and antialiasing), whichever layout the weights came in --
dgm-eval's FDD uses the official torch-hub models; pass ``interpolate_offset=0.0`` to
reproduce transformers >= 5's ``Dinov2Model``, which dropped the offset.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models.dinov2 import DINOV2_SIZES, DINOv2, DINOv2Config
from dfm_jax.weights import files

#: The official ViT-L/14 checkpoint (s/b/g: replace ``vitl14``).
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
#: The transformers ViT-L/14 (``model.safetensors``; also -small, -base, -giant).
HF_URL = "https://huggingface.co/facebook/dinov2-large"

_HEADS_BY_WIDTH = {width: heads for width, _, heads, _ in DINOV2_SIZES.values()}
_IGNORED = ("mask_token",)


def _missing_file_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"DINOv2 weights not found: {path!r}. Download the official checkpoint, e.g. "
        f"ViT-L/14 {OFFICIAL_URL} (ViT-S/B/g: vits14/vitb14/vitg14 in both places of the "
        f"URL), or the transformers weights (model.safetensors of {HF_URL}, or "
        "facebook/dinov2-small/-base/-giant) and pass the file (or the directory holding "
        "model.safetensors and config.json)."
    )


# ----------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------


def _torch_load(path: str) -> dict[str, np.ndarray]:
    return files.read_torch(
        path,
        "Alternatively use the "
        f"transformers weights (model.safetensors of {HF_URL}), which need only the "
        "`safetensors` package.",
    )


def _resolve(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, "model.safetensors")
        if not os.path.isfile(file):
            raise _missing_file_error(file)
        return file
    if not os.path.isfile(path):
        raise _missing_file_error(path)
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a DINOv2 state dict (any layout) as numpy arrays.

    ``*.safetensors`` or a directory holding ``model.safetensors`` is read with
    safetensors, anything else with ``torch.load(weights_only=True)``.
    """
    file = _resolve(path)
    if file.endswith(".safetensors"):
        return files.read_safetensors(file)
    return _torch_load(file)


def _read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` next to (or inside, for a directory) ``path``, or {}."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.ls1.gamma"),
    (r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.ls2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2
    (r"^layernorm\.", "norm."),
)

# Tensors concatenated along the output axis into one official tensor.
_HF_FUSED = (
    (r"attention\.attention\.(query|key|value)", ("query", "key", "value"), "attn.qkv"),
    (r"attention\.(q|k|v)_proj", ("q", "k", "v"), "attn.qkv"),
    (r"mlp\.(gate|up)_proj", ("gate", "up"), "mlp.w12"),
)


def _is_transformers_layout(state: Mapping[str, np.ndarray]) -> bool:
    return "embeddings.cls_token" in state


def transformers_to_official(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a transformers DINOv2 state dict to the official key layout.

    q/k/v (or query/key/value) are concatenated into ``attn.qkv`` and SwiGLU's
    gate/up into ``mlp.w12`` (official chunk order: gate first).
    """
    out: dict[str, np.ndarray] = {}
    fused: dict[str, tuple[tuple[str, ...], dict[str, np.ndarray]]] = {}
    for key, value in state.items():
        for pattern, parts, target in _HF_FUSED:
            m = re.match(rf"^encoder\.layer\.(\d+)\.{pattern}\.(weight|bias)$", key)
            if m:
                layer, part, kind = m.groups()
                fused.setdefault(f"blocks.{layer}.{target}.{kind}", (parts, {}))[1][part] = value
                break
        else:
            new = key
            for pattern, repl in _HF_RENAMES:
                new, n = re.subn(pattern, repl, key)
                if n:
                    break
            out[new] = np.asarray(value)
    for new, (parts, pieces) in fused.items():
        missing = [p for p in parts if p not in pieces]
        if missing:
            raise ValueError(f"transformers DINOv2 weights lack the {missing} parts of {new!r}")
        out[new] = np.concatenate([np.asarray(pieces[p]) for p in parts], axis=0)
    return out


def _block_indices(state: Mapping[str, np.ndarray]) -> list[int]:
    found = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    depth = len(found)
    if found != set(range(depth)):
        raise ValueError(f"DINOv2 weights have non-contiguous block indices {sorted(found)}")
    return list(range(depth))


def infer_config(
    state: Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    **overrides: Any,
) -> DINOv2Config:
    """The ``DINOv2Config`` of an official-layout state dict.

    Args:
      state: official-layout tensors (see ``transformers_to_official``).
      num_heads: attention heads; default: the released model of that width
        (384: 6, 768: 12, 1024: 16, 1536: 24).
      overrides: other ``DINOv2Config`` fields (e.g. ``interpolate_offset``,
        ``dtype``); the position interpolation defaults to the official model's.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if key not in state:
            raise ValueError(f"not a DINOv2 state dict: {key!r} is missing")
    width = int(state["cls_token"].shape[-1])
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    n = int(state["pos_embed"].shape[1]) - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    depth = len(_block_indices(state))
    if depth == 0:
        raise ValueError("DINOv2 weights have no blocks")
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    if "blocks.0.mlp.w12.weight" in state:
        ffn, mlp_ratio = "swiglu", 4.0
        hidden = int(state["blocks.0.mlp.w12.weight"].shape[0]) // 2
        if DINOv2Config(width=width, depth=1, num_heads=1, ffn=ffn).ffn_hidden != hidden:
            raise ValueError(
                f"SwiGLU hidden size {hidden} is not DINOv2's for width {width} (mlp_ratio 4)"
            )
    else:
        ffn = "mlp"
        mlp_ratio = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / width
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH:
            raise ValueError(
                f"width {width} is not a released DINOv2 size: pass num_heads "
                f"(released widths/heads: {_HEADS_BY_WIDTH})"
            )
        num_heads = _HEADS_BY_WIDTH[width]
    kwargs: dict[str, Any] = dict(
        width=width,
        depth=depth,
        num_heads=num_heads,
        patch_size=int(proj.shape[-1]),
        in_channels=int(proj.shape[1]),
        mlp_ratio=mlp_ratio,
        ffn=ffn,
        num_register_tokens=registers,
        pos_grid=grid,
    )
    if registers:
        kwargs.update(interpolate_offset=0.0, interpolate_antialias=True)
    kwargs.update(overrides)
    return DINOv2Config(**kwargs)


def official_to_params(state: Mapping[str, np.ndarray], config: DINOv2Config) -> dict[str, Any]:
    """Map an official-layout state dict onto the ``DINOv2`` parameter tree (numpy).

    Conv OIHW -> HWIO, Linear (out, in) -> Dense kernel (in, out), LayerNorm
    weight -> scale. Every tensor must be used (``mask_token`` is ignored) and every
    shape must match the model's.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"DINOv2 weights lack {key!r}")
        used.add(key)
        return np.asarray(state[key], np.float32)

    def linear(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": take(prefix + ".weight").T, "bias": take(prefix + ".bias")}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": take(prefix + ".weight"), "bias": take(prefix + ".bias")}

    params: dict[str, Any] = {
        "patch_embed": {
            "proj": {
                "kernel": take("patch_embed.proj.weight").transpose(2, 3, 1, 0),
                "bias": take("patch_embed.proj.bias"),
            }
        },
        "cls_token": take("cls_token"),
        "pos_embed": take("pos_embed"),
        "norm": norm("norm"),
    }
    if config.num_register_tokens:
        params["register_tokens"] = take("register_tokens")
    ffn = ("w12", "w3") if config.ffn == "swiglu" else ("fc1", "fc2")
    for i in range(config.depth):
        b = f"blocks.{i}"
        params[f"blocks_{i}"] = {
            "norm1": norm(f"{b}.norm1"),
            "attn": {"qkv": linear(f"{b}.attn.qkv"), "proj": linear(f"{b}.attn.proj")},
            "ls1": {"gamma": take(f"{b}.ls1.gamma")},
            "norm2": norm(f"{b}.norm2"),
            "mlp": {name: linear(f"{b}.mlp.{name}") for name in ffn},
            "ls2": {"gamma": take(f"{b}.ls2.gamma")},
        }
    extra = sorted(k for k in state if k not in used and k not in _IGNORED)
    if extra:
        raise ValueError(f"unexpected tensors in the DINOv2 weights: {extra}")
    _check_shapes(params, config)
    return params


def _check_shapes(params: Mapping[str, Any], config: DINOv2Config) -> None:
    p = config.patch_size
    dummy = jax.ShapeDtypeStruct((1, p, p, config.in_channels), jnp.float32)
    expected = jax.eval_shape(DINOv2(config).init, jax.random.key(0), dummy)["params"]
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(params)}
    if want.keys() != got.keys():
        raise ValueError(
            f"DINOv2 parameter names differ: missing {sorted(want.keys() - got.keys())}, "
            f"unexpected {sorted(got.keys() - want.keys())}"
        )
    bad = {k: (got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])}
    if bad:
        raise ValueError(f"DINOv2 parameter shapes (got, expected) differ: {bad}")


def load_dinov2(
    path: str | os.PathLike,
    *,
    num_heads: int | None = None,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
    dtype: str = "float32",
    precision: str | None = "highest",
) -> tuple[DINOv2, dict[str, Any]]:
    """Build a ``DINOv2`` module and its parameters from released weights.

    Args:
      path: an official ``*.pth`` state dict, a transformers ``model.safetensors``
        or the directory holding it (its ``config.json`` is read if present).
      num_heads: attention heads (default: ``config.json``, else the released model
        of the inferred width).
      interpolate_offset, interpolate_antialias: position-table interpolation
        (default: the official model's; see the module docstring).
      dtype, precision: computation dtype and matmul precision (``DINOv2Config``).

    Returns:
      (module, params) for ``module.apply({"params": params}, images)``; params are
      float32 ``jax.Array``s.

    Raises:
      FileNotFoundError: no file at ``path`` (the message names where to get one).
      ValueError: the tensors are not a complete DINOv2 state dict.
    """
    state = read_state_dict(path)
    hf_config = {}
    if _is_transformers_layout(state):
        hf_config = _read_hf_config(path)
        state = transformers_to_official(state)
    if num_heads is None:
        num_heads = hf_config.get("num_attention_heads")
    overrides: dict[str, Any] = dict(dtype=dtype, precision=precision)
    if "layer_norm_eps" in hf_config:
        overrides["layer_norm_eps"] = float(hf_config["layer_norm_eps"])
    if interpolate_offset is not None:
        overrides["interpolate_offset"] = interpolate_offset
    if interpolate_antialias is not None:
        overrides["interpolate_antialias"] = interpolate_antialias
    config = infer_config(state, num_heads=num_heads, **overrides)
    params = official_to_params(state, config)
    return DINOv2(config), jax.tree.map(jnp.asarray, params)

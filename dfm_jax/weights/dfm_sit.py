"""Import the official DFM-SiT checkpoints (snap-research/elit) into ``dfm_jax.models.dit``.

The authors' public DFM reimplementation (``models/sit_dfm.py``, class ``DFMSiT``)
released DFM-SiT-XL/2 for ImageNet 512 px (``dfm_sit_imagenet_512px_1k_0400000.pt``):
a training checkpoint ``{"model", "ema", "opt", "args", "steps"}`` written by
``torch.save``. ``load_params(path, model_config)`` turns its EMA weights into the
parameter tree of our ``DiT``, so that the rest of this project (``dfm_jax.method.sampling``,
``dfm_jax.method.generation``, ``python -m dfm_jax.eval --init=PATH.pt``) uses them as if
they had been trained here. ``configs/imagenet512_dfm_sit.py`` is the matching config.

Architecture (checked against ``DiTConfig`` by ``check_architecture``): our DFM-DiT
with ``positions="sincos"``, ``stage_embedding=False``, ``preconditioning=False``;
per-scale Conv2d patch embedders whose outputs are summed; fixed MAE 2-D sin-cos
positions; per-scale timestep embedders (256 sinusoidal features of the raw t, no
x1000) whose outputs are summed with the label embedding (``num_classes + 1`` rows,
the null class is ``num_classes``); shared adaLN-Zero SiT blocks (qkv bias, GELU-tanh
MLP, no q/k norm); per-scale final layers. Depth, width, patch sizes, channels, MLP
width, class count and token grid are read from the tensor shapes; the number of
heads cannot be and is taken from the config (DFM-SiT-XL/2: 16).

State-dict layout and mapping (PyTorch ``Linear.weight`` is (out, in), our kernels
are (in, out))::

    x_embedder.embedders.{s}.proj.{weight (D, C, p, p), bias}  -> x_embedder_{s}/proj
        kernel[(i * p + j) * C + c, d] = weight[d, c, i, j]
    t_embedder.embedders.{s}.mlp.{0,2}.{weight, bias}          -> t_embedder_{s}/mlp_{0,2}
    y_embedder.embedding_table.weight (K + 1, D)               -> y_embedder/embedding_table
    pos_embed (1, L, D)                                        -> (checked, not a parameter)
    blocks.{i}.attn.qkv.{weight (3D, D), bias}                 -> blocks_{i}/attn/qkv
        kernel (D, 3, N, H), bias (3, N, H)
    blocks.{i}.attn.proj.{weight, bias}                        -> blocks_{i}/attn/proj
        kernel (N, H, D)
    blocks.{i}.mlp.fc{1,2}.*, blocks.{i}.adaLN_modulation.1.*  -> blocks_{i}/mlp/fc{1,2},
                                                                  blocks_{i}/adaLN_modulation
    final_layer.projections.{s}.{linear, adaLN_modulation.1}.* -> final_layer_{s}/...

Decisions:

* **Conventions, converted once, here** (``sit_to_paper_convention``). The official
  network is trained in the SiT convention: it takes ``t_code = 1 - t`` per scale and
  predicts ``v_code = -v`` (DFM spec, section 0). Instead of wrapping the network at
  run time, the conversion is folded into two exact linear re-parametrisations of the
  weights: (1) the sinusoidal features of ``1 - t`` are a fixed linear function of
  those of ``t`` -- per frequency f, ``cos((1 - t) f) = cos f cos(t f) + sin f sin(t f)``
  and ``sin((1 - t) f) = sin f cos(t f) - cos f sin(t f)`` -- so multiplying it into the
  first timestep-MLP kernel makes ``t_embedder_s(t) == official t_embedder_s(1 - t)``;
  (2) negating the final linear layers (kernel and bias) negates every output. The
  imported parameters therefore ARE a paper-convention DFM-DiT: no config field, no
  wrapper, nothing for the sampler, evaluation or trainer (fine-tuning) to remember,
  and no run-time cost. Both maps are involutions, so applying
  ``sit_to_paper_convention`` again gives the official weights back (an exporter).
  The tests check ``velocity(x, t) == -official(x, 1 - t)`` to float32 rounding.
* **Masked scales.** The official sampler (``dfm_utils/samplers_dfm.py``) and loss feed
  not-yet-active scales ``t_code = 1`` (paper t = 0) with the whole scale masked
  (``drop_mask`` per batch, ``zero_out_masked_levels``: input zeroed before its
  patch embedder; its timestep embedder still runs). Our ``DiT`` does the same with
  a per-example mask, and ``dfm_jax.method.sampling`` gives waiting stages t = 0 and mask 0,
  so nothing is remapped. Schedules match: the official ``stage_sampling_thresholds:
  [0.1]`` is our ``thresholds=(0.9,)``.
* **Guidance.** The official DFM sampler applies ``v_u + w (v_c - v_u)`` to every
  channel of every updated scale, with the null label hard-coded as 1000
  (= num_classes); there is no DiT-style "first 3 channels" ``forward_with_cfg`` in
  the DFM code, so our sampler's guidance is the same computation.
* **``pos_embed``** is a frozen buffer (``requires_grad=False``) saved in the state
  dict. It is not a parameter of our model, which computes the same MAE table from
  the token grid. It is compared with that table (max abs difference <= 1e-3, loose
  enough for half-precision storage, tight enough to catch any other layout or
  grid) and a mismatch is an error: a checkpoint with other positions would be
  evaluated wrongly, silently.
* **Strict keys.** Missing, unexpected and mis-shaped tensors are errors listing their
  names. The only tolerated extras are the REPA projector heads ``projectors.*``
  (training-only, never used for sampling; the released DFM-SiT has none since it
  was trained with ``enc_type: none``), skipped with a log line. ``module.`` (DDP)
  and ``_orig_mod.`` (``torch.compile``) prefixes are stripped.
* **learn_sigma.** ``DFMSiT`` sets ``out_channels = in_channels`` (no learned
  variance), as does the released checkpoint. A SiT-style final layer with
  ``2 * C`` outputs (learn_sigma) is accepted too: its first C output channels are
  the velocity, as in SiT's samplers, and only those rows are imported.
* **Reading.** ``torch.load(weights_only=True, mmap=True)``: nothing but tensors and
  plain containers is unpickled (plus ``argparse.Namespace``, the plain-data ``args``
  entry of the official training checkpoints), and only the selected state dict's
  tensors are read from disk. The EMA weights are used by default, as the official
  ``generation.py`` does.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from dfm_jax.models import dit, layers
from dfm_jax.weights import files

#: The state dicts of an official training checkpoint.
CHECKPOINT_ENTRIES = ("ema", "model")
#: Wrapper prefixes stripped from every name: DDP and torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
#: Training-only tensors that are skipped (REPA projector heads).
IGNORED_PREFIXES = ("projectors.",)
#: Max abs difference tolerated between the stored ``pos_embed`` and our sin-cos table.
POS_EMBED_ATOL = 1e-3

_ALTERNATIVE = (
    "The official DFM-SiT checkpoints are torch files; there is no safetensors "
    "release to read without PyTorch."
)


def _load(path: str) -> Any:
    return files.load_torch(path, _ALTERNATIVE, mmap=True, safe_globals=(argparse.Namespace,))


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(path: str, which: str = "ema") -> dict[str, np.ndarray]:
    """The state dict ``which`` ("ema" or "model") of a DFM-SiT file, as numpy arrays.

    Accepts an official training checkpoint (a dict whose "ema" and "model" entries
    are state dicts) or a bare state dict (``which`` then does not apply). Names lose
    their ``module.`` / ``_orig_mod.`` prefixes; floating tensors become float32.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file holds neither a state dict nor an entry ``which`` (the
        message lists the entries it has), or objects that are not loaded for safety.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DFM-SiT checkpoint {path!r} does not exist")
    obj = _load(path)
    if _is_state_dict(obj):
        logging.info("%s is a bare state dict; using it (which=%r does not apply)", path, which)
        state = obj
    elif isinstance(obj, Mapping) and which in obj:
        state = obj[which]
        if not _is_state_dict(state):
            raise ValueError(
                f"{path!r}: entry {which!r} is a {type(state).__name__}, not a state dict"
            )
    else:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else []
        dicts = [k for k in keys if _is_state_dict(obj[k])]
        raise ValueError(
            f"{path!r} has no {which!r} state dict: it holds "
            + (f"the entries {keys} (state dicts among them: {dicts})" if keys else repr(type(obj)))
            + f". Choose one of {dicts or list(CHECKPOINT_ENTRIES)} (eval: --init_key)."
        )
    return {_strip(name): array for name, array in files.tensors_to_numpy(state, path).items()}


def training_step(path: str) -> int | None:
    """The ``steps`` entry of an official training checkpoint (None for a bare state dict)."""
    obj = _load(path)
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        steps = obj.get("steps")
        if isinstance(steps, int | np.integer) and not isinstance(steps, bool):
            return int(steps)
    return None


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """The number n such that ``pattern.format(i)`` is in ``state`` for i < n (contiguous)."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What the tensor shapes of an official DFM-SiT state dict say about the network.

    Returns a dict with ``width``, ``depth``, ``patch_sizes`` (tuple), ``in_channels``,
    ``out_channels`` (C, or 2C for a learn_sigma head), ``num_classes`` (label-table
    rows - 1), ``mlp_hidden``, ``time_freq_dim``, ``grid`` (the square token grid side
    of ``pos_embed``) and ``qk_norm`` (q/k LayerNorm tensors present). The number of
    heads is not recorded in the weights.

    Raises:
      ValueError: a tensor the inference needs is absent (not a DFM-SiT state dict).
    """
    state = {_strip(k): v for k, v in state_dict.items()}
    needed = (
        "y_embedder.embedding_table.weight",
        "x_embedder.embedders.0.proj.weight",
        "t_embedder.embedders.0.mlp.0.weight",
        "blocks.0.mlp.fc1.weight",
        "final_layer.projections.0.linear.weight",
        "pos_embed",
    )
    absent = [k for k in needed if k not in state]
    if absent:
        sample = sorted(state)[:8]
        raise ValueError(
            f"not an official DFM-SiT state dict: {absent} missing (it has {len(state)} "
            f"tensors, e.g. {sample})"
        )
    shape = {k: tuple(np.shape(v)) for k, v in state.items()}
    num_scales = _count(state, "x_embedder.embedders.{}.proj.weight")
    patch_sizes = []
    for s in range(num_scales):
        w = shape[f"x_embedder.embedders.{s}.proj.weight"]
        if len(w) != 4 or w[2] != w[3]:
            raise ValueError(f"x_embedder.embedders.{s}.proj.weight is {w}, not (D, C, p, p)")
        patch_sizes.append(w[2])
    table = shape["y_embedder.embedding_table.weight"]
    in_channels = shape["x_embedder.embedders.0.proj.weight"][1]
    out_features = shape["final_layer.projections.0.linear.weight"][0]
    pos = shape["pos_embed"]
    grid = math.isqrt(pos[-2]) if len(pos) == 3 else -1
    if len(pos) != 3 or pos[0] != 1 or grid * grid != pos[-2]:
        raise ValueError(f"pos_embed has shape {pos}; expected (1, g * g, D) for a square grid")
    return {
        "width": table[1],
        "depth": _count(state, "blocks.{}.attn.qkv.weight"),
        "patch_sizes": tuple(patch_sizes),
        "in_channels": in_channels,
        "out_channels": out_features // (patch_sizes[0] ** 2),
        "num_classes": table[0] - 1,
        "mlp_hidden": shape["blocks.0.mlp.fc1.weight"][0],
        "time_freq_dim": shape["t_embedder.embedders.0.mlp.0.weight"][1],
        "grid": grid,
        "qk_norm": any(".attn.q_norm." in k or ".attn.k_norm." in k for k in state),
    }


def check_architecture(
    arch: Mapping[str, Any], config: dit.DiTConfig, grid: tuple[int, ...] | None = None
) -> None:
    """Raises ValueError listing every difference between a checkpoint and ``config``.

    Args:
      arch: ``infer_architecture`` of the checkpoint.
      config: the model configuration the weights are imported into.
      grid: the token grid the model will run on (e.g. (32, 32)), if known; the
        official network only runs on the grid of its ``pos_embed``.
    """
    problems = []

    def differ(what: str, ours: Any, theirs: Any, fix: str) -> None:
        if ours != theirs:
            problems.append(f"{what}: checkpoint {theirs}, config {ours} ({fix})")

    differ("width", config.width, arch["width"], "config.model.size / width")
    differ("depth", config.depth, arch["depth"], "config.model.size / depth")
    differ("patch sizes", config.patch_sizes, arch["patch_sizes"], "config.model.patch_sizes")
    differ("channels", config.in_channels, arch["in_channels"], "config.data.channels")
    differ("classes", config.num_classes, arch["num_classes"], "config.data.num_classes")
    differ("MLP hidden size", config.mlp_hidden, arch["mlp_hidden"], "DiTConfig.mlp_ratio")
    differ("timestep features", config.time_freq_dim, arch["time_freq_dim"], "time_freq_dim")
    if arch["out_channels"] not in (arch["in_channels"], 2 * arch["in_channels"]):
        problems.append(
            f"final layers output {arch['out_channels']} channels per pixel for "
            f"{arch['in_channels']} input channels (expected C, or 2C with learn_sigma)"
        )
    if arch["qk_norm"]:
        problems.append("the checkpoint normalises q and k (qk_norm=True); our DiT has no q/k norm")
    if grid is not None and tuple(grid) != (arch["grid"],) * 2:
        problems.append(
            f"token grid: checkpoint {(arch['grid'],) * 2} (its pos_embed), model input "
            f"{tuple(grid)} (config.data.resolution / patch sizes)"
        )
    differ("positions", config.positions, "sincos", "config.model.positions")
    differ("stage embedding", config.stage_embedding, False, "config.model.stage_embedding")
    differ("preconditioning", config.preconditioning, False, "config.model.preconditioning")
    differ("qkv bias", config.qkv_bias, True, "DiTConfig.qkv_bias")
    differ("timestep max period", config.time_max_period, 10000.0, "DiTConfig.time_max_period")
    if problems:
        raise ValueError(
            "the DFM-SiT checkpoint does not match the model config:\n  " + "\n  ".join(problems)
        )


def official_shapes(config: dit.DiTConfig, grid: int, out_channels: int) -> dict[str, tuple]:
    """Every tensor name of the official state dict for ``config`` and its shape."""
    d, c, f, h = config.width, config.in_channels, config.time_freq_dim, config.mlp_hidden
    shapes: dict[str, tuple] = {
        "y_embedder.embedding_table.weight": (config.num_classes + 1, d),
        "pos_embed": (1, grid * grid, d),
    }

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    for s, p in enumerate(config.patch_sizes):
        shapes[f"x_embedder.embedders.{s}.proj.weight"] = (d, c, p, p)
        shapes[f"x_embedder.embedders.{s}.proj.bias"] = (d,)
        linear(f"t_embedder.embedders.{s}.mlp.0", f, d)
        linear(f"t_embedder.embedders.{s}.mlp.2", d, d)
        linear(f"final_layer.projections.{s}.adaLN_modulation.1", d, 2 * d)
        linear(f"final_layer.projections.{s}.linear", d, p * p * out_channels)
    for i in range(config.depth):
        linear(f"blocks.{i}.attn.qkv", d, 3 * d)
        linear(f"blocks.{i}.attn.proj", d, d)
        linear(f"blocks.{i}.mlp.fc1", d, h)
        linear(f"blocks.{i}.mlp.fc2", h, d)
        linear(f"blocks.{i}.adaLN_modulation.1", d, 6 * d)
    return shapes


def _check_keys(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError("DFM-SiT state dict does not fit the model:\n  " + "\n  ".join(problems))


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: dit.DiTConfig,
    *,
    grid: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Our ``DiT`` parameters (paper convention) from an official DFM-SiT state dict.

    Strict: the architecture must match ``config`` (``check_architecture``), every
    tensor of the official layout must be present with its shape, nothing else may
    be (except the skipped ``projectors.*``), and ``pos_embed`` must equal our
    sin-cos table. The SiT-to-paper conversion (``sit_to_paper_convention``) is
    applied, so ``DiT(config).apply({"params": p}, scales, t, mask, labels)`` is the
    paper-convention velocity: ``-official(scales, 1 - t, labels, mask)``.

    Args:
      state_dict: name -> numpy array (e.g. from ``read_checkpoint``).
      config: the DiT configuration; ``num_heads`` splits the attention weights.
      grid: the token grid the model will run on, checked against ``pos_embed``.

    Returns:
      The unboxed parameter tree, leaves numpy arrays of ``config.param_dtype``.

    Raises:
      ValueError: naming every mismatching field or tensor.
    """
    state = {}
    skipped = []
    for name, value in state_dict.items():
        name = _strip(name)
        if name.startswith(IGNORED_PREFIXES):
            skipped.append(name)
        else:
            state[name] = np.asarray(value)
    if skipped:
        logging.info("DFM-SiT import: skipping %d training-only tensors %s", len(skipped), skipped)
    arch = infer_architecture(state)
    check_architecture(arch, config, grid)
    _check_keys(state, official_shapes(config, arch["grid"], arch["out_channels"]))
    table = layers.sincos_pos_embed(config.width, (arch["grid"],) * 2).astype(np.float32)
    error = float(np.abs(state["pos_embed"][0].astype(np.float32) - table).max())
    if not error <= POS_EMBED_ATOL:
        raise ValueError(
            f"pos_embed differs from the MAE 2-D sin-cos table of a {arch['grid']}x"
            f"{arch['grid']} grid by up to {error:.3g} (> {POS_EMBED_ATOL}): these "
            "positions cannot be represented by DiTConfig(positions='sincos')"
        )
    params = _map_layout(state, config, arch["out_channels"])
    params = sit_to_paper_convention(params, config)
    dtype = jnp.dtype(config.param_dtype)
    return _tree_map(lambda a: np.asarray(a, np.float32).astype(dtype), params)


def _tree_map(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _map_layout(
    g: Mapping[str, np.ndarray], config: dit.DiTConfig, out_channels: int
) -> dict[str, Any]:
    """The official tensors in our tree and layouts (still in the SiT convention)."""
    d, c, n, hd = config.width, config.in_channels, config.num_heads, config.head_dim
    f32 = np.float32

    def lin(prefix: str) -> dict[str, np.ndarray]:
        return {
            "kernel": np.asarray(g[prefix + ".weight"], f32).T,
            "bias": np.asarray(g[prefix + ".bias"], f32),
        }

    params: dict[str, Any] = {
        "y_embedder": {"embedding_table": np.asarray(g["y_embedder.embedding_table.weight"], f32)}
    }
    for s, p in enumerate(config.patch_sizes):
        w = np.asarray(g[f"x_embedder.embedders.{s}.proj.weight"], f32)  # (D, C, p, p)
        params[f"x_embedder_{s}"] = {
            "proj": {
                "kernel": w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
                "bias": np.asarray(g[f"x_embedder.embedders.{s}.proj.bias"], f32),
            }
        }
        params[f"t_embedder_{s}"] = {
            "mlp_0": lin(f"t_embedder.embedders.{s}.mlp.0"),
            "mlp_2": lin(f"t_embedder.embedders.{s}.mlp.2"),
        }
        head = lin(f"final_layer.projections.{s}.linear")  # kernel (D, p*p*out_channels)
        if out_channels != c:  # learn_sigma: keep the first C channels (the velocity)
            head = {
                "kernel": head["kernel"].reshape(d, p, p, out_channels)[..., :c].reshape(d, -1),
                "bias": head["bias"].reshape(p, p, out_channels)[..., :c].reshape(-1),
            }
        params[f"final_layer_{s}"] = {
            "adaLN_modulation": lin(f"final_layer.projections.{s}.adaLN_modulation.1"),
            "linear": head,
        }
    for i in range(config.depth):
        qkv = lin(f"blocks.{i}.attn.qkv")
        proj = lin(f"blocks.{i}.attn.proj")
        params[f"blocks_{i}"] = {
            "adaLN_modulation": lin(f"blocks.{i}.adaLN_modulation.1"),
            "attn": {
                "qkv": {
                    "kernel": qkv["kernel"].reshape(d, 3, n, hd),
                    "bias": qkv["bias"].reshape(3, n, hd),
                },
                "proj": {"kernel": proj["kernel"].reshape(n, hd, d), "bias": proj["bias"]},
            },
            "mlp": {"fc1": lin(f"blocks.{i}.mlp.fc1"), "fc2": lin(f"blocks.{i}.mlp.fc2")},
        }
    return params


def _time_reflection(config: dit.DiTConfig) -> np.ndarray:
    """R (F, F) with ``features(1 - t) = features(t) @ R`` for ``layers.timestep_embedding``.

    Features are ``[cos(t f_i), sin(t f_i)]`` (i < F // 2, cosines first, a zero
    column when F is odd) with the same float32 frequencies as the embedding. R is an
    involution (R @ R = I).
    """
    dim, half = config.time_freq_dim, config.time_freq_dim // 2
    freqs = np.exp(
        -math.log(config.time_max_period) * np.arange(half, dtype=np.float32) / np.float32(half)
    ).astype(np.float64)
    cos, sin = np.cos(freqs), np.sin(freqs)
    r = np.zeros((dim, dim))
    i = np.arange(half)
    # new_cos_i = cos f_i * cos_i + sin f_i * sin_i ; new_sin_i = sin f_i * cos_i - cos f_i * sin_i
    r[i, i], r[half + i, i] = cos, sin
    r[i, half + i], r[half + i, half + i] = sin, -cos
    return r


def sit_to_paper_convention(params: Mapping[str, Any], config: dit.DiTConfig) -> dict[str, Any]:
    """Re-parametrises a SiT-convention DiT into the paper convention (and back).

    Given parameters P of a network ``G(x, t_code) = v_code`` (SiT convention:
    ``t_code = 1 - t``, ``v_code = -v``), returns P' with ``G'(x, t) = -G(x, 1 - t)``
    for every input, exactly up to float rounding:

    * ``t_embedder_{s}/mlp_0/kernel`` becomes ``R @ kernel`` with R the linear map
      taking the sinusoidal features of t to those of 1 - t (``_time_reflection``);
    * ``final_layer_{s}/linear/{kernel, bias}`` are negated.

    This is THE place where the conventions are converted (see the module docstring);
    it is its own inverse. ``params`` is not modified.
    """
    reflection = _time_reflection(config)
    out = dict(params)
    for s in range(config.num_scales):
        t_emb = dict(out[f"t_embedder_{s}"])
        mlp_0 = dict(t_emb["mlp_0"])
        kernel = np.asarray(mlp_0["kernel"])
        mlp_0["kernel"] = (reflection @ kernel.astype(np.float64)).astype(kernel.dtype)
        t_emb["mlp_0"] = mlp_0
        out[f"t_embedder_{s}"] = t_emb
        final = dict(out[f"final_layer_{s}"])
        final["linear"] = {k: -np.asarray(v) for k, v in final["linear"].items()}
        out[f"final_layer_{s}"] = final
    return out


def load_params(
    path: str,
    config: dit.DiTConfig,
    *,
    which: str = "ema",
    grid: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """``params_from_state_dict(read_checkpoint(path, which), config, grid=grid)``."""
    params = params_from_state_dict(read_checkpoint(path, which), config, grid=grid)
    logging.info("Imported the %r weights of DFM-SiT checkpoint %s", which, path)
    return params

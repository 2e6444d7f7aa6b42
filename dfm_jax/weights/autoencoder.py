"""Import diffusers ``AutoencoderKL`` weights into ``dfm_jax.models.autoencoder``.

The weights are diffusers' ``diffusion_pytorch_model.safetensors`` of an
``AutoencoderKL``: ``stabilityai/sd-vae-ft-ema`` or ``-ft-mse`` (top level), or the
``vae/`` subfolder of a pipeline such as ``black-forest-labs/FLUX.1-dev`` (the
FLUX repository's top-level ``ae.safetensors`` is the original BFL layout, which is
recognised and refused with a pointer to the diffusers file). Download them once by
hand; nothing here touches the network. A ``diffusion_pytorch_model.bin`` torch file
is read with ``torch.load(weights_only=True)`` (PyTorch imported lazily).

Key mapping (state dict -> Flax parameter path): dots between a name and a list
index become ``_`` (``encoder.down_blocks.0.resnets.1.norm1.weight`` ->
``encoder/down_blocks_0/resnets_1/norm1/scale``, ``...attentions.0.to_out.0.bias`` ->
``.../attentions_0/to_out_0/bias``); GroupNorm ``weight`` -> ``scale``; conv weights
OIHW -> ``kernel`` HWIO; linear weights (out, in) -> ``kernel`` (in, out) (a 1x1
conv weight (out, in, 1, 1) is accepted there too); ``bias`` -> ``bias``. The legacy
attention names of older diffusers checkpoints (``query``, ``key``, ``value``,
``proj_attn``, which the sd-vae-ft-* files still use) are renamed to ``to_q``,
``to_k``, ``to_v``, ``to_out.0`` first, as diffusers' loader does. Any missing,
unexpected or mis-shaped tensor is an error naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dfm_jax.models.autoencoder import WEIGHTS_SOURCES, AutoencoderConfig, abstract_params
from dfm_jax.weights import files

#: File names of diffusers' weights, tried in order inside a directory (and its ``vae/``).
DIFFUSERS_FILENAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
#: Keys that only the original (LDM / BFL ``ae.safetensors``) layout has.
_ORIGINAL_LAYOUT_RE = re.compile(
    r"^(encoder\.down\.\d+\.block|decoder\.up\.\d+\.block|encoder\.mid\.)"
)


def _where(config: AutoencoderConfig) -> str:
    return WEIGHTS_SOURCES.get(config.name, "the diffusers release of the model")


def resolve_weights_path(path: str | os.PathLike, config: AutoencoderConfig) -> str:
    """The weights file for ``path``: the file itself, or, in a directory (or its
    ``vae/`` subfolder), the first of :data:`DIFFUSERS_FILENAMES`.

    Raises:
      FileNotFoundError: nothing found (the message says where to get the weights).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            for name in DIFFUSERS_FILENAMES:
                file = os.path.join(folder, name)
                if os.path.isfile(file):
                    return file
    raise FileNotFoundError(
        f"autoencoder weights not found: {path!r} (a file, or a directory holding "
        f"{DIFFUSERS_FILENAMES[0]} or vae/{DIFFUSERS_FILENAMES[0]}). For {config.name!r} "
        f"download {_where(config)}."
    )


def read_state_dict(path: str | os.PathLike, config: AutoencoderConfig) -> dict[str, np.ndarray]:
    """Read the diffusers state dict at ``path`` (see :func:`resolve_weights_path`).

    ``*.safetensors`` is read with safetensors (no PyTorch), anything else with
    ``torch.load(weights_only=True)``.
    """
    file = resolve_weights_path(path, config)
    if file.endswith(".safetensors"):
        return files.read_safetensors(file)
    return files.read_torch(
        file,
        "Alternatively download the .safetensors file of the same release, which needs "
        "only the `safetensors` package.",
    )


def rename_legacy_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename old diffusers attention keys (``query``/``key``/``value``/``proj_attn``)."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_RE.match(key)
        if m:
            key = f"{m[1]}.{_LEGACY_ATTENTION[m[2]]}.{m[3]}"
        out[key] = value
    return out


def _torch_key(names: list[str]) -> tuple[str, str]:
    """Flax path -> (state-dict key, leaf kind); ``down_blocks_0`` -> ``down_blocks.0``."""
    parts = [re.sub(r"_(\d+)$", r".\1", n) for n in names[:-1]]
    last = names[-1]
    leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}[last]
    return ".".join([*parts, leaf]), last


def params_from_state_dict(
    state_dict: Mapping[str, Any], config: AutoencoderConfig, source: str = "state dict"
) -> dict[str, Any]:
    """Map a diffusers ``AutoencoderKL`` state dict onto the Flax parameter tree.

    Args:
      state_dict: name -> array (numpy, or anything ``np.asarray`` accepts).
      config: the architecture the weights must fit.
      source: what to call the weights in error messages (e.g. the file name).

    Returns:
      The parameters of ``AutoencoderKL(config)`` as float32 numpy arrays.

    Raises:
      ValueError: keys are missing, unexpected or of the wrong shape (all listed),
        or the weights are in the original (non-diffusers) layout.
    """
    if any(_ORIGINAL_LAYOUT_RE.match(k) for k in state_dict):
        raise ValueError(
            f"{source} is in the original (LDM / BFL ae.safetensors) layout, not diffusers'. "
            f"Use the diffusers AutoencoderKL weights instead: {_where(config)}."
        )
    state = rename_legacy_attention(state_dict)
    used: set[str] = set()
    missing: list[str] = []
    bad_shape: list[str] = []

    def leaf(path, spec):
        key, kind = _torch_key([p.key for p in path])
        if key not in state:
            missing.append(key)
            return None
        used.add(key)
        value = np.asarray(state[key], dtype=np.float32)
        if kind == "kernel" and len(spec.shape) == 4 and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "kernel" and len(spec.shape) == 2:
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]  # a 1x1 conv used as a linear layer
            if value.ndim == 2:
                value = value.T  # (out, in) -> (in, out)
        if value.shape != tuple(spec.shape):
            bad_shape.append(f"{key}: {np.shape(state[key])} -> {value.shape} != {spec.shape}")
            return None
        return np.ascontiguousarray(value)

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
    unexpected = sorted(k for k in state if k not in used)
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{source} does not match the autoencoder {config.name!r} "
            f"(latent_channels={config.latent_channels}, "
            f"block_out_channels={config.block_out_channels}, "
            f"use_quant_conv={config.use_quant_conv}): "
            + files.describe_mismatch(missing, unexpected, bad_shape)
        )
    return params


def load_autoencoder_params(path: str | os.PathLike, config: AutoencoderConfig) -> dict[str, Any]:
    """Read diffusers ``AutoencoderKL`` weights and map them onto ``AutoencoderKL(config)``.

    Args:
      path: ``diffusion_pytorch_model.safetensors`` (or ``.bin``), the directory
        holding it, or a diffusers pipeline directory with a ``vae/`` subfolder.
      config: the architecture, e.g. ``autoencoder_config("flux-ae")``.

    Returns:
      float32 numpy parameters for ``AutoencoderKL(config).apply({"params": ...})``.

    Raises:
      FileNotFoundError: no weights at ``path`` (the message says where to get them).
      ValueError: the weights do not fit ``config`` (missing, unexpected and
        mis-shaped keys are listed, with the file name).
    """
    file = resolve_weights_path(path, config)
    return params_from_state_dict(read_state_dict(file, config), config, source=repr(file))

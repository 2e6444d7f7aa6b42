"""Import diffusers ``AutoencoderKLCogVideoX`` weights into ``dfm_jax.models.cogvideox``.

The weights are the ``vae/`` folder of a diffusers CogVideoX pipeline
(``THUDM/CogVideoX-2b`` or ``-5b``): ``diffusion_pytorch_model.safetensors`` and
``config.json``, whose fields give the architecture and the scaling factor (2b:
1.15258426, 5b: 0.7). Download them once by hand; nothing here touches the network.

Key mapping (state dict -> Flax parameter path): dots between a name and a list
index become ``_`` (``encoder.down_blocks.0.resnets.1.conv1.conv.weight`` ->
``encoder/down_blocks_0/resnets_1/conv1/conv/kernel``); GroupNorm ``weight`` ->
``scale``; Conv3d weights OIDHW -> DHWIO, Conv2d weights OIHW -> HWIO. Any missing,
unexpected or mis-shaped tensor is an error naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dfm_jax.models.cogvideox import (
    VIDEO_PRESETS,
    VIDEO_WEIGHTS_SOURCES,
    CogVideoXConfig,
    abstract_params,
    video_autoencoder_config,
)
from dfm_jax.weights import files

WEIGHTS_FILENAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_FILENAME = "config.json"

#: diffusers config field -> CogVideoXConfig field.
_CONFIG_FIELDS = {
    "in_channels": "in_channels",
    "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_num_groups",
    "temporal_compression_ratio": "temporal_compression_ratio",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
}
#: diffusers config fields this port supports only at these values.
_REQUIRED = {
    "_class_name": "AutoencoderKLCogVideoX",
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "latents_mean": None,
    "latents_std": None,
}


def _where(name: str) -> str:
    return VIDEO_WEIGHTS_SOURCES.get(
        name, "https://huggingface.co/THUDM/CogVideoX-2b (the vae/ folder)"
    )


def resolve_weights_path(path: str | os.PathLike, name: str = "") -> str:
    """The weights file for ``path``: the file, or the first of :data:`WEIGHTS_FILENAMES`
    in the directory or its ``vae/`` subfolder.

    Raises:
      FileNotFoundError: nothing found (the message says what to download).
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            for filename in WEIGHTS_FILENAMES:
                file = os.path.join(folder, filename)
                if os.path.isfile(file):
                    return file
    raise FileNotFoundError(
        f"CogVideoX autoencoder weights not found: {path!r} (a file, or a directory holding "
        f"{WEIGHTS_FILENAMES[0]} and {CONFIG_FILENAME}, or its vae/ subfolder). Download "
        f"{_where(name)}."
    )


def config_from_diffusers(
    diffusers_config: Mapping[str, Any], name: str = "cogvideox", source: str = "config"
) -> dict[str, Any]:
    """:class:`CogVideoXConfig` keyword arguments from a diffusers ``config.json`` dict.

    Raises:
      ValueError: a field this port does not support (named, with ``source``).
    """
    for key, want in _REQUIRED.items():
        if key in diffusers_config and diffusers_config[key] != want:
            raise ValueError(
                f"{source}: {key}={diffusers_config[key]!r} is not supported by the CogVideoX "
                f"port (needs {want!r})"
            )
    out_channels = diffusers_config.get("out_channels", diffusers_config.get("in_channels", 3))
    if out_channels != diffusers_config.get("in_channels", 3):
        raise ValueError(f"{source}: out_channels must equal in_channels")
    kwargs = {
        ours: diffusers_config[theirs]
        for theirs, ours in _CONFIG_FIELDS.items()
        if theirs in diffusers_config
    }
    if kwargs.get("shift_factor") is None:
        kwargs["shift_factor"] = 0.0
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return kwargs


def read_config(weights_file: str) -> dict[str, Any] | None:
    """The diffusers ``config.json`` next to ``weights_file`` as a dict, or None if absent."""
    file = os.path.join(os.path.dirname(weights_file), CONFIG_FILENAME)
    if not os.path.isfile(file):
        return None
    with open(file) as fh:
        return json.load(fh)


def _torch_key(names: list[str]) -> tuple[str, str]:
    """Flax path -> (state-dict key, leaf kind); ``down_blocks_0`` -> ``down_blocks.0``."""
    parts = [re.sub(r"_(\d+)$", r".\1", n) for n in names[:-1]]
    leaf = {"scale": "weight", "kernel": "weight", "bias": "bias"}[names[-1]]
    return ".".join([*parts, leaf]), names[-1]


def params_from_state_dict(
    state_dict: Mapping[str, Any], config: CogVideoXConfig, source: str = "state dict"
) -> dict[str, Any]:
    """Map a diffusers ``AutoencoderKLCogVideoX`` state dict onto the Flax parameter tree.

    Returns:
      The parameters of ``CogVideoXAutoencoder(config)`` as float32 numpy arrays.

    Raises:
      ValueError: keys missing, unexpected or mis-shaped (all listed, with ``source``).
    """
    used: set[str] = set()
    missing: list[str] = []
    bad_shape: list[str] = []

    def leaf(path, spec):
        key, kind = _torch_key([p.key for p in path])
        if key not in state_dict:
            missing.append(key)
            return None
        used.add(key)
        value = np.asarray(state_dict[key], dtype=np.float32)
        if kind == "kernel" and value.ndim >= 3:
            value = value.transpose(*range(2, value.ndim), 1, 0)  # O I *K -> *K I O
        if value.shape != tuple(spec.shape):
            bad_shape.append(f"{key}: {np.shape(state_dict[key])} -> {value.shape} != {spec.shape}")
            return None
        return np.ascontiguousarray(value)

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params(config))
    unexpected = sorted(k for k in state_dict if k not in used)
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{source} does not match the CogVideoX autoencoder {config.name!r} "
            f"(latent_channels={config.latent_channels}, "
            f"block_out_channels={config.block_out_channels}, "
            f"layers_per_block={config.layers_per_block}): "
            + files.describe_mismatch(missing, unexpected, bad_shape)
        )
    return params


def load_cogvideox(
    path: str | os.PathLike, name: str = "", **overrides: Any
) -> tuple[CogVideoXConfig, dict[str, Any]]:
    """Read diffusers CogVideoX autoencoder weights and their configuration.

    Args:
      path: the ``vae/`` folder (weights and ``config.json``), the weights file, or
        the pipeline directory.
      name: a preset of :data:`VIDEO_PRESETS`, used when there is no ``config.json``
        (else only as the configuration's name).
      overrides: other :class:`CogVideoXConfig` fields (``dtype``, chunk sizes).

    Returns:
      (config, float32 numpy parameters of ``CogVideoXAutoencoder(config)``).

    Raises:
      FileNotFoundError: no weights, or neither ``config.json`` nor a preset name.
      ValueError: unsupported configuration, or weights not matching it.
    """
    file = resolve_weights_path(path, name)
    diffusers_config = read_config(file)
    if diffusers_config is not None:
        where = repr(os.path.join(os.path.dirname(file), CONFIG_FILENAME))
        kwargs = config_from_diffusers(diffusers_config, source=where)
        config = CogVideoXConfig(name=name or "cogvideox", **{**kwargs, **overrides})
    elif name in VIDEO_PRESETS:
        config = video_autoencoder_config(name, **overrides)
    else:
        raise FileNotFoundError(
            f"no {CONFIG_FILENAME} next to {file!r} and no preset name given: keep the "
            f"diffusers vae/ folder together ({_where(name)})"
        )
    if file.endswith(".safetensors"):
        state = files.read_safetensors(file)
    else:
        state = files.read_torch(file, "Alternatively download the .safetensors file.")
    return config, params_from_state_dict(state, config, source=repr(file))

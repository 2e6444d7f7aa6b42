"""Reading state dicts safely: safetensors files, or torch files with ``weights_only=True``.

Both readers return ``{name: numpy array}``; nothing but tensors is ever
unpickled. PyTorch is imported only when a torch file is read (it is a
test-only dependency of this project).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def read_torch(path: str, alternative: str) -> dict[str, np.ndarray]:
    """A torch state dict as numpy arrays (floating tensors as float32).

    Args:
      path: a file written by ``torch.save(state_dict)``.
      alternative: a sentence telling the user how to avoid PyTorch for this
        file (shown when PyTorch is missing).

    Raises:
      ImportError: PyTorch is not installed.
      ValueError: the file is not a flat mapping of names to tensors.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading the torch file {path!r} needs PyTorch (`pip install torch`; the CPU "
            f"build is enough). {alternative}"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path!r}: entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[name] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as numpy arrays (no PyTorch needed)."""
    from safetensors.numpy import load_file

    return dict(load_file(path))

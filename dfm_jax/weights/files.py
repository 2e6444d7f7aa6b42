"""Reading state dicts safely: safetensors files, or torch files with ``weights_only=True``.

The readers return ``{name: numpy array}``; nothing but tensors and plain
containers is ever unpickled. PyTorch is imported only when a torch file is read
(it is a test-only dependency of this project).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def load_torch(
    path: str, alternative: str, *, mmap: bool = False, safe_globals: Sequence[type] = ()
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors in plain containers.

    Args:
      path: a file written by ``torch.save``.
      alternative: a sentence telling the user how to avoid PyTorch for this
        file (shown when PyTorch is missing).
      mmap: memory-map the file (zip-format files only; ignored for legacy ones),
        so that only the tensors actually converted are read from disk -- e.g. the
        EMA weights of a training checkpoint that also holds the optimizer state.
      safe_globals: extra plain-data classes to allow (e.g. ``argparse.Namespace``,
        which training scripts store next to the weights).

    Raises:
      ImportError: PyTorch is not installed.
      ValueError: the file holds objects that ``weights_only`` refuses to unpickle.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading the torch file {path!r} needs PyTorch (`pip install torch`; the CPU "
            f"build is enough). {alternative}"
        ) from e
    mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path!r} holds Python objects that are not loaded for safety (weights_only=True). "
            "On a machine where you trust the file, re-save just the state dict, e.g. "
            "torch.save(torch.load(path, weights_only=False)['ema'], 'ema.pt'). "
            f"PyTorch said: {e}"
        ) from e


def tensors_to_numpy(state: Any, where: str) -> dict[str, np.ndarray]:
    """A flat ``{name: tensor}`` mapping as numpy arrays (floating tensors as float32).

    Raises:
      ValueError: ``state`` is not a mapping of names to tensors (``where`` names it).
    """
    import torch

    if not isinstance(state, Mapping):
        raise ValueError(f"{where} holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[name] = (value.float() if value.is_floating_point() else value).numpy()
    return out


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
    return tensors_to_numpy(load_torch(path, alternative), repr(path))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as numpy arrays (no PyTorch needed)."""
    from safetensors.numpy import load_file

    return dict(load_file(path))


def describe_mismatch(
    missing: Sequence[str], unexpected: Sequence[str], bad_shape: Sequence[str], shown: int = 8
) -> str:
    """ "missing: a, b; unexpected: c; bad shape: ...", each list cut after ``shown`` names.

    The body of an importer's error when a state dict does not fit the model; empty when
    all three lists are.
    """
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("bad shape", bad_shape)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
            parts.append(f"{what}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)

"""Import the FID InceptionV3 weights of pytorch-fid into ``dfm_jax.models.inception``.

The weights are pytorch-fid's port of the TF 2015-12-05 Inception graph,
``pt_inception-2015-12-05-6726825d.pth`` (:data:`WEIGHTS_URL`): a plain PyTorch
state dict with keys ``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.weight``,
``...bn.bias``, ``...bn.running_mean``, ``...bn.running_var``,
``Mixed_5b.branch1x1.conv.weight``, ..., ``fc.weight`` (1008, 2048), ``fc.bias``.
Download it once by hand (tests and library code never touch the network).

Two file formats are read, chosen by the file name:

* ``*.safetensors`` with the same keys, read with ``safetensors.numpy`` (no
  PyTorch needed). :func:`convert_to_safetensors` writes one from the ``.pth``.
* anything else as a torch file, read with ``torch.load(..., weights_only=True)``,
  which refuses arbitrary pickled objects. PyTorch (CPU is enough) is imported
  only here, lazily.

Mapping to Flax (``{"params": ..., "batch_stats": ...}``): conv weights OIHW ->
HWIO ``conv/kernel``; BatchNorm ``weight``/``bias`` -> ``bn/scale``/``bn/bias``
(params) and ``running_mean``/``running_var`` -> ``bn/mean``/``bn/var``
(batch_stats); ``fc.weight`` (out, in) -> ``fc/kernel`` (in, out), ``fc.bias`` ->
``fc/bias``. BatchNorm ``num_batches_tracked`` counters and torchvision's
``AuxLogits.*`` head are ignored; any other missing, extra or mis-shaped key is
an error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models.inception import INPUT_SIZE, InceptionV3
from dfm_jax.weights import files

#: pytorch-fid's release of the FID Inception weights.
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)

_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("AuxLogits.",)


def _missing_file_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights not found: {path!r}. Download pytorch-fid's "
        f"{WEIGHTS_FILENAME} from {WEIGHTS_URL} (e.g. `wget {WEIGHTS_URL}`) and pass its "
        "path, or a .safetensors conversion of it "
        "(dfm_jax.weights.inception.convert_to_safetensors)."
    )


def _torch_load(path: str) -> dict[str, np.ndarray]:
    return files.read_torch(
        path,
        "Alternatively convert it "
        "once, on a machine with torch, with "
        "dfm_jax.weights.inception.convert_to_safetensors and load the .safetensors file, "
        "which needs only the `safetensors` package.",
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict (name -> numpy array) from a torch or ``.safetensors`` file.

    Args:
      path: ``*.safetensors`` (read with ``safetensors.numpy``) or a torch file
        (read with ``torch.load(weights_only=True)``; needs PyTorch).

    Raises:
      FileNotFoundError: the file does not exist (the message says where the FID
        weights are published).
      ImportError: the reader's package (torch or safetensors) is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing_file_error(path)
    if path.endswith(".safetensors"):
        return files.read_safetensors(path)
    return _torch_load(path)


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the tensors of the torch state dict ``src`` to the safetensors file ``dst``.

    Keys are unchanged, so ``dst`` loads with :func:`load_inception` without PyTorch.
    """
    from safetensors.numpy import save_file

    state = load_state_dict(src)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.fspath(dst))


@functools.cache
def _abstract_variables(num_classes: int) -> dict[str, Any]:
    """Shapes of the variables of ``InceptionV3(num_classes=...)`` (dtype and precision
    do not change them)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3(num_classes=num_classes).init, jax.random.key(0), x)


def convert_state_dict(
    state_dict: Mapping[str, Any], module: InceptionV3 | None = None
) -> dict[str, Any]:
    """Map a pytorch-fid InceptionV3 state dict to Flax variables.

    Args:
      state_dict: name -> array (numpy or anything ``np.asarray`` accepts).
      module: the Flax module whose variable tree is filled (default
        ``InceptionV3()``); only its structure and shapes are used.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays with the
      structure of ``module.init``.

    Raises:
      ValueError: keys are missing, unexpected or of the wrong shape (all listed).
    """
    module = InceptionV3() if module is None else module
    abstract = _abstract_variables(module.num_classes)
    used: set[str] = set()
    missing: list[str] = []
    bad_shape: list[str] = []

    def fill(collection: str):
        def leaf(path, spec):
            names = [p.key for p in path]
            prefix, last = ".".join(names[:-1]), names[-1]
            transpose = None
            if collection == "batch_stats":
                key = f"{prefix}.{_BN_STATS[last]}"
            elif names[-2] == "bn":
                key = f"{prefix}.{_BN_PARAMS[last]}"
            elif last == "kernel" and len(spec.shape) == 4:
                key, transpose = f"{prefix}.weight", (2, 3, 1, 0)  # OIHW -> HWIO
            elif last == "kernel":
                key, transpose = f"{prefix}.weight", (1, 0)  # (out, in) -> (in, out)
            else:
                key = f"{prefix}.{last}"
            if key not in state_dict:
                missing.append(key)
                return None
            used.add(key)
            value = np.asarray(state_dict[key], dtype=np.float32)
            if transpose is not None and value.ndim == len(transpose):
                value = value.transpose(transpose)
            if value.shape != tuple(spec.shape):
                bad_shape.append(
                    f"{key}: {np.shape(state_dict[key])} -> {value.shape} != {spec.shape}"
                )
                return None
            return np.ascontiguousarray(value)

        return jax.tree_util.tree_map_with_path(leaf, abstract[collection])

    variables = {"params": fill("params"), "batch_stats": fill("batch_stats")}
    unexpected = sorted(
        k
        for k in state_dict
        if k not in used
        and not k.endswith(_IGNORED_SUFFIXES)
        and not k.startswith(_IGNORED_PREFIXES)
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            "state dict does not match the FID InceptionV3 (pytorch-fid "
            f"{WEIGHTS_FILENAME}): " + files.describe_mismatch(missing, unexpected, bad_shape)
        )
    return variables


def load_inception(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    precision: Any = "highest",
) -> tuple[InceptionV3, dict[str, Any]]:
    """Build the FID InceptionV3 and load pytorch-fid's weights into it.

    Args:
      path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (needs PyTorch)
        or a ``.safetensors`` file with the same keys.
      dtype, precision: computation dtype and precision of the module (see
        ``dfm_jax.models.inception.InceptionV3``).

    Returns:
      ``(module, variables)``; ``module.apply(variables, images)`` (or
      ``dfm_jax.models.inception.features_and_logits``) gives the pool3 features
      and logits of images (B, H, W, 3) in [-1, 1].
    """
    module = InceptionV3(dtype=dtype, precision=precision)
    return module, convert_state_dict(load_state_dict(path), module)

"""Import the FVD I3D weights (TF-Hub ``deepmind/i3d-kinetics-400/1``) into Flax.

The FVD reference (google-research ``frechet_video_distance``) loads the TF1 Hub
module :data:`HUB_HANDLE`, now served by Kaggle Models (``deepmind/i3d-kinetics``,
TensorFlow 1 format, variation ``400``, version 1). Download and unpack it once by
hand (e.g. ``<HUB_HANDLE>?tf-hub-format=compressed`` is a .tar.gz); tests and
library code never touch the network. The unpacked directory holds
``saved_model.pb``, ``tfhub_module.pb`` and ``variables/variables.{index,data-*}``.

Only the variables are read, with ``tf.train.load_checkpoint(<dir>/variables/
variables)``; the graph is never loaded or executed. TensorFlow (``tensorflow-cpu``
is enough) is imported lazily, only to read the checkpoint.

Variable names (Sonnet 1 modules of deepmind/kinetics-i3d under the scope
``RGB/inception_i3d/``; any prefix before that scope is ignored, as are variables
outside it):

* ``<unit>/conv_3d/w`` (kt, kh, kw, in, out) -> ``<unit>/conv_3d/kernel`` (same layout);
* ``<unit>/batch_norm/beta`` -> params ``<unit>/batch_norm/bias``; ``moving_mean``,
  ``moving_variance`` -> batch_stats ``mean``, ``var``. Sonnet stores these as
  (1, 1, 1, 1, C); they are flattened to (C,). There is no ``gamma`` (Sonnet's
  BatchNorm has ``scale=False`` by default; a ``gamma`` of ones, which Sonnet's
  ``fused=True`` option would store, is accepted and ignored, any other is an error);
* ``Logits/Conv3d_0c_1x1/conv_3d/w`` and ``b`` -> ``kernel`` and ``bias``;

where ``<unit>`` is e.g. ``Conv3d_1a_7x7`` or ``Mixed_4c/Branch_1/Conv3d_0b_3x3``.
Missing, mis-shaped and unexpected variables inside the scope are all listed in
one ``ValueError``.

Not supported: the PyTorch port ``i3d_torchscript.pt`` (StyleGAN-V / DiGAN
metrics). It is a TorchScript archive: ``torch.load(weights_only=True)`` refuses it
("Cannot use weights_only=True with TorchScript archives") and ``torch.jit.load``
would compile and run the code stored in the file, which this project does not do
for downloaded files. Its tensors could be read with a restricted unpickler, but
its parameter names and padding conventions are not documented and could not be
checked against the file here, so no mapping is offered; use the TF-Hub module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.models.i3d import INPUT_SIZE, NUM_CLASSES, NUM_FRAMES, InceptionI3d
from dfm_jax.weights import files

#: The TF-Hub handle the FVD reference loads.
HUB_HANDLE = "https://tfhub.dev/deepmind/i3d-kinetics-400/1"
#: Where the module is published now.
KAGGLE_MODEL = "Kaggle Models deepmind/i3d-kinetics (TensorFlow 1, variation 400, version 1)"
#: Variable scope of the RGB I3D inside the module.
SCOPE = "RGB/inception_i3d/"

_PARAM_NAMES = {"kernel": "w", "bias": "b"}
_BN_PARAM_NAMES = {"bias": "beta"}
_BN_STAT_NAMES = {"mean": "moving_mean", "var": "moving_variance"}


def _missing_file_error(path: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"I3D weights not found: expected {expected!r} (the TF checkpoint "
        f"`variables/variables.index` of the unpacked TF-Hub module) under {path!r}. "
        f"Download the FVD I3D module {HUB_HANDLE} (published on {KAGGLE_MODEL}; "
        f"`{HUB_HANDLE}?tf-hub-format=compressed` is a .tar.gz), unpack it and pass the "
        "directory."
    )


def checkpoint_prefix(path: str | os.PathLike) -> str:
    """The TF checkpoint prefix of a TF-Hub module directory.

    Args:
      path: the unpacked module directory (``<dir>/variables/variables.index``),
        its ``variables`` folder, or a checkpoint prefix (``<prefix>.index``).

    Raises:
      FileNotFoundError: no checkpoint there; the message says where the module is
        published.
    """
    path = os.fspath(path)
    candidates = [
        os.path.join(path, "variables", "variables"),
        os.path.join(path, "variables"),
        path,
    ]
    for prefix in candidates:
        if os.path.isfile(prefix + ".index"):
            return prefix
    raise _missing_file_error(path, candidates[0] + ".index")


def read_tf_variables(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All variables of a TF checkpoint as ``{name: numpy array}`` (graph not loaded).

    Args:
      path: as :func:`checkpoint_prefix`.

    Raises:
      FileNotFoundError: see :func:`checkpoint_prefix`.
      ImportError: TensorFlow is not installed.
    """
    prefix = checkpoint_prefix(path)
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(
            "Reading the I3D TF checkpoint needs TensorFlow (`pip install tensorflow-cpu`)."
        ) from e
    reader = tf.train.load_checkpoint(prefix)
    names = reader.get_variable_to_shape_map()
    return {name: np.asarray(reader.get_tensor(name)) for name in names}


def tf_variable_name(collection: str, path: tuple[str, ...]) -> str:
    """TF variable name (without :data:`SCOPE`) of a Flax variable of ``InceptionI3d``.

    ``("params", ("Mixed_3b", "Branch_0", "Conv3d_0a_1x1", "conv_3d", "kernel"))`` ->
    ``"Mixed_3b/Branch_0/Conv3d_0a_1x1/conv_3d/w"``; BatchNorm ``bias`` -> ``beta``,
    batch_stats ``mean``/``var`` -> ``moving_mean``/``moving_variance``.
    """
    *scope, module, leaf = path
    if collection == "batch_stats":
        name = _BN_STAT_NAMES[leaf]
    elif module == "batch_norm":
        name = _BN_PARAM_NAMES[leaf]
    else:
        name = _PARAM_NAMES[leaf]
    return "/".join([*scope, module, name])


@functools.cache
def _abstract_variables(width: float, num_classes: int) -> dict[str, Any]:
    """Variable shapes of ``InceptionI3d(width=..., num_classes=...)``."""
    x = jax.ShapeDtypeStruct((1, NUM_FRAMES, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    module = InceptionI3d(num_classes=num_classes, width=width)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def _strip_scope(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Names relative to :data:`SCOPE`; anything before the scope is dropped, and
    variables outside it (global_step, other streams) are ignored."""
    out = {}
    for name, value in variables.items():
        i = name.find(SCOPE)
        if i >= 0:
            out[name[i + len(SCOPE) :]] = value
    return out


def _is_unit_gamma(name: str, value: Any) -> bool:
    """A BatchNorm ``gamma`` of ones: what Sonnet's fused BatchNorm stores without a scale."""
    return name.endswith("/batch_norm/gamma") and bool(np.all(np.asarray(value) == 1))


def convert_tf_variables(
    variables: Mapping[str, Any], module: InceptionI3d | None = None
) -> dict[str, Any]:
    """Map TF I3D variables (``RGB/inception_i3d/...`` names) to Flax variables.

    Args:
      variables: name -> array, e.g. :func:`read_tf_variables`.
      module: the ``InceptionI3d`` whose variable tree is filled (default the
        published one); only its ``width`` and ``num_classes`` are used.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays.

    Raises:
      ValueError: variables are missing, unexpected or mis-shaped (all listed, with
        their full TF names).
    """
    module = InceptionI3d() if module is None else module
    abstract = _abstract_variables(float(module.width), int(module.num_classes))
    tf_vars = _strip_scope(variables)
    used: set[str] = set()
    missing: list[str] = []
    bad_shape: list[str] = []

    def fill(collection: str):
        def leaf(path, spec):
            name = tf_variable_name(collection, tuple(p.key for p in path))
            if name not in tf_vars:
                missing.append(SCOPE + name)
                return None
            used.add(name)
            value = np.asarray(tf_vars[name], dtype=np.float32)
            is_bn = name.split("/")[-2] == "batch_norm"
            if is_bn and value.size == spec.shape[0] and all(d == 1 for d in value.shape[:-1]):
                value = value.reshape(spec.shape)  # Sonnet's (1, 1, 1, 1, C)
            if value.shape != tuple(spec.shape):
                bad_shape.append(f"{SCOPE}{name}: {value.shape} != expected {tuple(spec.shape)}")
                return None
            return np.ascontiguousarray(value)

        return jax.tree_util.tree_map_with_path(leaf, abstract[collection])

    out = {"params": fill("params"), "batch_stats": fill("batch_stats")}
    unexpected = sorted(
        SCOPE + k for k in tf_vars if k not in used and not _is_unit_gamma(k, tf_vars[k])
    )
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"variables do not match the FVD I3D (TF-Hub {HUB_HANDLE}, width "
            f"{module.width}): " + files.describe_mismatch(missing, unexpected, bad_shape)
        )
    return out


def load_i3d(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    precision: Any = "highest",
) -> tuple[InceptionI3d, dict[str, Any]]:
    """Build the published I3D and load the TF-Hub ``i3d-kinetics-400`` variables.

    Args:
      path: the unpacked TF-Hub module directory (or its checkpoint prefix).
      dtype, precision: as ``dfm_jax.models.i3d.InceptionI3d``.

    Returns:
      ``(module, variables)``; ``dfm_jax.models.i3d.fvd_embedding(variables,
      videos)`` gives the (B, 400) FVD embedding of videos in [-1, 1].
    """
    module = InceptionI3d(num_classes=NUM_CLASSES, dtype=dtype, precision=precision)
    return module, convert_tf_variables(read_tf_variables(path), module)

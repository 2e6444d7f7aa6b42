"""InceptionV3 as used for FID, FDD-style feature statistics and the Inception Score.

This is the TensorFlow 2015-12-05 Inception network of the original FID code
(Heusel et al., 2017), in the form ported to PyTorch by pytorch-fid
(``fid_inception_v3``), written channel-last in Flax Linen. It differs from the
torchvision InceptionV3 in exactly the ways the TF graph does:

* ``Mixed_5b/5c/5d`` (block A), ``Mixed_6b..6e`` (block C) and ``Mixed_7b``
  (block E_1) average-pool their pool branch with ``count_include_pad=False``
  (the TF graph's SAME average pool divides by the number of valid pixels);
* ``Mixed_7c`` (block E_2) max-pools (3x3, stride 1, padding 1) its pool branch;
* the classifier ``fc`` has 1008 outputs (the TF graph's ``softmax/logits``).

Input and preprocessing
-----------------------
``InceptionV3.__call__`` takes images ``(B, H, W, 3)``, RGB, float in [-1, 1] (the
project's pixel convention). With ``resize=True`` (default) they are resized to
299 x 299 by bilinear interpolation with half-pixel centres and no antialiasing,
exactly pytorch-fid's ``F.interpolate(x, size=(299, 299), mode="bilinear",
align_corners=False)`` (``jax.image.resize(..., "bilinear", antialias=False)``
agrees with it to float32 rounding for any input size, including non-integer
ratios; the parity test checks it). pytorch-fid then maps [0, 1] inputs to
[-1, 1] (``normalize_input``); our inputs already are in [-1, 1] and resizing is
linear, so no further normalisation is applied. To feed [0, 1] or uint8 images,
map them to [-1, 1] first (``x / 127.5 - 1`` for uint8).

Outputs
-------
A dict of float32 arrays:

* ``"pool3"`` ``(B, 2048)``: global average pool of ``Mixed_7c``, the FID features.
* ``"logits"`` ``(B, 1008)``: ``pool3 @ fc.kernel + fc.bias``, the classifier.
* ``"logits_unbiased"`` ``(B, 1008)``: ``pool3 @ fc.kernel`` without the bias.

**Inception Score.** The original IS code (Salimans et al., openai/improved-gan)
takes ``softmax(pool3 @ W)`` over all 1008 outputs of this graph, without the
bias, and torch-fidelity and torchmetrics reproduce it with their default
``"logits_unbiased"`` feature. Use ``"logits_unbiased"`` (softmax over all 1008
classes) to get IS numbers comparable with published ones; ``"logits"`` is the
graph's real classifier output, for other uses.

Blocks use BatchNorm in inference mode (running statistics, epsilon 1e-3) after
bias-free convolutions, then ReLU, as pytorch-fid's ``BasicConv2d``. Parameter
names mirror the PyTorch state dict (``Conv2d_1a_3x3/conv/kernel``,
``Mixed_5b/branch1x1/bn/scale``, ``fc/kernel``, ...); the importer is
``dfm_jax.weights.inception``. The variables are ``{"params": ...,
"batch_stats": ...}`` as for any Flax BatchNorm model. The network is small
(about 24M parameters) and meant to be replicated; it carries no logical axis
names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
PrecisionLike = Any

#: Input side of the network after resizing.
INPUT_SIZE = 299
#: Smallest input the network accepts without resizing (the stem and the three
#: stride-2 reductions need at least 75 x 75).
MIN_INPUT_SIZE = 75
#: Outputs of the TF graph's classifier (the 1000 ImageNet classes plus unused entries).
NUM_CLASSES = 1008
#: Width of the pool3 features.
FEATURE_DIM = 2048
#: BatchNorm epsilon of the TF graph (pytorch-fid's ``BasicConv2d``).
BATCH_NORM_EPS = 1e-3


def resize_to_input(images: Array) -> Array:
    """Resize (B, H, W, C) images to the network's 299 x 299, as pytorch-fid does.

    Bilinear with half-pixel centres and no antialiasing, i.e. torch
    ``F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)``;
    ``jax.image.resize`` computes the same interpolation weights (equal to float32
    rounding for any input size, up or down, integer ratio or not). Float32 out.
    """
    b, _, _, c = images.shape
    x = jnp.asarray(images, jnp.float32)
    return jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw) or an int for square kernels.
      strides: (sh, sw) or an int.
      padding: symmetric zero padding (ph, pw) or an int, as torch ``Conv2d``.
      dtype: computation dtype.
      precision: precision of the convolution.

    Call: (B, H, W, C) -> (B, H', W', features). Submodules ``conv`` and ``bn``.
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True, epsilon=BATCH_NORM_EPS, dtype=self.dtype, name="bn"
        )(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """3x3 average pool, stride 1, padding 1, padded pixels not counted (FID blocks)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
    """3x3 max pool, stride 2, no padding, floor mode (torch ``MaxPool2d(3, 2)``)."""
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class _Block(nn.Module):
    """Shared attributes of the Inception blocks."""

    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def conv(self, features: int, kernel_size, name: str, **kw) -> BasicConv:
        return BasicConv(
            features, kernel_size, dtype=self.dtype, precision=self.precision, name=name, **kw
        )


class InceptionA(_Block):
    """35 x 35 block (``Mixed_5b/5c/5d``), FID variant: average pool excludes padding.

    Output channels: 64 + 64 + 96 + ``pool_features``.
    """

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(64, 1, "branch1x1")(x)
        b5 = self.conv(48, 1, "branch5x5_1")(x)
        b5 = self.conv(64, 5, "branch5x5_2", padding=2)(b5)
        b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
        b3 = self.conv(96, 3, "branch3x3dbl_2", padding=1)(b3)
        b3 = self.conv(96, 3, "branch3x3dbl_3", padding=1)(b3)
        bp = self.conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction block (``Mixed_6a``). Output channels: 384 + 96 + C_in."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(384, 3, "branch3x3", strides=2)(x)
        bd = self.conv(64, 1, "branch3x3dbl_1")(x)
        bd = self.conv(96, 3, "branch3x3dbl_2", padding=1)(bd)
        bd = self.conv(96, 3, "branch3x3dbl_3", strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """17 x 17 block with factorised 7x7 convolutions (``Mixed_6b..6e``), FID variant.

    ``channels_7x7`` is the width inside the 7x7 branches. Output channels: 4 x 192.
    """

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        b1 = self.conv(192, 1, "branch1x1")(x)
        b7 = self.conv(c7, 1, "branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
        bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
        bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
        bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
        bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
        bp = self.conv(192, 1, "branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction block (``Mixed_7a``). Output channels: 320 + 192 + C_in."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(192, 1, "branch3x3_1")(x)
        b3 = self.conv(320, 3, "branch3x3_2", strides=2)(b3)
        b7 = self.conv(192, 1, "branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
        b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
        b7 = self.conv(192, 3, "branch7x7x3_4", strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """8 x 8 block with split 1x3 / 3x1 branches (``Mixed_7b``, ``Mixed_7c``).

    ``pool`` selects the pool branch: ``"avg"`` (3x3 average excluding padding,
    FID's ``FIDInceptionE_1``, Mixed_7b) or ``"max"`` (3x3 max, stride 1, padding 1,
    FID's ``FIDInceptionE_2``, Mixed_7c). Output channels: 320 + 768 + 768 + 192.
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(320, 1, "branch1x1")(x)
        b3 = self.conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv(448, 1, "branch3x3dbl_1")(x)
        bd = self.conv(384, 3, "branch3x3dbl_2", padding=1)(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            p = _avg_pool_3x3(x)
        elif self.pool == "max":
            p = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv(192, 1, "branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FC(nn.Module):
    """Float32 classifier returning ``(x @ kernel + bias, x @ kernel)``.

    Parameters ``kernel`` (D, features) and ``bias`` (features,).
    """

    features: int
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jnp.dot(x, kernel, precision=self.precision)
        return y + bias, y


class InceptionV3(nn.Module):
    """The FID InceptionV3 (TF 2015-12-05 graph, pytorch-fid layout), channel-last.

    Attributes:
      resize: resize the input to 299 x 299 (bilinear, half-pixel centres, no
        antialiasing) as pytorch-fid does. Without it the input must be at least
        75 x 75 and is used as is.
      num_classes: classifier outputs (1008 for the FID weights).
      dtype: computation dtype of the convolutions and BatchNorms. Resizing,
        pooling and the classifier run in float32; outputs are float32.
      precision: precision of the convolutions and the classifier matmul.
        Defaults to ``"highest"`` (full float32 on GPUs and TPUs), since FID
        is sensitive to feature errors and the network is cheap next to sampling.

    Call: images (B, H, W, 3) in [-1, 1] -> dict with ``"pool3"`` (B, 2048),
    ``"logits"`` (B, num_classes) and ``"logits_unbiased"`` (B, num_classes), all
    float32; see the module docstring.
    """

    resize: bool = True
    num_classes: int = NUM_CLASSES
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = "highest"

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
        x = jnp.asarray(images, jnp.float32)
        if self.resize:
            x = resize_to_input(x)
        elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"InceptionV3 without resizing needs at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
                f"inputs, got {x.shape[1]}x{x.shape[2]}"
            )
        kw = {"dtype": self.dtype, "precision": self.precision}
        x = x.astype(self.dtype)

        # Stem: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35.
        x = BasicConv(32, 3, strides=2, name="Conv2d_1a_3x3", **kw)(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3", **kw)(x)
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, 1, name="Conv2d_3b_1x1", **kw)(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3", **kw)(x)
        x = _max_pool_3x3_s2(x)

        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)

        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits, logits_unbiased = FC(self.num_classes, precision=self.precision, name="fc")(pool3)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": logits_unbiased}


def features_and_logits(
    variables: Any,
    images: Array,
    *,
    dtype: Dtype = jnp.float32,
    precision: PrecisionLike = "highest",
) -> dict[str, Array]:
    """Pure function form of ``InceptionV3(dtype=..., precision=...).apply``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}``, e.g. from
        ``dfm_jax.weights.inception.load_inception``.
      images: (B, H, W, 3) float in [-1, 1], any size (resized to 299 x 299).
      dtype, precision: as ``InceptionV3`` (static under ``jax.jit``).

    Returns:
      ``{"pool3": (B, 2048), "logits": (B, 1008), "logits_unbiased": (B, 1008)}``,
      float32.

    Jit it with the keyword arguments bound, e.g.
    ``jax.jit(functools.partial(features_and_logits, dtype=jnp.bfloat16))``.
    """
    return InceptionV3(dtype=dtype, precision=precision).apply(variables, images)

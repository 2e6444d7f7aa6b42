"""The Inflated 3D ConvNet (I3D, Kinetics-400) whose logits are the FVD embedding.

FVD (Unterthiner et al., 2018; google-research ``frechet_video_distance``) embeds
clips with the TF-Hub module ``deepmind/i3d-kinetics-400/1`` and takes the tensor
``RGB/inception_i3d/Mean``: the 400 Kinetics logits averaged over time. That module
is the RGB stream of deepmind/kinetics-i3d's ``InceptionI3d`` (Inception-v1
inflated to 3-D, Carreira & Zisserman 2017), written in Sonnet 1. This module is
the same network, channel-last ``(B, T, H, W, C)`` in Flax Linen:

    Conv3d_1a_7x7 (7x7x7, stride 2) -> MaxPool3d_2a_3x3 (1x3x3, stride 1x2x2)
    -> Conv3d_2b_1x1 -> Conv3d_2c_3x3 -> MaxPool3d_3a_3x3 (1x3x3, stride 1x2x2)
    -> Mixed_3b, Mixed_3c -> MaxPool3d_4a_3x3 (3x3x3, stride 2)
    -> Mixed_4b..Mixed_4f -> MaxPool3d_5a_2x2 (2x2x2, stride 2)
    -> Mixed_5b, Mixed_5c -> Logits: AvgPool 2x7x7 (stride 1, VALID),
       Conv3d_0c_1x1 (with bias, no BatchNorm, no ReLU), squeeze H, W, mean over T.

Every convolution and max pool pads TensorFlow "SAME": output size
``ceil(n / s)``, total padding ``max((ceil(n / s) - 1) * s + k - n, 0)`` split with
the extra element at the end (:func:`tf_same_padding`); max pools pad with -inf
(padding never wins), convolutions with zeros. This is *not* PyTorch's symmetric
padding: e.g. the 7x7x7 stride-2 stem on 224 pads (2, 3). Each ``Unit3D`` is a
bias-free conv, then Sonnet 1's ``snt.BatchNorm()`` in inference mode -- moving
mean and variance, epsilon 1e-3, an offset ``beta`` and **no scale** (Sonnet's
default ``scale=False``) -- then ReLU. A Mixed block concatenates four branches:
1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool (stride 1) -> 1x1.

Parameter names follow the TF variable scopes, ``/``-nested:
``Conv3d_1a_7x7/conv_3d/kernel`` (TF ``.../conv_3d/w``, the same DHWIO layout),
``Mixed_3b/Branch_1/Conv3d_0b_3x3/batch_norm/bias`` (TF ``batch_norm/beta``),
batch_stats ``.../batch_norm/mean`` and ``var`` (TF ``moving_mean``,
``moving_variance``), ``Logits/Conv3d_0c_1x1/conv_3d/kernel`` and ``bias`` (TF
``w``, ``b``). As in the TF code, Mixed_5b's second Branch_2 conv is named
``Conv3d_0a_3x3`` (not ``0b``). The importer is ``dfm_jax.weights.i3d``.

Input and preprocessing
-----------------------
:func:`preprocess` reproduces the reference's ``preprocess``: every frame is resized
to 224 x 224 with ``tf.image.resize_bilinear`` (TF1; ``align_corners=False``,
``half_pixel_centers=False`` -- the *legacy* mapping ``src = dst * in / out``, not
half-pixel centres; :func:`resize_bilinear_tf1`), then the reference maps 0..255
to [-1, 1]. Our videos already are in [-1, 1] and bilinear resizing commutes with
that affine map (the weights sum to one), so they are resized as they are.
One-channel videos are repeated to RGB. The reference asserts (and does not clip)
values in [-1.001, 1.001]; neither does this code clip. The reference feeds
16-frame clips in batches of 16; the network itself takes any batch, and any
``T >= 9`` frames (more frames give several time positions, averaged).

Dtype policy: parameters and batch statistics are float32; ``dtype`` sets the
computation dtype of the convolutions and BatchNorms (float32 by default,
``jnp.bfloat16`` is accepted for speed); ``precision`` defaults to ``"highest"``
(true float32 on GPUs/TPUs). Resizing, the final pooling, the logits conv and the
time mean run in float32; the embedding is float32.

``width`` multiplies every channel count except the 400 logits (``round``, at least
1); the published network is ``width=1.0``, smaller values only make narrow test
networks that still run every block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
PrecisionLike = Any

#: Frame side the network is trained on and FVD resizes to.
INPUT_SIZE = 224
#: Frames per clip in the FVD reference.
NUM_FRAMES = 16
#: Kinetics-400 classes: the width of the FVD embedding.
NUM_CLASSES = 400
#: Sonnet 1 ``snt.BatchNorm`` default epsilon.
BATCH_NORM_EPS = 1e-3

#: Mixed blocks in order: (name, (branch_0, branch_1a, branch_1b, branch_2a,
#: branch_2b, branch_3)) output channels of deepmind/kinetics-i3d ``InceptionI3d``.
MIXED_BLOCKS: tuple[tuple[str, tuple[int, int, int, int, int, int]], ...] = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: ``(before, after)``, extra at the end.

    Output size ``ceil(size / stride)``; total ``max((out - 1) * stride + kernel -
    size, 0)``; ``before = total // 2``. E.g. (224, 7, 2) -> (2, 3), (7, 2, 2) ->
    (0, 1), (8, 2, 2) -> (0, 0).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pads(shape: tuple[int, ...], kernel, strides) -> list[tuple[int, int]]:
    """SAME pads of the (T, H, W) axes of a (B, T, H, W, C) shape."""
    return [tf_same_padding(n, k, s) for n, k, s in zip(shape[1:4], kernel, strides, strict=True)]


def max_pool_same(x: Array, kernel: tuple[int, int, int], strides: tuple[int, int, int]) -> Array:
    """``tf.nn.max_pool3d(padding="SAME")`` on (B, T, H, W, C): padding is -inf."""
    pads = [(0, 0), *_same_pads(x.shape, kernel, strides), (0, 0)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *strides, 1), pads)


def resize_bilinear_tf1(images: Array, size: tuple[int, int]) -> Array:
    """``tf.compat.v1.image.resize_bilinear(images, size)`` with its defaults, in jnp.

    ``align_corners=False, half_pixel_centers=False`` (TF's legacy mapping): for
    output index ``i`` the source coordinate is ``i * (in / out)`` (float32 scale),
    ``lo = floor``, ``hi = min(lo + 1, in - 1)``, weight ``src - lo``; interpolated
    along x first, then y, as ``top + (bottom - top) * dy`` like TF's kernel.

    Args:
      images: (N, H, W, C) float.
      size: (out_h, out_w).

    Returns:
      (N, out_h, out_w, C) float32.
    """
    x = jnp.asarray(images, jnp.float32)

    def axis_taps(n_in: int, n_out: int):
        scale = jnp.float32(n_in) / jnp.float32(n_out)
        src = jnp.arange(n_out, dtype=jnp.float32) * scale
        lo = jnp.floor(src)
        frac = src - lo
        lo = lo.astype(jnp.int32)
        return lo, jnp.minimum(lo + 1, n_in - 1), frac

    y0, y1, dy = axis_taps(x.shape[1], size[0])
    x0, x1, dx = axis_taps(x.shape[2], size[1])
    dx = dx[None, None, :, None]
    rows0, rows1 = x[:, y0], x[:, y1]
    top = rows0[:, :, x0] + (rows0[:, :, x1] - rows0[:, :, x0]) * dx
    bottom = rows1[:, :, x0] + (rows1[:, :, x1] - rows1[:, :, x0]) * dx
    return top + (bottom - top) * dy[None, :, None, None]


def preprocess(videos: Array, size: int = INPUT_SIZE) -> Array:
    """FVD's preprocessing: per-frame TF1 bilinear resize to ``size`` x ``size``, RGB.

    Args:
      videos: (B, T, H, W, C) float in [-1, 1] (the project's pixel convention), C
        1 (repeated to RGB) or 3.
      size: output frame side (224 for the published network).

    Returns:
      (B, T, size, size, 3) float32 in [-1, 1], the network's input. See the
      module docstring for why no further scaling is applied.
    """
    if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
        raise ValueError(f"expected videos (B, T, H, W, 1 or 3), got shape {videos.shape}")
    b, t, h, w, c = videos.shape
    frames = jnp.reshape(jnp.asarray(videos, jnp.float32), (b * t, h, w, c))
    if (h, w) != (size, size):
        frames = resize_bilinear_tf1(frames, (size, size))
    if c == 1:
        frames = jnp.repeat(frames, 3, axis=-1)
    return jnp.reshape(frames, (b, t, size, size, 3))


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class Unit3D(nn.Module):
    """Conv3D with TF "SAME" padding -> optional BatchNorm (beta only) -> optional ReLU.

    Attributes:
      features: output channels.
      kernel_size: (kt, kh, kw) or an int.
      strides: (st, sh, sw) or an int.
      use_batch_norm: inference BatchNorm, moving statistics, eps 1e-3, no scale.
      use_bias: conv bias (only the logits conv has one).
      activation: apply ReLU.
      dtype, precision: computation dtype and precision of the conv and BatchNorm.

    Call: (B, T, H, W, C) -> (B, ceil(T/st), ceil(H/sh), ceil(W/sw), features).
    Submodules ``conv_3d`` (``kernel`` DHWIO [, ``bias``]) and ``batch_norm``
    (params ``bias``; batch_stats ``mean``, ``var``).
    """

    features: int
    kernel_size: int | tuple[int, int, int] = 1
    strides: int | tuple[int, int, int] = 1
    use_batch_norm: bool = True
    use_bias: bool = False
    activation: bool = True
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, strides = _triple(self.kernel_size), _triple(self.strides)
        x = nn.Conv(
            self.features,
            kernel,
            strides=strides,
            padding=_same_pads(x.shape, kernel, strides),
            use_bias=self.use_bias,
            dtype=self.dtype,
            precision=self.precision,
            name="conv_3d",
        )(x)
        if self.use_batch_norm:
            x = nn.BatchNorm(
                use_running_average=True,
                use_scale=False,
                use_bias=True,
                epsilon=BATCH_NORM_EPS,
                dtype=self.dtype,
                name="batch_norm",
            )(x)
        return nn.relu(x) if self.activation else x


class _Branch(nn.Module):
    """A Mixed-block branch: optional 3x3x3 stride-1 SAME max pool, then Unit3Ds.

    ``layers``: ((name, features, kernel), ...) applied in order.
    """

    layers: tuple[tuple[str, int, int], ...]
    pool_first: bool = False
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.pool_first:
            x = max_pool_same(x, (3, 3, 3), (1, 1, 1))
        for name, features, kernel in self.layers:
            x = Unit3D(features, kernel, dtype=self.dtype, precision=self.precision, name=name)(x)
        return x


class Mixed(nn.Module):
    """Inception block of four branches, concatenated on channels.

    ``channels``: (b0, b1a, b1b, b2a, b2b, b3); output channels b0 + b1b + b2b + b3.
    ``branch2_name``: name of Branch_2's 3x3x3 conv (``Conv3d_0a_3x3`` in Mixed_5b
    of the TF code, ``Conv3d_0b_3x3`` elsewhere).
    """

    channels: tuple[int, int, int, int, int, int]
    branch2_name: str = "Conv3d_0b_3x3"
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c0, c1a, c1b, c2a, c2b, c3 = self.channels
        kw = {"dtype": self.dtype, "precision": self.precision}
        outs = [
            _Branch((("Conv3d_0a_1x1", c0, 1),), name="Branch_0", **kw)(x),
            _Branch((("Conv3d_0a_1x1", c1a, 1), ("Conv3d_0b_3x3", c1b, 3)), name="Branch_1", **kw)(
                x
            ),
            _Branch(
                (("Conv3d_0a_1x1", c2a, 1), (self.branch2_name, c2b, 3)), name="Branch_2", **kw
            )(x),
            _Branch((("Conv3d_0b_1x1", c3, 1),), pool_first=True, name="Branch_3", **kw)(x),
        ]
        return jnp.concatenate(outs, axis=-1)


class _Logits(nn.Module):
    """AvgPool (2, 7, 7) stride 1 VALID -> 1x1x1 conv with bias -> (B, T', H', W', classes)."""

    num_classes: int
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.avg_pool(x.astype(jnp.float32), (2, 7, 7), (1, 1, 1), "VALID")
        return Unit3D(
            self.num_classes,
            1,
            use_batch_norm=False,
            use_bias=True,
            activation=False,
            precision=self.precision,
            name="Conv3d_0c_1x1",
        )(x)


class InceptionI3d(nn.Module):
    """I3D (RGB stream of deepmind/kinetics-i3d ``InceptionI3d``), channel-last.

    Attributes:
      num_classes: logits (400 for Kinetics-400).
      width: channel multiplier of every Unit3D but the logits (1.0 = published).
      dtype: computation dtype of the convs and BatchNorms (float32 default).
      precision: conv precision, ``"highest"`` by default.

    Call: clips (B, T, H, W, 3), already preprocessed (:func:`preprocess`: 224 x
    224, [-1, 1]), T >= 9 and H, W in 193..224 (so Mixed_5c is 7 x 7) -> logits
    averaged over time, (B, num_classes) float32 (TF ``RGB/inception_i3d/Mean``).
    """

    num_classes: int = NUM_CLASSES
    width: float = 1.0
    dtype: Dtype = jnp.float32
    precision: PrecisionLike = "highest"

    def _ch(self, c: int) -> int:
        return max(1, round(c * self.width))

    @nn.compact
    def __call__(self, clips: Array) -> Array:
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected clips (B, T, H, W, 3), got shape {clips.shape}")
        kw = {"dtype": self.dtype, "precision": self.precision}
        x = jnp.asarray(clips, jnp.float32).astype(self.dtype)
        x = Unit3D(self._ch(64), 7, 2, name="Conv3d_1a_7x7", **kw)(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(self._ch(64), 1, name="Conv3d_2b_1x1", **kw)(x)
        x = Unit3D(self._ch(192), 3, name="Conv3d_2c_3x3", **kw)(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for name, channels in MIXED_BLOCKS:
            if name == "Mixed_4b":
                x = max_pool_same(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
            elif name == "Mixed_5b":
                x = max_pool_same(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
            branch2 = "Conv3d_0a_3x3" if name == "Mixed_5b" else "Conv3d_0b_3x3"
            x = Mixed(tuple(self._ch(c) for c in channels), branch2, name=name, **kw)(x)
        if x.shape[1] < 2 or x.shape[2:4] != (7, 7):
            raise ValueError(
                f"I3D needs Mixed_5c outputs of at least 2 x 7 x 7 (clips of >= 9 frames of "
                f"193..224 pixels, e.g. {NUM_FRAMES} x {INPUT_SIZE} x {INPUT_SIZE}); clips "
                f"{clips.shape[1:4]} give {x.shape[1:4]}"
            )
        logits = _Logits(self.num_classes, precision=self.precision, name="Logits")(x)
        return jnp.mean(logits[:, :, 0, 0, :].astype(jnp.float32), axis=1)


def fvd_embedding(
    variables: Any,
    videos: Array,
    *,
    width: float = 1.0,
    dtype: Dtype = jnp.float32,
    precision: PrecisionLike = "highest",
) -> Array:
    """The FVD embedding of videos: preprocess, then I3D's time-averaged logits.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of ``InceptionI3d``, e.g.
        from ``dfm_jax.weights.i3d.load_i3d``.
      videos: (B, T, H, W, C) float in [-1, 1], C 1 or 3, T >= 9 (16 in FVD).
      width, dtype, precision: as ``InceptionI3d`` (static under ``jax.jit``).

    Returns:
      (B, 400) float32, the reference's ``RGB/inception_i3d/Mean``.
    """
    model = InceptionI3d(width=width, dtype=dtype, precision=precision)
    return model.apply(variables, preprocess(videos))

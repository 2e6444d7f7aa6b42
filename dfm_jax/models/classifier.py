"""A small convolutional classifier whose penultimate features define FD-FMNIST.

Inception and DINOv2 weights cannot be downloaded on a machine without internet,
so the Fashion-MNIST demo measures the Frechet distance on the features of this
network instead, trained by the project itself (``dfm_jax.evaluation.fd_fmnist``).

Input: ``(B, H, W, C)`` images in [-1, 1] (the demo uses 32x32x1). Output:
``(logits (B, num_classes), features (B, feature_dim))``; ``features`` is the
ReLU hidden layer before the classification layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallConvNet(nn.Module):
    """Three conv stages (3x3 conv, ReLU, 2x2 average pool) and a hidden dense layer.

    Attributes:
      channels: output channels of the three conv stages.
      feature_dim: width of the penultimate (feature) layer.
      num_classes: number of classes.
    """

    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = images.astype(jnp.float32)
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(self.feature_dim)(x))
        return nn.Dense(self.num_classes)(features), features


class VideoConvNet(nn.Module):
    """A small (2+1)-D classifier whose penultimate features define FVD-FMNIST.

    Every stage runs a 3x3 conv on each frame; from the second stage on it is
    followed by a 3-tap conv along time at every pixel, so later stages see the
    garment's displacement between frames. Each stage ends with ReLU and a 2x2
    spatial average pool, also pooling time by 2 from the second stage on while at
    least two frames remain. The flattened map and its mean over space and time
    (position-invariant, for the garment's appearance) go through one hidden dense
    layer (the features) into two heads: the garment class and the direction of motion.
    (Separate 2-D and 1-D convs rather than 3-D ones: several times faster on CPU.)

    Input: ``(B, T, H, W, C)`` clips in [-1, 1] (the video demo uses 8x32x32x1).
    Output: ``(class logits (B, num_classes), direction logits (B, num_directions),
    features (B, feature_dim))``.

    Attributes:
      channels: output channels of the stages (the first is per frame only).
      feature_dim: width of the penultimate (feature) layer.
      num_classes: number of garment classes.
      num_directions: number of motion-direction bins.
    """

    channels: tuple[int, ...] = (8, 16, 32)
    feature_dim: int = 128
    num_classes: int = 10
    num_directions: int = 8

    @nn.compact
    def __call__(self, clips: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = clips.astype(jnp.float32)
        for stage, width in enumerate(self.channels):
            batch, frames, height, width_px, channels = x.shape
            frames_2d = x.reshape(batch * frames, height, width_px, channels)
            x = nn.Conv(width, (3, 3), padding="SAME")(frames_2d)
            x = x.reshape(batch, frames, height, width_px, width)
            if stage > 0:
                x = nn.relu(x).reshape(batch, frames, height * width_px, width)
                x = nn.Conv(width, (3, 1), padding="SAME")(x)
                x = x.reshape(batch, frames, height, width_px, width)
            time_pool = 2 if stage > 0 and frames >= 2 else 1
            x = nn.avg_pool(nn.relu(x), (time_pool, 2, 2), strides=(time_pool, 2, 2))
        # Where (flattened map: displacements) and what (its global mean: appearance).
        x = jnp.concatenate([x.reshape(x.shape[0], -1), x.mean(axis=(1, 2, 3))], axis=-1)
        features = nn.relu(nn.Dense(self.feature_dim)(x))
        classes = nn.Dense(self.num_classes, name="class_head")(features)
        directions = nn.Dense(self.num_directions, name="direction_head")(features)
        return classes, directions, features

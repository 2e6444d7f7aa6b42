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

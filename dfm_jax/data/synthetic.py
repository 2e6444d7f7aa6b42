"""A deterministic synthetic dataset of class-dependent smooth patterns.

For tests, benchmarks and smoke runs without data. Example `i` depends only on
(seed, i): a plane wave whose orientation and frequency are set by the class, with a
per-example random phase, per-channel colour and a soft blob. Videos (frames > 0) move the
wave over time. Values lie in [-1, 1]; the class is recoverable from the pattern, so a
class-conditional model has something to learn.
"""

from __future__ import annotations

import numpy as np

from dfm_jax.data import common


class SyntheticSource(common.Source):
    """Deterministic structured images (or videos) with labels.

    Args:
      num_examples: dataset size.
      resolution: height and width.
      channels: channels (any count >= 1; latent-like shapes such as 16 work too).
      num_classes: classes; example i has label i % num_classes (balanced).
      frames: 0 for images (H, W, C); T > 0 for videos (T, H, W, C).
      seed: selects a different (but again deterministic) dataset.
    """

    def __init__(
        self,
        num_examples: int = 1024,
        resolution: int = 32,
        channels: int = 3,
        num_classes: int = 10,
        frames: int = 0,
        seed: int = 0,
    ):
        for name, value, low in [
            ("num_examples", num_examples, 1),
            ("resolution", resolution, 1),
            ("channels", channels, 1),
            ("num_classes", num_classes, 1),
            ("frames", frames, 0),
            ("seed", seed, 0),
        ]:
            if int(value) != value or value < low:
                raise ValueError(f"synthetic data: {name} must be an integer >= {low}, got {value}")
        self.num_examples = int(num_examples)
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.frames = int(frames)
        self.seed = int(seed)
        spatial = (self.resolution, self.resolution, self.channels)
        self.example_shape = (self.frames, *spatial) if self.frames else spatial

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        angle = np.pi * label / self.num_classes
        freq = 1.0 + label % 4
        phase = rng.uniform(0.0, 2.0 * np.pi)
        colour = rng.uniform(0.5, 1.0, self.channels) * rng.choice([-1.0, 1.0], self.channels)
        centre = rng.uniform(0.25, 0.75, 2)
        width = rng.uniform(0.1, 0.25)

        coords = (np.arange(self.resolution, dtype=np.float64) + 0.5) / self.resolution
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        projection = np.cos(angle) * xx + np.sin(angle) * yy
        blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * width**2))
        steps = np.arange(max(self.frames, 1), dtype=np.float64)[:, None, None]
        wave = np.sin(2.0 * np.pi * freq * projection + phase + 0.5 * steps)
        image = 0.7 * wave[..., None] * colour + 0.3 * (2.0 * blob[..., None] - 1.0)
        image = np.clip(image, -1.0, 1.0)
        if not self.frames:
            image = image[0]
        return common.make_example(image, label)

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(num_examples={self.num_examples}, resolution={self.resolution}, "
            f"channels={self.channels}, num_classes={self.num_classes}, frames={self.frames}, "
            f"seed={self.seed})"
        )

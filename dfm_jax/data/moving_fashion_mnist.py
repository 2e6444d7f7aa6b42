"""Moving Fashion-MNIST: class-labelled clips of one garment bouncing in a square box.

Built from Fashion-MNIST as Moving MNIST is built from MNIST (Srivastava et al. 2015),
so the video demo trains on real data that needs no download beyond the Debian package.
Clip ``i`` of a split is garment ``i`` of that Fashion-MNIST split (label included),
scaled to ``garment = min(28, resolution // 2)`` pixels, moving with a constant velocity
and reflecting off the borders, on the background value -1. Everything is a function of
``(seed, i)``, so a clip is the same in every process, epoch and run:

* start ``p0 ~ U[0, L]^2`` with ``L = resolution - garment`` (top-left corner, pixels);
* direction ``theta ~ U[0, 2 pi)``, speed ``~ U[speed_range]`` in units of ``L`` per clip,
  so the garment crosses a good part of the box whatever the resolution;
* reflection in closed form: ``q = (p0 + v f) mod 2L``, position ``q if q <= L else 2L - q``
  at frame ``f``, rounded to whole pixels.

Examples are ``{"image": float32 (frames, resolution, resolution, 1) in [-1, 1],
"label": int32}``; ``motion(i)`` gives the clip's velocity (pixels per frame) for
metrics that must see motion.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from dfm_jax.data import common
from dfm_jax.data.fashion_mnist import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, FashionMnistSource


class MovingFashionMnistSource(common.Source):
    """Moving Fashion-MNIST clips (see the module docstring).

    Args:
      directory: the Fashion-MNIST IDX directory (None: the Debian package's).
      split: "train" (60000 clips) or "test" (10000).
      frames: frames T per clip (>= 2).
      resolution: the square frame side (>= 8); the garment is ``min(28, resolution // 2)``.
      seed: the trajectories' seed.
      speed_range: ``(low, high)`` speed in box widths ``L`` per clip.
      download: let Fashion-MNIST fall back to a TFDS download.
    """

    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        split: str = "train",
        frames: int = 8,
        resolution: int = 32,
        seed: int = 0,
        speed_range: tuple[float, float] = (0.5, 1.0),
        download: bool = False,
    ):
        if frames < 2:
            raise ValueError(f"moving_fashion_mnist needs data.frames >= 2, got {frames}")
        if resolution < 8:
            raise ValueError(f"moving_fashion_mnist needs data.resolution >= 8, got {resolution}")
        low, high = speed_range
        if not 0 < low <= high:
            raise ValueError(f"speed_range must satisfy 0 < low <= high, got {speed_range}")
        self.garments = FashionMnistSource(directory, split=split, download=download)
        self.split, self.frames, self.resolution = split, int(frames), int(resolution)
        self.seed, self.speed_range = int(seed), (float(low), float(high))
        self.garment = min(IMAGE_SIZE, self.resolution // 2)
        self.example_shape = (self.frames, self.resolution, self.resolution, 1)

    def __len__(self) -> int:
        return len(self.garments)

    def _trajectory(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Start corner ``(2,)`` and velocity ``(2,)`` (rows, columns; pixels per frame)."""
        rng = np.random.default_rng([self.seed, int(index), 0x3D0F])
        room = self.resolution - self.garment
        start = rng.uniform(0.0, room, size=2)
        angle = rng.uniform(0.0, 2 * np.pi)
        speed = rng.uniform(*self.speed_range) * room / (self.frames - 1)
        return start, speed * np.asarray([np.sin(angle), np.cos(angle)])

    def motion(self, index: int) -> np.ndarray:
        """The clip's velocity ``(d_row, d_column)`` in pixels per frame (before bounces)."""
        return self._trajectory(index)[1]

    def positions(self, index: int) -> np.ndarray:
        """``(frames, 2)`` int top-left corners of the garment, reflected at the borders."""
        start, velocity = self._trajectory(index)
        room = self.resolution - self.garment
        travelled = start[None] + velocity[None] * np.arange(self.frames)[:, None]
        if room == 0:
            return np.zeros((self.frames, 2), np.int64)
        folded = np.mod(travelled, 2 * room)
        return np.rint(np.where(folded <= room, folded, 2 * room - folded)).astype(np.int64)

    def _garment(self, index: int) -> tuple[np.ndarray, int]:
        example = self.garments[index]
        pixels = np.asarray(example[common.IMAGE_KEY])[..., 0]  # (28, 28) in [-1, 1]
        if self.garment != IMAGE_SIZE:
            image = Image.fromarray(((pixels + 1.0) * 127.5).astype(np.float32), mode="F")
            image = image.resize((self.garment, self.garment), Image.Resampling.BOX)
            pixels = np.asarray(image, np.float32) / 127.5 - 1.0
        return pixels, int(example[common.LABEL_KEY])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        garment, label = self._garment(int(index))
        clip = np.full(self.example_shape, common.PAD_VALUE, np.float32)
        size = self.garment
        for frame, (row, column) in enumerate(self.positions(int(index))):
            window = clip[frame, row : row + size, column : column + size, 0]
            np.maximum(window, garment, out=window)
        return common.make_example(clip, label)

    def __repr__(self) -> str:
        return (
            f"MovingFashionMnistSource(origin={self.garments.origin!r}, split={self.split!r}, "
            f"frames={self.frames}, resolution={self.resolution}, seed={self.seed}, "
            f"speed_range={self.speed_range})"
        )

"""Sample grids and progressive preview strips as uint8 images and PNG files.

Images come in channel-last float arrays with values in [-1, 1] (pixels); one
or three channels. Everything here is numpy on the host.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Maps [-1, 1] floats to [0, 255] uint8 (values outside are clipped)."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """Tiles ``(N, H, W, C)`` images row-major into one ``(H', W', C)`` uint8 image.

    Empty cells (when N is not a multiple of ``columns``) and the padding are black.
    """
    images = to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {images.shape}")
    count, height, width, channels = images.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        np.uint8,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def upsample_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of ``(N, h, w, C)`` to ``(N, height, width, C)``."""
    h, w = images.shape[1:3]
    if height % h or width % w:
        raise ValueError(f"cannot upsample {h}x{w} to {height}x{width} by an integer factor")
    return np.repeat(np.repeat(images, height // h, axis=1), width // w, axis=2)


def preview_strip(stages: Sequence[np.ndarray], padding: int = 2) -> np.ndarray:
    """One row per example: each stage's preview (upsampled), ending with the final sample.

    Args:
      stages: arrays ``(N, h_k, w_k, C)``, coarsest first; the last is the final
        sample at full resolution.

    Returns:
      ``(N * (H + padding) + padding, len(stages) * (W + padding) + padding, C)`` uint8.
    """
    height, width = stages[-1].shape[1:3]
    columns = [upsample_nearest(np.asarray(s), height, width) for s in stages]
    interleaved = np.stack(columns, axis=1).reshape(-1, height, width, stages[-1].shape[-1])
    return image_grid(interleaved, columns=len(stages), padding=padding)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, 1)`` or ``(H, W, 3)`` uint8 image."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a PNG atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(png_bytes(image))
    os.replace(temporary, path)

"""Sample grids and progressive preview strips as uint8 images and PNG files.

Images come in channel-last float arrays with values in [-1, 1] (pixels); one
or three channels. Grids and strips are numpy and Pillow on the host: cells
smaller than ``MIN_CELL_SIZE`` pixels are upscaled (nearest neighbour, by an
integer factor) so that a 32x32 sample is visible, and a grid may carry a label
column (the class name of each row) in Pillow's built-in font.

``to_uint8`` / ``from_uint8`` are the one [-1, 1] <-> uint8 conversion of the
package; they work on numpy arrays on the host and on JAX arrays (also traced,
inside ``jit``) on the devices.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dfm_jax.utils import files

#: Cells whose shorter side is below this many pixels are upscaled to at least this size.
MIN_CELL_SIZE = 64
#: Label texts longer than this are cut (with "...").
MAX_LABEL_CHARS = 24


def _numpy_or_jax(images):
    return jnp if isinstance(images, jax.Array) else np


def to_uint8(images):
    """Maps [-1, 1] floats to [0, 255] uint8: ``round((x + 1) * 127.5)``, clipped.

    Rounds half to even in float32. A JAX array (or tracer) gives a JAX array,
    anything else a numpy array.
    """
    xp = _numpy_or_jax(images)
    images = xp.asarray(images, xp.float32)
    return xp.clip(xp.round((images + 1.0) * 127.5), 0, 255).astype(xp.uint8)


def from_uint8(images):
    """Maps uint8 [0, 255] to float32 [-1, 1] (``x / 127.5 - 1``), the inverse of `to_uint8`.

    A JAX array (or tracer) gives a JAX array, anything else a numpy array.
    """
    xp = _numpy_or_jax(images)
    return xp.asarray(images, xp.float32) / 127.5 - 1.0


def upscale_factor(height: int, width: int, min_size: int = MIN_CELL_SIZE) -> int:
    """The smallest integer factor bringing the shorter side to at least ``min_size``."""
    return max(1, -(-min_size // max(1, min(height, width))))


def upscale(images: np.ndarray, min_size: int = MIN_CELL_SIZE) -> np.ndarray:
    """``(N, H, W, C)`` images upscaled by `upscale_factor` (nearest neighbour)."""
    factor = upscale_factor(*images.shape[1:3], min_size)
    if factor == 1:
        return images
    return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)


def class_labels(labels, class_names: Sequence[str] | None = None) -> list[str]:
    """Label texts: each label id's class name where ``class_names`` has it, else the id."""
    ids = np.asarray(labels).reshape(-1).tolist()
    known = class_names if class_names is not None else ()
    return [str(known[i]) if 0 <= i < len(known) else str(i) for i in ids]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Aileron Regular (needs FreeType)
    except (ImportError, OSError):
        return ImageFont.load_default()  # Pillow's bitmap font


def label_column(
    labels: Sequence[str], cell_height: int, padding: int, height: int, channels: int
) -> np.ndarray:
    """A ``(height, width, channels)`` uint8 column of left-aligned white labels on black.

    Label ``r`` is centred vertically on row ``r`` of a grid whose rows are ``cell_height``
    pixels high with ``padding`` pixels around; the width fits the longest label.
    """
    font = _font(max(11, min(24, cell_height // 5)))
    texts = [
        text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."
        for text in (str(label) for label in labels)
    ]
    margin = max(4, padding)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for text in texts]
    width = max((box[2] for box in boxes), default=0) + 2 * margin
    column = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(column)
    for row, (text, box) in enumerate(zip(texts, boxes, strict=True)):
        centre = padding + row * (cell_height + padding) + cell_height / 2
        draw.text((margin, round(centre - (box[1] + box[3]) / 2)), text, fill=255, font=font)
    return np.repeat(np.asarray(column, np.uint8)[..., None], channels, axis=-1)


def image_grid(
    images: np.ndarray,
    columns: int,
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
    min_size: int = MIN_CELL_SIZE,
) -> np.ndarray:
    """Tiles ``(N, H, W, C)`` images row-major into one ``(H', W', C)`` uint8 image.

    Images smaller than ``min_size`` are upscaled first (`upscale`). Empty cells (when N
    is not a multiple of ``columns``) and the padding are black. ``row_labels`` (one
    text per row, e.g. `class_labels`) adds a `label_column` on the left.
    """
    images = to_uint8(np.asarray(images))
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, C), got shape {images.shape}")
    images = upscale(images, min_size)
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
    if row_labels is not None:
        if len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
        labels = label_column(row_labels, height, padding, grid.shape[0], channels)
        grid = np.concatenate([labels, grid], axis=1)
    return grid


def upsample_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of ``(N, h, w, C)`` to ``(N, height, width, C)``."""
    h, w = images.shape[1:3]
    if height % h or width % w:
        raise ValueError(f"cannot upsample {h}x{w} to {height}x{width} by an integer factor")
    return np.repeat(np.repeat(images, height // h, axis=1), width // w, axis=2)


def preview_strip(
    stages: Sequence[np.ndarray],
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
    min_size: int = MIN_CELL_SIZE,
) -> np.ndarray:
    """One row per example: each stage's preview (upsampled), ending with the final sample.

    Args:
      stages: arrays ``(N, h_k, w_k, C)``, coarsest first; the last is the final
        sample at full resolution.
      row_labels: optional text of each example's row (see `image_grid`).

    Returns:
      ``(N * (S + padding) + padding, len(stages) * (S + padding) + padding, C)`` uint8
      (plus the label column), with ``S = H * upscale_factor(H, W, min_size)``.
    """
    height, width = stages[-1].shape[1:3]
    columns = [upsample_nearest(np.asarray(s), height, width) for s in stages]
    interleaved = np.stack(columns, axis=1).reshape(-1, height, width, stages[-1].shape[-1])
    return image_grid(
        interleaved, len(stages), padding=padding, row_labels=row_labels, min_size=min_size
    )


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``(H, W, 1)`` or ``(H, W, 3)`` uint8 image."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes(frames: np.ndarray, fps: float = 6.0) -> bytes:
    """An endlessly looping animated GIF of ``(T, H, W, 1)`` or ``(T, H, W, 3)`` uint8 frames."""
    frames = np.asarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames (T, H, W, 1 or 3), got shape {frames.shape}")
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        optimize=False,
    )
    return buffer.getvalue()


def save_gif(path: str, frames: np.ndarray, fps: float = 6.0) -> None:
    """Writes an animated GIF atomically (see `gif_bytes`)."""
    files.atomic_write_bytes(path, gif_bytes(frames, fps))


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a PNG atomically (``files.atomic_write_bytes``: temporary file, then rename)."""
    files.atomic_write_bytes(path, png_bytes(image))

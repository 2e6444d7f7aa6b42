"""Shared pieces of the data package: the source base class, errors and image helpers.

Every source in `dfm_jax.data` is a Grain random-access data source (it has `__len__`,
`__getitem__` and a stable `__repr__`, and pickles, so Grain workers can use it) whose
examples -- after the source's own `operations`, see `Source.operations` -- are dicts of
numpy arrays::

    {"image": float32 (H, W, C) or (T, H, W, C), "label": int32 scalar}

The key is "image" for every source: pixel sources hold pixels scaled to [-1, 1], the latent
source (`ArrayRecordLatentSource`) holds autoencoder latents in model space. The model sees
either through the same key, which keeps the trainer source-agnostic.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from dfm_jax.utils import viz

#: Key of the image (pixels in [-1, 1], or latents) in every example.
IMAGE_KEY = "image"
#: Key of the int32 class label in every example.
LABEL_KEY = "label"
#: Pixel value that padding uses: black in [-1, 1] scaling (the Fashion-MNIST background).
PAD_VALUE = -1.0


class DataNotFoundError(ValueError):
    """The data a source needs is not where the configuration says, or not anywhere.

    A `ValueError` so that config validation can catch every bad-config error alike; the
    message always names the paths tried and how to get the data.
    """


class Source(abc.ABC):
    """A Grain random-access data source of `{"image", "label"}` examples.

    Subclasses set `num_classes` and `example_shape` (and `class_names` where known) and
    implement `__len__`, `__getitem__` and `__repr__` (Grain records the repr in the
    iterator state, so it must not contain memory addresses).
    """

    #: Number of classes; labels lie in [0, num_classes).
    num_classes: int
    #: Shape of one example's "image": (H, W, C) or (T, H, W, C).
    example_shape: tuple[int, ...]
    #: The name of each class (label i is class_names[i]); None when unknown (sample grids
    #: then show the ids).
    class_names: Sequence[str] | None = None

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """The example at `index` (before `operations`)."""

    @abc.abstractmethod
    def __repr__(self) -> str:
        """A stable description (no memory addresses): Grain stores it in iterator states."""

    def scale_stds(self, pyramid_name: str) -> tuple[Any, ...] | None:
        """Stored per-scale standard deviations of the data under pyramid `pyramid_name`.

        One entry per scale, coarsest first (a float or a per-channel list). None when the
        dataset stores none for that pyramid (pixel sources never do); the caller then needs
        them from the config or must turn standardisation off.
        """
        del pyramid_name
        return None

    def example(self, index: int) -> dict[str, np.ndarray]:
        """The example at ``index`` after ``operations``, their randomness seeded by
        ``index`` alone (statistics over a few examples; training uses Grain's RNG)."""
        element = self[int(index)]
        rng = np.random.default_rng([int(index), 0x57D5])
        for op in self.operations:
            random = isinstance(op, grain.transforms.RandomMap)
            element = op.random_map(element, rng) if random else op.map(element)
        return element

    @property
    def operations(self) -> tuple[Any, ...]:
        """Grain transforms the pipeline must apply to each example, in order.

        Empty for sources whose `__getitem__` already returns final examples; the latent
        source returns `(SampleLatent(),)` when it draws latents from stored moments, since
        that draw needs the per-example RNG that only the Grain sampler provides.
        """
        return ()


def uint8_to_float(image: np.ndarray) -> np.ndarray:
    """Scales uint8 pixels [0, 255] to float32 [-1, 1] (`viz.from_uint8`)."""
    return viz.from_uint8(image)


def pad_to_resolution(image: np.ndarray, resolution: int, value: float = PAD_VALUE) -> np.ndarray:
    """Pads an (H, W, C) image symmetrically to (resolution, resolution, C) with `value`.

    An odd excess puts the extra row/column at the bottom/right. Raises ValueError when the
    image is larger than `resolution` along either axis.
    """
    h, w = image.shape[:2]
    if h > resolution or w > resolution:
        raise ValueError(
            f"cannot pad a {h}x{w} image to {resolution}x{resolution}: resolution must be at "
            f"least {max(h, w)}"
        )
    top, left = (resolution - h) // 2, (resolution - w) // 2
    pads = [(top, resolution - h - top), (left, resolution - w - left)]
    pads += [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pads, mode="constant", constant_values=value)


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """ADM-style centre crop (Dhariwal & Nichol; also DiT / SiT / DFM preprocessing).

    While the short side is at least 2 * resolution, halve the image with a BOX filter (cheap
    antialiasing); then resize with BICUBIC so the short side equals `resolution`; then crop
    the central `resolution` x `resolution` square.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_mode(channels: int) -> str:
    """PIL mode for a channel count: 1 -> "L" (grayscale), 3 -> "RGB"."""
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB) for images, got {channels}")
    return modes[channels]


def fit_image(image: np.ndarray, resolution: int | None, channels: int | None) -> np.ndarray:
    """Brings a uint8 (H, W) or (H, W, C) image to (resolution, resolution, channels) float32.

    - channels: converted through PIL ("L" <-> "RGB") when they differ; None keeps them.
    - resolution: None keeps the size; an image no larger than `resolution` on both sides is
      padded with -1 (the demo pads 28x28 Fashion-MNIST to 32x32); a larger or non-square
      one gets the ADM centre crop (`center_crop_resize`).

    Returns pixels scaled to [-1, 1].
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1|3|4) image, got shape {image.shape}")
    out_channels = channels or min(image.shape[-1], 3)
    h, w, c = image.shape
    needs_crop = resolution is not None and (h > resolution or w > resolution)
    if c != out_channels or needs_crop:
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        pil = pil.convert(pil_mode(out_channels))
        if needs_crop:
            pil = center_crop_resize(pil, resolution)
        image = np.asarray(pil)
        if image.ndim == 2:
            image = image[..., None]
    pixels = uint8_to_float(image)
    if resolution is not None and pixels.shape[:2] != (resolution, resolution):
        pixels = pad_to_resolution(pixels, resolution)
    return pixels


def make_example(image: np.ndarray, label: int | np.integer) -> dict[str, np.ndarray]:
    """Builds the canonical example dict: float32 "image" and int32 scalar "label"."""
    return {IMAGE_KEY: np.asarray(image, np.float32), LABEL_KEY: np.asarray(label, np.int32)}


def format_paths(paths: Sequence[Any]) -> str:
    """Formats a list of paths for error messages."""
    return ", ".join(repr(str(p)) for p in paths) if paths else "(none)"

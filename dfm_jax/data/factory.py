"""`make_source(settings)`: builds the configured data source.

`settings` is a `dfm_jax.config.DataSettings` (the `data` section of the experiment
config, where every field is declared with its default and documentation): `source`
picks the builder below, and each builder reads the fields it needs (`dir`, `split`,
`resolution`, `channels`, `num_classes`, `frames`, `num_examples`, `tfds_name`,
`image_key`, `label_key`, `download`, `latent_sample`, `validate_files`; the video sources
`frame_stride`, `fps`, `clip`, `random_flip`, `max_bad_fraction`). Fields left
None take the source's own value (its native resolution and channels, its class count).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from dfm_jax.data import common
from dfm_jax.data.fashion_mnist import FashionMnistSource
from dfm_jax.data.image_folder import ImageFolderSource
from dfm_jax.data.latents import METADATA_FILENAME, ArrayRecordLatentSource
from dfm_jax.data.moving_fashion_mnist import MovingFashionMnistSource
from dfm_jax.data.synthetic import SyntheticSource
from dfm_jax.data.tfds_source import TfdsSource
from dfm_jax.data.video_folder import KineticsSource, VideoFolderSource, resolve_clip


def _fashion_mnist(settings: Any) -> common.Source:
    if settings.channels not in (None, 1):
        raise ValueError(
            f"fashion_mnist is grayscale: data.channels must be 1, got {settings.channels}"
        )
    return FashionMnistSource(
        directory=settings.dir or None,
        split=settings.split,
        resolution=settings.resolution or 28,
        download=settings.download,
    )


def _moving_fashion_mnist(settings: Any) -> common.Source:
    if settings.channels not in (None, 1):
        raise ValueError(
            f"moving_fashion_mnist is grayscale: data.channels must be 1, got {settings.channels}"
        )
    return MovingFashionMnistSource(
        directory=settings.dir or None,
        split=settings.split,
        frames=settings.frames,
        resolution=settings.resolution or 32,
        download=settings.download,
    )


def _synthetic(settings: Any) -> common.Source:
    overrides = {
        name: getattr(settings, name)
        for name in ("resolution", "channels", "num_classes")
        if getattr(settings, name) is not None
    }
    return SyntheticSource(num_examples=settings.num_examples, frames=settings.frames, **overrides)


def _image_folder(settings: Any) -> common.Source:
    if not settings.dir:
        raise common.DataNotFoundError(
            "data.source='image_folder' needs --config.data.dir: a directory with one "
            "subfolder of images per class (e.g. ImageNet's train/)"
        )
    if not settings.resolution:
        raise ValueError("data.source='image_folder' needs --config.data.resolution")
    split_dir = os.path.join(settings.dir, settings.split)
    root = split_dir if os.path.isdir(split_dir) else settings.dir
    return ImageFolderSource(
        root,
        resolution=settings.resolution,
        channels=settings.channels or 3,
        validate=settings.validate_files,
    )


def _tfds(settings: Any) -> common.Source:
    if not settings.tfds_name:
        raise ValueError("data.source='tfds' needs --config.data.tfds_name, e.g. 'cifar10'")
    return TfdsSource(
        settings.tfds_name,
        split=settings.split,
        data_dir=settings.dir or None,
        image_key=settings.image_key,
        label_key=settings.label_key,
        resolution=settings.resolution,
        channels=settings.channels,
        num_classes=settings.num_classes,
        download=settings.download,
    )


def _array_record(settings: Any) -> common.Source:
    if not settings.dir:
        raise common.DataNotFoundError(
            "data.source='array_record' needs --config.data.dir: a latent dataset directory "
            "(ArrayRecord shards + metadata.json) made by `python -m dfm_jax.prepare`"
        )
    directory = settings.dir
    split_dir = os.path.join(directory, settings.split)
    if os.path.isfile(os.path.join(split_dir, METADATA_FILENAME)):
        directory = split_dir
    return ArrayRecordLatentSource(
        directory, latent_sample=settings.latent_sample, bad_records=settings.bad_records
    )


def _video_options(settings: Any, name: str) -> dict[str, Any]:
    """The clip options of the video sources, checked: frames, resolution, 3 channels."""
    if settings.frames < 1 or not settings.resolution:
        raise ValueError(
            f"data.source={name!r} needs --config.data.frames >= 1 (frames per clip) and "
            f"--config.data.resolution, got frames={settings.frames}, "
            f"resolution={settings.resolution}"
        )
    if settings.channels not in (None, 3):
        raise ValueError(f"{name} videos are RGB: data.channels must be 3, got {settings.channels}")
    clip = resolve_clip(settings.clip, settings.split)
    return dict(
        frames=settings.frames,
        resolution=settings.resolution,
        frame_stride=settings.frame_stride,
        fps=settings.fps,
        clip=clip,
        random_flip=settings.random_flip,
        max_bad_fraction=settings.max_bad_fraction,
    )


def _video_folder(settings: Any) -> common.Source:
    if not settings.dir:
        raise common.DataNotFoundError(
            "data.source='video_folder' needs --config.data.dir: a directory with one "
            "subfolder of videos (.mp4, .avi, .mkv, .webm, .mov) per class"
        )
    options = _video_options(settings, "video_folder")
    split_dir = os.path.join(settings.dir, settings.split)
    return VideoFolderSource(split_dir if os.path.isdir(split_dir) else settings.dir, **options)


def _kinetics(settings: Any) -> common.Source:
    options = _video_options(settings, "kinetics")
    if not settings.dir:
        raise common.DataNotFoundError(
            "data.source='kinetics' needs --config.data.dir=<root>: the Kinetics-700-2020 "
            "videos under <root>/train/<class>/... and <root>/train.csv or "
            "<root>/annotations/train.csv (e.g. from the cvdfoundation/kinetics-dataset scripts)"
        )
    return KineticsSource(settings.dir, settings.split, **options)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data, taken from the config, without reading it.

    For evaluating imported weights (``python -m dfm_jax.eval --init``): the example shape
    ``(resolution, resolution, channels)`` (or ``(frames, ...)``) and the class count.
    Stores no per-scale stds (standardised configs must set ``pyramid.stds``).
    """

    example_shape: tuple[int, ...]
    num_classes: int

    def scale_stds(self, pyramid_name: str) -> None:
        del pyramid_name
        return None


def data_spec(settings: Any) -> DataSpec:
    """The ``DataSpec`` that the data settings describe (no file is read)."""
    missing = [n for n in ("resolution", "channels", "num_classes") if getattr(settings, n) is None]
    if missing:
        raise ValueError(
            "without reading data the model's input shape comes from the config: set "
            + ", ".join(f"--config.data.{n}" for n in missing)
        )
    shape = (settings.resolution, settings.resolution, settings.channels)
    return DataSpec((settings.frames, *shape) if settings.frames else shape, settings.num_classes)


#: source name -> builder from the data config.
SOURCES: Mapping[str, Callable[[Any], common.Source]] = {
    "fashion_mnist": _fashion_mnist,
    "moving_fashion_mnist": _moving_fashion_mnist,
    "synthetic": _synthetic,
    "image_folder": _image_folder,
    "tfds": _tfds,
    "array_record": _array_record,
    "video_folder": _video_folder,
    "kinetics": _kinetics,
}


def make_source(settings: Any) -> common.Source:
    """Builds the source that ``settings`` (a ``dfm_jax.config.DataSettings``) describe.

    The returned source has `num_classes`, `example_shape` and `len()`, for building the
    model and the pipeline (`make_dataset`).

    Raises:
      ValueError: unknown `source` (the message lists the known ones), missing fields,
        or a dataset whose class count differs from a set `num_classes`.
      DataNotFoundError (a ValueError): data not found; the message says how to get it.
    """
    if settings.source not in SOURCES:
        raise ValueError(
            f"unknown data.source {settings.source!r}; known sources: {', '.join(SOURCES)}"
        )
    source = SOURCES[settings.source](settings)
    expected = settings.num_classes
    if expected is not None and settings.source != "synthetic" and expected != source.num_classes:
        raise ValueError(
            f"data.num_classes={expected} but {source!r} has {source.num_classes} classes; fix "
            "--config.data.num_classes (or leave it None)"
        )
    return source

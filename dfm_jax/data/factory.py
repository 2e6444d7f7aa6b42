"""`make_source(config.data)`: builds the configured data source.

Fields read from the `data` ConfigDict (missing fields take the defaults below):

    source        "fashion_mnist" | "synthetic" | "image_folder" | "tfds" | "array_record"
    dir           data directory (IDX files / class folders / TFDS data_dir / latent
                  dataset); None: the source's default (fashion_mnist: the Debian package
                  location; tfds: TFDS's default)                        default None
    split         "train" | "test" (tfds: any split string; array_record: the subfolder
                  dir/<split> when it has a metadata.json, else dir)    default "train"
    resolution    output height/width of pixel sources (fashion_mnist pads 28 -> resolution
                  with -1; image_folder / tfds centre-crop)             default None (native;
                  required for image_folder)
    channels      image channels (synthetic: any; image_folder/tfds: 1 or 3) default 3 for
                  synthetic/image_folder, native for tfds, 1 for fashion_mnist
    num_classes   synthetic: number of classes; others: when set, must equal the dataset's
                  (catches a model built for the wrong dataset)         default None
    num_examples  synthetic: dataset size                               default 1024
    frames        synthetic: 0 for images, T > 0 for (T, H, W, C) videos default 0
    tfds_name     tfds: the dataset name, e.g. "cifar10"
    image_key     tfds: image feature                                   default "image"
    label_key     tfds: label feature ("" for unconditional)            default "label"
    download      fashion_mnist / tfds: allow a TFDS download           default False
    latent_sample array_record: draw latents from stored moments        default True
    validate_files image_folder: header-check every file at index time  default True
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
from dfm_jax.data.synthetic import SyntheticSource
from dfm_jax.data.tfds_source import TfdsSource


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _fashion_mnist(config: Any) -> common.Source:
    channels = _get(config, "channels", 1)
    if channels != 1:
        raise ValueError(f"fashion_mnist is grayscale: data.channels must be 1, got {channels}")
    return FashionMnistSource(
        directory=_get(config, "dir"),
        split=_get(config, "split", "train"),
        resolution=_get(config, "resolution", 28),
        download=bool(_get(config, "download", False)),
    )


def _synthetic(config: Any) -> common.Source:
    return SyntheticSource(
        num_examples=_get(config, "num_examples", 1024),
        resolution=_get(config, "resolution", 32),
        channels=_get(config, "channels", 3),
        num_classes=_get(config, "num_classes", 10),
        frames=_get(config, "frames", 0),
    )


def _image_folder(config: Any) -> common.Source:
    directory, resolution = _get(config, "dir"), _get(config, "resolution")
    if not directory:
        raise common.DataNotFoundError(
            "data.source='image_folder' needs --config.data.dir: a directory with one "
            "subfolder of images per class (e.g. ImageNet's train/)"
        )
    if not resolution:
        raise ValueError("data.source='image_folder' needs --config.data.resolution")
    split_dir = os.path.join(directory, _get(config, "split", "train"))
    root = split_dir if os.path.isdir(split_dir) else directory
    return ImageFolderSource(
        root,
        resolution=resolution,
        channels=_get(config, "channels", 3),
        validate=bool(_get(config, "validate_files", True)),
    )


def _tfds(config: Any) -> common.Source:
    name = _get(config, "tfds_name")
    if not name:
        raise ValueError("data.source='tfds' needs --config.data.tfds_name, e.g. 'cifar10'")
    return TfdsSource(
        name,
        split=_get(config, "split", "train"),
        data_dir=_get(config, "dir") or None,
        image_key=_get(config, "image_key", "image"),
        label_key=_get(config, "label_key", "label"),
        resolution=_get(config, "resolution"),
        channels=_get(config, "channels"),
        num_classes=_get(config, "num_classes"),
        download=bool(_get(config, "download", False)),
    )


def _array_record(config: Any) -> common.Source:
    directory = _get(config, "dir")
    if not directory:
        raise common.DataNotFoundError(
            "data.source='array_record' needs --config.data.dir: a latent dataset directory "
            "(ArrayRecord shards + metadata.json) made by `python -m dfm_jax.prepare`"
        )
    split_dir = os.path.join(directory, _get(config, "split", "train"))
    if os.path.isfile(os.path.join(split_dir, METADATA_FILENAME)):
        directory = split_dir
    return ArrayRecordLatentSource(
        directory, latent_sample=bool(_get(config, "latent_sample", True))
    )


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


def data_spec(config: Any) -> DataSpec:
    """The ``DataSpec`` that the data config describes (no file is read)."""
    resolution, channels = int(_get(config, "resolution")), int(_get(config, "channels"))
    frames = int(_get(config, "frames", 0) or 0)
    shape = (resolution, resolution, channels)
    return DataSpec((frames, *shape) if frames else shape, int(_get(config, "num_classes")))


#: source name -> builder from the data config.
SOURCES: Mapping[str, Callable[[Any], common.Source]] = {
    "fashion_mnist": _fashion_mnist,
    "synthetic": _synthetic,
    "image_folder": _image_folder,
    "tfds": _tfds,
    "array_record": _array_record,
}


def make_source(config: Any) -> common.Source:
    """Builds the source that `config` (the `data` ConfigDict, or any mapping) describes.

    The returned source has `num_classes`, `example_shape` and `len()`, for building the
    model and the pipeline (`make_dataset`).

    Raises:
      ValueError: unknown `source` (the message lists the known ones), missing fields,
        or a dataset whose class count differs from a set `num_classes`.
      DataNotFoundError (a ValueError): data not found; the message says how to get it.
    """
    name = _get(config, "source")
    if name not in SOURCES:
        raise ValueError(f"unknown data.source {name!r}; known sources: {', '.join(SOURCES)}")
    source = SOURCES[name](config)
    expected = _get(config, "num_classes")
    if expected is not None and name != "synthetic" and expected != source.num_classes:
        raise ValueError(
            f"data.num_classes={expected} but {source!r} has {source.num_classes} classes; fix "
            "--config.data.num_classes (or leave it None)"
        )
    return source

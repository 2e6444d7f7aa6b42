"""TFDS datasets read through `tfds.data_source` (ArrayRecord; no TensorFlow needed)."""

from __future__ import annotations

import numpy as np

from dfm_jax.data import common


def _open(name: str, split: str, data_dir: str | None, download: bool):
    """`tfds.data_source(...)`; `common.DataNotFoundError` naming the fix when it fails."""
    import tensorflow_datasets as tfds  # deferred: imports in ~0.5 s, only needed here

    builder_kwargs = {"file_format": "array_record"} if download else None
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            builder_kwargs=builder_kwargs,
        )
    except Exception as e:  # TFDS raises several types (AssertionError, DatasetNotFound..)
        where = data_dir or "TFDS's default data dir (~/tensorflow_datasets, $TFDS_DATA_DIR)"
        raise common.DataNotFoundError(
            f"cannot open TFDS dataset {name!r} split {split!r} in {where}: {e}. Prepare it "
            f"in ArrayRecord format (`tfds build {name} --file_format=array_record`, or "
            "--config.data.download=True), or set --config.data.dir to its data dir."
        ) from e


class TfdsSource(common.Source):
    """A TFDS dataset as float32 images in [-1, 1] with int32 labels.

    Reads with `tfds.data_source(name, split=..., data_dir=..., download=...)`, which needs
    the dataset prepared in ArrayRecord format (`download=True` prepares it so, which needs
    network access); TensorFlow is not imported.

    Args:
      name: TFDS name, e.g. "cifar10", "imagenet2012", "fashion_mnist".
      split: a TFDS split string ("train", "test", "train[:90%]", ...).
      data_dir: TFDS data directory; None uses TFDS's default (~/tensorflow_datasets or
        $TFDS_DATA_DIR).
      image_key: feature holding the uint8 image.
      label_key: feature holding the class label; None or "" makes the dataset unconditional
        (every label 0).
      resolution: output size; None keeps the dataset's (fixed) size. Smaller images are
        padded with -1, larger or non-square ones get the ADM centre crop.
      channels: 1 or 3; None keeps the dataset's channel count.
      num_classes: the class count; required when the label feature is not a ClassLabel,
        else it must equal the feature's.
      download: let TFDS download and prepare the dataset when it is missing.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        download: bool = False,
    ):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key or None
        self._source = _open(name, split, data_dir, download)
        features = self._source.dataset_info.features
        if image_key not in features:
            raise ValueError(
                f"TFDS {name!r} has no image feature {image_key!r}; features: "
                f"{sorted(features.keys())} (set --config.data.image_key)"
            )
        if self.label_key is not None and self.label_key not in features:
            raise ValueError(
                f"TFDS {name!r} has no label feature {self.label_key!r}; features: "
                f"{sorted(features.keys())} (set --config.data.label_key, or '' for none)"
            )
        self._set_classes(features, num_classes)
        self._set_shape(features, resolution, channels)

    def _set_classes(self, features, num_classes: int | None) -> None:
        """Sets `num_classes` (checked against a ClassLabel feature) and `class_names`."""
        name = self.name
        feature_classes = None
        if self.label_key is not None:
            feature_classes = getattr(features[self.label_key], "num_classes", None)
        elif num_classes is None:
            feature_classes = 1
        if None not in (feature_classes, num_classes) and num_classes != feature_classes:
            raise ValueError(
                f"TFDS {name!r} has {feature_classes} classes, but num_classes={num_classes}"
            )
        num_classes = feature_classes if num_classes is None else num_classes
        if num_classes is None:
            raise ValueError(
                f"TFDS {name!r} feature {self.label_key!r} is not a ClassLabel; set "
                "--config.data.num_classes"
            )
        self.num_classes = int(num_classes)
        names = None
        if self.label_key is not None:
            names = getattr(features[self.label_key], "names", None)
        #: Class names of a ClassLabel feature (e.g. ImageNet synset ids), else None.
        self.class_names = list(names) if names else None

    def _set_shape(self, features, resolution: int | None, channels: int | None) -> None:
        """Sets `resolution`, `channels` and the output `example_shape` (H, W, C)."""
        name, image_key = self.name, self.image_key
        shape = tuple(features[image_key].shape)
        if len(shape) != 3:
            raise ValueError(
                f"TFDS {name!r} feature {image_key!r} has shape {shape}, not (H, W, C)"
            )
        if resolution is None and (shape[0] is None or shape[1] is None):
            raise ValueError(
                f"TFDS {name!r} images have variable size {shape}; set --config.data.resolution"
            )
        self.resolution = resolution
        self.channels = channels
        out_channels = channels or min(int(shape[2]), 3)
        if resolution is None:
            self.example_shape = (int(shape[0]), int(shape[1]), out_channels)
        else:
            self.example_shape = (int(resolution), int(resolution), out_channels)

    def __len__(self) -> int:
        return len(self._source)

    def raw_record(self, index: int) -> dict:
        """The TFDS record at `index` as TFDS returns it (uint8 image, label, other features)."""
        return self._source[int(index)]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.raw_record(index)
        pixels = common.fit_image(record[self.image_key], self.resolution, self.channels)
        label = 0 if self.label_key is None else record[self.label_key]
        return common.make_example(pixels, label)

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_key={self.image_key!r}, label_key={self.label_key!r}, "
            f"resolution={self.resolution}, channels={self.channels})"
        )

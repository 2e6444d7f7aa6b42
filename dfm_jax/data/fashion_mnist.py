"""Fashion-MNIST (Xiao et al. 2017) from IDX files: the `make demo` dataset.

Where the data comes from, in order:

1. `directory` (`--config.data.dir`) when given: it must hold the IDX files.
2. Otherwise the Debian/Ubuntu package location `/usr/share/datasets/fashion-mnist`
   (`sudo apt-get install dataset-fashion-mnist`).
3. Otherwise, only when `download=True`, TFDS's `fashion_mnist` (downloaded and prepared as
   ArrayRecord into `directory`, or TFDS's default data dir).

Nothing found: a `DataNotFoundError` naming the paths tried and how to get the data.
Files may be gzipped (`train-images-idx3-ubyte.gz`) or plain (`train-images-idx3-ubyte`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from dfm_jax.data import common, idx
from dfm_jax.data.tfds_source import TfdsSource

#: Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the IDX files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
#: The ten Fashion-MNIST classes, by label id.
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = 10
IMAGE_SIZE = 28
_FILE_PREFIX = {"train": "train", "test": "t10k"}


def _split_prefix(split: str) -> str:
    if split not in _FILE_PREFIX:
        raise ValueError(
            f"Fashion-MNIST split must be one of {sorted(_FILE_PREFIX)}, got {split!r}"
        )
    return _FILE_PREFIX[split]


def idx_files(directory: str | os.PathLike, split: str) -> tuple[str, str] | None:
    """The (images, labels) IDX paths of `split` in `directory`, or None if either is missing.

    Gzipped files are preferred over plain ones when both exist.
    """
    prefix = _split_prefix(split)
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(directory, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        existing = [c for c in candidates if os.path.isfile(c)]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def load_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads (images uint8 (N, 28, 28), labels int32 (N,)) of a split from IDX files.

    Raises:
      DataNotFoundError: when the files are missing.
      IdxFormatError: when a file is malformed, or images and labels disagree in count, or
        labels fall outside 0..9, or images are not 28x28.
    """
    files = idx_files(directory, split)
    if files is None:
        prefix = _split_prefix(split)
        raise common.DataNotFoundError(
            f"no Fashion-MNIST {split!r} IDX files in {str(directory)!r}: expected "
            f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
        )
    images_path, labels_path = files
    images = idx.read_idx(images_path, expected_ndim=3)
    labels = idx.read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise idx.IdxFormatError(
            f"Fashion-MNIST IDX files must hold uint8 data, got images {images.dtype} "
            f"({images_path}) and labels {labels.dtype} ({labels_path})"
        )
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise idx.IdxFormatError(
            f"{images_path}: Fashion-MNIST images must be 28x28, got {images.shape[1:]}"
        )
    if len(images) != len(labels):
        raise idx.IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise idx.IdxFormatError(
            f"{labels_path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels.max()}"
        )
    return images, labels.astype(np.int32)


class FashionMnistSource(common.Source):
    """Fashion-MNIST as float32 (resolution, resolution, 1) images in [-1, 1] with labels.

    Args:
      directory: the directory holding the IDX files; None searches `DEBIAN_DIR`.
      split: "train" (60000 examples) or "test" (10000).
      resolution: output size, >= 28; the 28x28 digits are centred and padded with the
        background value -1 (the demo uses 32 so that the pyramid halves cleanly).
      download: when no IDX files are found, download and prepare TFDS `fashion_mnist`
        (needs network; into `directory` when given, else TFDS's default data dir).

    Attributes:
      origin: where the data was read from (a directory, or "tfds:fashion_mnist").
    """

    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        split: str = "train",
        resolution: int = IMAGE_SIZE,
        download: bool = False,
    ):
        _split_prefix(split)
        if resolution < IMAGE_SIZE:
            raise ValueError(
                f"Fashion-MNIST resolution must be >= {IMAGE_SIZE} (images are padded, never "
                f"cropped), got {resolution}"
            )
        self.split = split
        self.resolution = int(resolution)
        self.example_shape = (self.resolution, self.resolution, 1)
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._tfds: TfdsSource | None = None

        tried = [os.fspath(directory)] if directory else [DEBIAN_DIR]
        for path in tried:
            if idx_files(path, split) is not None:
                self._images, self._labels = load_idx_split(path, split)
                self.origin = path
                break
        else:
            if not download:
                raise common.DataNotFoundError(
                    f"Fashion-MNIST {split!r} IDX files not found; tried "
                    f"{common.format_paths(tried)}. Get them with `sudo apt-get install "
                    "dataset-fashion-mnist` (installs to "
                    f"{DEBIAN_DIR}), or point --config.data.dir at a directory with "
                    "train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz] from "
                    "https://github.com/zalandoresearch/fashion-mnist, or set "
                    "--config.data.download=True to fetch it with TFDS."
                )
            logging.info(
                "Fashion-MNIST IDX files not found in %s; using TFDS fashion_mnist "
                "(download=True).",
                common.format_paths(tried),
            )
            self._tfds = TfdsSource(
                "fashion_mnist",
                split=split,
                data_dir=os.fspath(directory) if directory else None,
                resolution=self.resolution,
                channels=1,
                download=True,
            )
            self.origin = "tfds:fashion_mnist"
        logging.info(
            "Fashion-MNIST %s: %d examples from %s, resolution %d.",
            split,
            len(self),
            self.origin,
            self.resolution,
        )

    def __len__(self) -> int:
        if self._tfds is not None:
            return len(self._tfds)
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._tfds is not None:
            return self._tfds[index]
        index = int(index)
        pixels = common.uint8_to_float(self._images[index])[..., None]
        if self.resolution != IMAGE_SIZE:
            pixels = common.pad_to_resolution(pixels, self.resolution)
        return common.make_example(pixels, self._labels[index])

    def __repr__(self) -> str:
        return (
            f"FashionMnistSource(origin={self.origin!r}, split={self.split!r}, "
            f"resolution={self.resolution})"
        )

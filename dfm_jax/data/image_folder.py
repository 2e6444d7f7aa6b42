"""Image folders with one subfolder per class (the ImageNet `train/` layout).

    root/
      class_a/ img1.jpg img2.png ...
      class_b/ ...

Class names are sorted and numbered 0..K-1. Images are converted to RGB (or grayscale),
ADM-centre-cropped to the resolution and scaled to [-1, 1].

Unreadable files never stop a run:

- At index time every candidate file's header is opened with PIL (`validate=True`); files
  PIL cannot identify (corrupt, empty, not an image) are skipped. Their count is logged once
  (absl WARNING) and kept in `num_skipped` / `skipped_files`.
- A file that passes the header check but fails to decode later (e.g. a truncated JPEG) is
  replaced by the next readable example in index order; each such file is logged once per
  process and counted in `num_read_failures` (a per-process count).
"""

from __future__ import annotations

import os
from concurrent import futures

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from dfm_jax.data import common

#: File extensions (lower case) treated as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_MAX_REPLACEMENTS = 16


def _header_ok(path: str) -> bool:
    """True when PIL identifies the file as an image (reads the header only)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018  (touch the parsed header)
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def load_image(path: str | os.PathLike, resolution: int, mode: str = "RGB") -> np.ndarray:
    """Decodes one image file, converts it to `mode` and ADM-centre-crops it to `resolution`.

    Returns uint8 (resolution, resolution, C). Raises what PIL raises for unreadable files
    (`READ_ERRORS`).
    """
    with Image.open(path) as image:
        image = image.convert(mode)
    image = common.center_crop_resize(image, resolution)
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


#: Exceptions that mean "this file is not a readable image" (PIL and the OS).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted) and (path, label) pairs of every image file under `root`.

    Files are sorted within each class; subfolders of a class folder are searched too.
    Hidden files and folders (starting with ".") are ignored.

    Raises:
      DataNotFoundError: when `root` is not a directory or has no class subfolders.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise common.DataNotFoundError(
            f"image folder {root!r} does not exist; set --config.data.dir to a directory with "
            "one subfolder of images per class"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise common.DataNotFoundError(
            f"image folder {root!r} has no class subfolders; expected root/<class>/<image>"
        )
    files = []
    for label, name in enumerate(classes):
        class_files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            class_files.extend(
                os.path.join(dirpath, f)
                for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            )
        files.extend((path, label) for path in sorted(class_files))
    return classes, files


class ImageFolderSource(common.Source):
    """Class-labelled images from a folder tree, ADM-centre-cropped to `resolution`.

    Args:
      root: the folder with one subfolder per class.
      resolution: output height and width.
      channels: 3 (RGB) or 1 (grayscale).
      validate: open every file's header at index time and skip unidentifiable files
        (uses a small thread pool; turn off for huge trusted folders on slow storage).

    Attributes:
      class_names: sorted class folder names; label i is class_names[i].
      num_skipped: files skipped at index time (also logged once).
      skipped_files: their paths.
      num_read_failures: files that failed to decode at read time in this process.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        channels: int = 3,
        validate: bool = True,
    ):
        self.root = os.fspath(root)
        self.resolution = int(resolution)
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.channels = int(channels)
        self._mode = common.pil_mode(self.channels)
        self.class_names, files = list_image_folder(self.root)
        self.num_classes = len(self.class_names)
        self.example_shape = (self.resolution, self.resolution, self.channels)

        if validate and files:
            with futures.ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as ex:
                ok = list(ex.map(_header_ok, (path for path, _ in files), chunksize=64))
        else:
            ok = [True] * len(files)
        self._files = [f for f, good in zip(files, ok, strict=True) if good]
        self.skipped_files = [path for (path, _), good in zip(files, ok, strict=True) if not good]
        self.num_skipped = len(self.skipped_files)
        if self.num_skipped:
            logging.warning(
                "ImageFolderSource(%s): skipped %d of %d files that are not readable images, "
                "e.g. %s",
                self.root,
                self.num_skipped,
                len(files),
                ", ".join(self.skipped_files[:3]),
            )
        if not self._files:
            raise common.DataNotFoundError(
                f"image folder {self.root!r} has class subfolders {self.class_names[:5]} but no "
                f"readable images (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.num_read_failures = 0
        self._failed_paths: set[str] = set()
        logging.info(
            "ImageFolderSource(%s): %d images in %d classes.",
            self.root,
            len(self._files),
            self.num_classes,
        )

    @property
    def files(self) -> list[tuple[str, int]]:
        """The (path, label) pairs in index order."""
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def _load(self, path: str) -> np.ndarray:
        return load_image(path, self.resolution, self._mode)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        for attempt in range(_MAX_REPLACEMENTS):
            path, label = self._files[(index + attempt) % len(self._files)]
            try:
                pixels = self._load(path)
            except READ_ERRORS as e:
                self.num_read_failures += 1
                if path not in self._failed_paths:
                    self._failed_paths.add(path)
                    logging.warning(
                        "ImageFolderSource: cannot decode %s (%s); using the next image instead.",
                        path,
                        e,
                    )
                continue
            return common.make_example(common.uint8_to_float(pixels), label)
        raise RuntimeError(
            f"ImageFolderSource: {_MAX_REPLACEMENTS} consecutive files from index {index} failed "
            f"to decode under {self.root!r}; the folder looks broken"
        )

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(root={self.root!r}, resolution={self.resolution}, "
            f"channels={self.channels}, num_examples={len(self)})"
        )

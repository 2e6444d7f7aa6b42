"""Readers for dataset preparation: index -> ADM-centre-cropped uint8 RGB image (or clip) + label.

A reader never substitutes one image for another: an image that cannot be read raises
`ReadError`, and `dfm_jax.preparation` skips and counts it, so that the written records are
exactly the readable images in index order.

Both readers crop with the ADM recipe (`common.center_crop_resize`: BOX halving while the short
side is at least twice the resolution, BICUBIC resize of the short side to the resolution,
centre crop), which also upsamples images smaller than the resolution, as ADM / DiT / SiT do.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

import numpy as np
from PIL import Image

from dfm_jax.data import common, image_folder, tfds_source, video, video_folder

#: `--source` values of images.
IMAGE_SOURCES = ("image_folder", "tfds")
#: `--source` values of videos (centre clips of `--frames` frames).
VIDEO_SOURCES = ("video_folder", "kinetics")
#: `--source` values.
SOURCES = (*IMAGE_SOURCES, *VIDEO_SOURCES)


class ReadError(Exception):
    """One image could not be read or decoded.

    Attributes:
      key: the image's key (see `ImageReader.read`).
      reason: what went wrong.
    """

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


class ImageReader(abc.ABC):
    """Random-access, thread-safe reader of (uint8 image, label, key) triples.

    Attributes:
      resolution: output height and width.
      num_classes: labels lie in [0, num_classes).
      class_names: the name of every class (label i is class_names[i]).
    """

    resolution: int
    num_classes: int
    class_names: list[str]

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of candidate images (readable or not)."""

    @abc.abstractmethod
    def read(self, index: int) -> tuple[np.ndarray, int, str]:
        """(uint8 (resolution, resolution, 3) image, label, key); ReadError when unreadable.

        The key names the image (a path relative to the folder, a TFDS file name).
        """

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the data (source, location, size), for resume checks."""


class ImageFolderReader(ImageReader):
    """Images under `root/<class>/...` (`image_folder.list_image_folder` order).

    Files are not opened at index time (that scan is slow for ImageNet on network storage);
    a file that is not a readable image fails in `read` and is skipped by the caller.
    """

    def __init__(self, root: str | os.PathLike, resolution: int):
        self.root = os.path.abspath(os.fspath(root))
        self.resolution = int(resolution)
        self.class_names, self._files = image_folder.list_image_folder(self.root)
        self.num_classes = len(self.class_names)
        if not self._files:
            raise common.DataNotFoundError(
                f"image folder {self.root!r} has class subfolders {self.class_names[:5]} but no "
                f"image files (extensions {', '.join(image_folder.IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self._files)

    def read(self, index: int) -> tuple[np.ndarray, int, str]:
        path, label = self._files[index]
        key = os.path.relpath(path, self.root)
        try:
            pixels = image_folder.load_image(path, self.resolution, "RGB")
        except image_folder.READ_ERRORS as e:
            raise ReadError(key, f"{type(e).__name__}: {e}") from e
        return pixels, label, key

    def describe(self) -> dict[str, Any]:
        return {
            "source": "image_folder",
            "data_dir": self.root,
            "num_files": len(self._files),
            "num_classes": self.num_classes,
        }


class TfdsReader(ImageReader):
    """A TFDS image-classification dataset in ArrayRecord format (e.g. "imagenet2012").

    ImageNet: download the official archives (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar)
    to TFDS's manual dir and run `tfds build imagenet2012 --file_format=array_record`.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        resolution: int,
        image_key: str = "image",
        label_key: str = "label",
    ):
        self.resolution = int(resolution)
        self._source = tfds_source.TfdsSource(
            name,
            split=split,
            data_dir=data_dir or None,
            image_key=image_key,
            label_key=label_key,
            resolution=resolution,
            channels=3,
        )
        self.num_classes = self._source.num_classes
        self.class_names = self._source.class_names or [str(i) for i in range(self.num_classes)]
        self._description = {
            "source": "tfds",
            "tfds_name": name,
            "split": split,
            "data_dir": os.path.abspath(data_dir) if data_dir else "",
            "num_examples": len(self._source),
            "num_classes": self.num_classes,
        }

    def __len__(self) -> int:
        return len(self._source)

    def _key(self, record: dict, index: int) -> str:
        name = record.get("file_name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return str(name) if name else f"{self._source.split}[{index}]"

    def read(self, index: int) -> tuple[np.ndarray, int, str]:
        key = f"{self._source.split}[{index}]"
        try:
            record = self._source.raw_record(index)
            key = self._key(record, index)
            image = np.asarray(record[self._source.image_key])
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"expected a uint8 image, got {image.dtype} {image.shape}")
            pil = Image.fromarray(
                image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
            )
            pixels = np.asarray(common.center_crop_resize(pil.convert("RGB"), self.resolution))
            label = int(record[self._source.label_key]) if self._source.label_key else 0
        except Exception as e:  # TFDS decoders raise many types; the caller counts failures
            raise ReadError(key, f"{type(e).__name__}: {e}") from e
        return pixels, label, key

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """Which clip of every video is prepared: `frames` frames every `frame_stride` decoded
    frames (or at the target `fps` when > 0), from the centre of the video."""

    frames: int
    frame_stride: int = 1
    fps: float = 0.0


class VideoReader(ImageReader):
    """Centre clips of a video source (`video_folder.VideoSource`: Kinetics or class
    folders), uint8 ``(frames, resolution, resolution, 3)``: the evaluation clip of every
    video, deterministic. Files are not opened at index time; an unreadable, truncated or
    too-short video fails in `read` and is skipped by the caller."""

    def __init__(self, source: video_folder.VideoSource, description: dict[str, Any]):
        self.source, self._files = source, source.files
        self.resolution = source.resolution
        self.num_classes, self.class_names = source.num_classes, list(source.class_names)
        self._description = {
            **description,
            "num_files": len(self._files),
            "num_classes": self.num_classes,
            "frames": source.frames,
            "frame_stride": source.frame_stride,
            "fps": source.fps,
        }

    def __len__(self) -> int:
        return len(self._files)

    def read(self, index: int) -> tuple[np.ndarray, int, str]:
        path, label = self._files[index]
        key = os.path.relpath(path, self.source.name)
        try:
            clip = video.read_clip(
                path,
                frames=self.source.frames,
                resolution=self.resolution,
                frame_stride=self.source.frame_stride,
                fps=self.source.fps,
                mode="center",
            )
        except video.VideoReadError as e:
            raise ReadError(key, str(e)) from e
        return clip, label, key

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


def make_video_reader(
    source: str, data_dir: str, resolution: int, split: str, clip: ClipSettings
) -> VideoReader:
    """The reader of a `VIDEO_SOURCES` source: Kinetics (`data_dir` is its root, `split`
    "train" or "validate") or a class folder (`data_dir` itself)."""
    if not data_dir:
        raise common.DataNotFoundError(
            f"--source={source} needs --data_dir: "
            + (
                "the Kinetics-700 root (<root>/<split>/<class>/<clip>.mp4 and <root>/train.csv)"
                if source == "kinetics"
                else "a folder with one subfolder of videos per class"
            )
        )
    options = dict(resolution=resolution, clip="center", **dataclasses.asdict(clip))
    root = os.path.abspath(data_dir)
    if source == "kinetics":
        videos = video_folder.KineticsSource(root, split, **options)
    else:
        videos = video_folder.VideoFolderSource(root, **options)
    return VideoReader(videos, {"source": source, "data_dir": root, "split": split})


def make_reader(
    source: str,
    data_dir: str,
    resolution: int,
    tfds_name: str = "imagenet2012",
    split: str = "train",
    image_key: str = "image",
    label_key: str = "label",
    clip: ClipSettings | None = None,
) -> ImageReader:
    """The reader for `--source` (one of SOURCES); video sources need `clip`."""
    if source in VIDEO_SOURCES:
        if clip is None:
            raise ValueError(f"--source={source} reads clips: give the clip settings")
        return make_video_reader(source, data_dir, resolution, split, clip)
    if source == "image_folder":
        if not data_dir:
            raise common.DataNotFoundError(
                "--source=image_folder needs --data_dir=<folder with one subfolder per class>"
            )
        return ImageFolderReader(data_dir, resolution)
    if source == "tfds":
        return TfdsReader(tfds_name, split, data_dir, resolution, image_key, label_key)
    raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")

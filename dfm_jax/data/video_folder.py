"""Video sources: class-folder videos and Kinetics-700(-2020), decoded with PyAV.

    VideoFolderSource(root, frames=16, resolution=256)       root/<class>/<video>.mp4 ...
    KineticsSource(root, "train", frames=16, resolution=256)  <root>/train/<class>/<id>_<s>_<e>.mp4

Examples (after the source's `operations`) are ``{"image": float32 (T, res, res, 3) in
[-1, 1], "label": int32}``: a clip of T frames every ``stride`` frames (see
`dfm_jax.data.video`), every frame ADM-centre-cropped.

Design: `__getitem__` returns only the lightweight record ``{"path", "label", "index"}``;
decoding happens in `DecodeClip`, a Grain RandomMapTransform that `operations` returns
(as `latents.SampleLatent`), because the random temporal offset and the flip need Grain's
per-example RNG. So clips are reproduced exactly on resume and the decoding runs in
``data.worker_count`` worker processes (the source and the transform pickle). With clip
"center" and no flip no randomness is used: evaluation clips are deterministic.

Bad videos never crash a run: a file that cannot be decoded, is truncated or is too short
for the clip is replaced by the next readable one in index order, logged once per file and
counted (`num_reads`, `num_bad`, `num_too_short`, `bad_files`; per process -- each Grain
worker counts its own). Once more than ``max_bad_fraction`` of the reads so far (after
`MIN_READS_FOR_LIMIT` reads) failed, `TooManyBadVideosError` stops the run.
"""

from __future__ import annotations

import csv
import os
import re
import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from dfm_jax.data import common, video
from dfm_jax.utils import errors

#: File extensions (lower case) treated as videos.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
#: The bad-video fraction limit applies once this many reads were made.
MIN_READS_FOR_LIMIT = 20
#: Consecutive bad videos tried before giving up on one example.
_MAX_REPLACEMENTS = 16
#: Kinetics split name -> (split folder names, annotation CSV names), first match wins.
KINETICS_SPLITS = {
    "train": (("train",), ("train.csv",)),
    "validate": (("val", "validate"), ("validate.csv", "val.csv")),
    "val": (("val", "validate"), ("validate.csv", "val.csv")),
}
_KINETICS_HOWTO = (
    "Download the Kinetics-700-2020 videos and annotation CSVs (e.g. with the "
    "cvdfoundation/kinetics-dataset scripts k700_2020_downloader.sh and "
    "k700_2020_extractor.sh) and pass --config.data.dir=<root> with videos under "
    "<root>/train/<class>/<youtube_id>_<start>_<end>.mp4 (val/ for the validate split) and "
    "<root>/train.csv or <root>/annotations/train.csv"
)
_KINETICS_NAME = re.compile(r"^(.+)_(\d+)_(\d+)$")


class TooManyBadVideosError(errors.RunFault):
    """More than ``max_bad_fraction`` of the videos read so far could not be used."""


def resolve_clip(clip: str, split: str) -> str:
    """``data.clip`` as a mode of `video.CLIP_MODES`: "" is "random" for split "train",
    "center" for any other split."""
    if not clip:
        return "random" if split == "train" else "center"
    if clip not in video.CLIP_MODES:
        raise ValueError(f"clip must be one of {video.CLIP_MODES} or '', got {clip!r}")
    return clip


def _video_files(folder: str) -> list[str]:
    """Sorted video files under `folder` (recursively), hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(VIDEO_EXTENSIONS)
        )
    return sorted(found)


class DecodeClip(grain.transforms.RandomMap):
    """Decodes the clip of a video source's record with Grain's per-example RNG.

    Input ``{"path", "label", "index"}`` from ``VideoSource.__getitem__``; output
    ``{"image": float32 (T, res, res, 3), "label": int32}`` (`VideoSource.load`).
    """

    def __init__(self, source: VideoSource):
        self.source = source

    def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.source.load(int(element["index"]), rng)


class VideoSource(common.Source):
    """Base of the video sources: (path, label) files -> clips (see the module docstring).

    Args:
      name: the folder named in messages (the root or split folder).
      files: ``(path, label)`` pairs in index order.
      class_names: label i is class_names[i].
      frames: T, frames per clip (>= 1).
      resolution: output height and width.
      frame_stride: decoded frames between clip frames (when ``fps`` is 0).
      fps: target frame rate; > 0 sets the stride per video from its average rate.
      clip: "random" (uniform temporal offset, training) or "center" (evaluation).
      random_flip: with clip "random", flip half the clips left-right.
      max_bad_fraction: stop once more than this fraction of reads failed.
    """

    def __init__(
        self,
        name: str,
        files: Sequence[tuple[str, int]],
        class_names: Sequence[str],
        *,
        frames: int,
        resolution: int,
        frame_stride: int = 1,
        fps: float = 0.0,
        clip: str = "random",
        random_flip: bool = False,
        max_bad_fraction: float = 0.05,
    ):
        if frames < 1 or resolution < 1 or frame_stride < 1:
            raise ValueError(
                f"video sources need frames, resolution and frame_stride >= 1, got {frames}, "
                f"{resolution}, {frame_stride}"
            )
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.name, self._files = name, list(files)
        self.class_names, self.num_classes = tuple(class_names), len(class_names)
        self.frames, self.resolution = int(frames), int(resolution)
        self.frame_stride, self.fps = int(frame_stride), float(fps)
        self.clip = resolve_clip(clip, "train")
        self.random_flip, self.max_bad_fraction = bool(random_flip), float(max_bad_fraction)
        self.example_shape = (self.frames, self.resolution, self.resolution, 3)
        self.num_reads = self.num_bad = self.num_too_short = 0
        self.bad_files: dict[str, str] = {}  # path -> reason, first failure only
        self._lock = threading.Lock()  # Grain's read threads share the counters

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def files(self) -> list[tuple[str, int]]:
        """The (path, label) pairs in index order."""
        return list(self._files)

    @property
    def operations(self) -> tuple[grain.transforms.RandomMap, ...]:
        return (DecodeClip(self),)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        """The record ``{"path": str, "label": int32, "index": int64}``; `DecodeClip` decodes it."""
        path, label = self._files[int(index)]
        return {"path": path, common.LABEL_KEY: np.int32(label), "index": np.int64(index)}

    def read_clip(self, path: str, rng: np.random.Generator | None) -> np.ndarray:
        """float32 ``(T, res, res, 3)`` clip of `path` (`video.load_clip` with this config)."""
        flip = 0.5 if self.random_flip and self.clip == "random" else 0.0
        return video.load_clip(
            path,
            frames=self.frames,
            resolution=self.resolution,
            frame_stride=self.frame_stride,
            fps=self.fps,
            mode=self.clip,
            flip_probability=flip,
            rng=rng,
        )

    def load(self, index: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """The example of record `index`, or of the next readable video after it.

        `rng` is needed for clip "random" (and the flip). Raises `TooManyBadVideosError`
        when the bad fraction exceeds the limit or `_MAX_REPLACEMENTS` videos in a row fail.
        """
        if rng is None and self.clip == "random":
            raise ValueError('clip "random" needs Grain\'s per-example rng (a seeded sampler)')
        for attempt in range(_MAX_REPLACEMENTS):
            path, label = self._files[(index + attempt) % len(self._files)]
            with self._lock:
                self.num_reads += 1
            try:
                return common.make_example(self.read_clip(path, rng), label)
            except video.VideoReadError as e:
                self._count_bad(path, e)
        raise TooManyBadVideosError(
            f"{type(self).__name__}({self.name}): {_MAX_REPLACEMENTS} videos in a row from "
            f"index {index} could not be read ({self._counts()}); the folder looks broken"
        )

    def _counts(self) -> str:
        return (
            f"{self.num_bad} of {self.num_reads} reads failed, {self.num_too_short} of them "
            "too short"
        )

    def _count_bad(self, path: str, error: video.VideoReadError) -> None:
        with self._lock:
            self.num_bad += 1
            self.num_too_short += isinstance(error, video.VideoTooShortError)
            first = path not in self.bad_files
            self.bad_files.setdefault(path, str(error))
        if first:
            logging.warning(
                "%s(%s): skipping %s (%s); using the next video instead.",
                type(self).__name__,
                self.name,
                path,
                error,
            )
        too_many = self.num_bad > self.max_bad_fraction * self.num_reads
        if self.num_reads >= MIN_READS_FOR_LIMIT and too_many:
            examples = ", ".join(list(self.bad_files)[:3])
            raise TooManyBadVideosError(
                f"{type(self).__name__}: too many bad videos under {self.name!r}: "
                f"{self._counts()} (more than data.max_bad_fraction={self.max_bad_fraction}), "
                f"e.g. {examples}. Fix or remove them, or raise --config.data.max_bad_fraction"
            )

    def _repr_fields(self) -> str:
        return (
            f"frames={self.frames}, resolution={self.resolution}, "
            f"frame_stride={self.frame_stride}, fps={self.fps}, clip={self.clip!r}, "
            f"random_flip={self.random_flip}, num_examples={len(self)}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.name!r}, {self._repr_fields()})"


class VideoFolderSource(VideoSource):
    """Videos in one subfolder per class: ``root/<class>/<video>.mp4|.avi|.mkv|.webm|.mov``.

    Class folders are sorted and numbered 0..K-1; subfolders of a class are searched too.
    Keyword arguments are `VideoSource`'s.

    Raises:
      DataNotFoundError: `root` is missing, or has no class folders or no videos.
    """

    def __init__(self, root: str | os.PathLike, **kwargs):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise common.DataNotFoundError(
                f"video folder {root!r} does not exist; set --config.data.dir to a directory "
                "with one subfolder of videos per class"
            )
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in _video_files(os.path.join(root, name))
        ]
        if not files:
            raise common.DataNotFoundError(
                f"video folder {root!r} has no videos ({', '.join(VIDEO_EXTENSIONS)}) in "
                f"class subfolders (found {classes[:5] or 'none'}); expected root/<class>/<video>"
            )
        super().__init__(root, files, classes, **kwargs)
        logging.info("%r: %d videos in %d classes.", self, len(files), len(classes))


def _find(root: str, names: Sequence[str], where: Sequence[str], what: str) -> str:
    """The first existing ``root/<where>/<name>``; DataNotFoundError naming the fix."""
    tried = [os.path.join(root, sub, name) for name in names for sub in where]
    for path in tried:
        if os.path.exists(path):
            return path
    raise common.DataNotFoundError(
        f"Kinetics: no {what} found (tried {common.format_paths(tried)}). {_KINETICS_HOWTO}"
    )


def read_kinetics_csv(path: str) -> list[tuple[str, str, int, int]]:
    """``(label, youtube_id, time_start, time_end)`` rows of a Kinetics annotation CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"label", "youtube_id", "time_start", "time_end"}
        if not needed <= set(reader.fieldnames or ()):
            raise common.DataNotFoundError(
                f"{path}: not a Kinetics annotation CSV (columns {reader.fieldnames}, need "
                f"{sorted(needed)}). {_KINETICS_HOWTO}"
            )
        return [
            (r["label"], r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"])))
            for r in reader
        ]


def _index_clips(folder: str) -> dict[tuple[str, int, int], str]:
    """``(youtube_id, start, end) -> path`` of the ``<id>_<start>_<end>.<ext>`` videos."""
    index = {}
    for path in _video_files(folder):
        match = _KINETICS_NAME.match(os.path.splitext(os.path.basename(path))[0])
        if match:
            index[(match[1], int(match[2]), int(match[3]))] = path
    return index


class KineticsSource(VideoSource):
    """Kinetics-700(-2020) as distributed: clips and annotation CSVs under `root`.

    Layout: ``<root>/<split folder>/<class>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (any
    depth below the split folder) and ``<root>/[annotations/]<split>.csv`` with columns
    label, youtube_id, time_start, time_end (split, ...). Split "train" uses train/ and
    train.csv; "validate" or "val" uses val/ (or validate/) and validate.csv (or val.csv).
    Class names are the sorted unique labels of train.csv when it is found (so every split
    numbers classes alike), else of the split's CSV. Files are matched to rows by
    (youtube_id, start, end); rows whose file is missing (Kinetics always has some) or whose
    label is not a class are counted in `num_missing` and reported in one log line. Keyword
    arguments are `VideoSource`'s.

    Raises:
      DataNotFoundError: root, split folder or CSV missing, or no row has its file.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", **kwargs):
        root = os.fspath(root)
        if split not in KINETICS_SPLITS:
            raise ValueError(f"Kinetics split must be one of {sorted(KINETICS_SPLITS)}: {split!r}")
        if not os.path.isdir(root):
            raise common.DataNotFoundError(f"Kinetics: {root!r} does not exist. {_KINETICS_HOWTO}")
        folders, csv_names = KINETICS_SPLITS[split]
        self.split = split
        self.split_dir = _find(root, folders, ("",), f"{split} video folder")
        self.csv_path = _find(root, csv_names, ("", "annotations"), f"{split} annotation CSV")
        rows = read_kinetics_csv(self.csv_path)
        try:
            train_csv = _find(root, ("train.csv",), ("", "annotations"), "train.csv")
            labels = {row[0] for row in read_kinetics_csv(train_csv)}
        except common.DataNotFoundError:
            labels = {row[0] for row in rows}
        classes = sorted(labels)
        numbers = {name: i for i, name in enumerate(classes)}
        clips = _index_clips(self.split_dir)
        files = [
            (clips[(ytid, start, end)], numbers[label])
            for label, ytid, start, end in rows
            if (ytid, start, end) in clips and label in numbers
        ]
        self.num_missing = len(rows) - len(files)
        if not files:
            raise common.DataNotFoundError(
                f"Kinetics: none of the {len(rows)} clips of {self.csv_path} is under "
                f"{self.split_dir!r}. {_KINETICS_HOWTO}"
            )
        super().__init__(root, files, classes, **kwargs)
        log = logging.warning if self.num_missing else logging.info
        log(
            "%r: %d of %d clips of %s found, %d missing; %d classes.",
            self,
            len(files),
            len(rows),
            os.path.basename(self.csv_path),
            self.num_missing,
            len(classes),
        )

    def __repr__(self) -> str:
        return f"KineticsSource(root={self.name!r}, split={self.split!r}, {self._repr_fields()})"

"""Video decoding (PyAV) and clip sampling: pure helpers for the video sources.

A clip is ``frames`` (T) frames taken every ``stride`` decoded frames from a video with N
frames, starting at ``offset``::

    indices = offset + stride * arange(T),    0 <= offset <= N - (1 + (T - 1) * stride)

``stride`` is ``frame_stride``, or -- when a target ``fps`` > 0 is given -- derived from the
video's average frame rate: ``max(1, round(video_fps / fps))``. Training draws ``offset``
uniformly ("random"), evaluation takes the centre clip ("center",
``offset = (N - span) // 2``). Frames are indexed in presentation order, as FFmpeg's
decoder outputs them.

Every frame is then ADM-centre-cropped to ``resolution`` (`common.center_crop_resize`:
short side to ``resolution``, central square), optionally flipped left-right, and scaled to
float32 [-1, 1]: ``(T, resolution, resolution, 3)``.

A file that cannot be opened or decoded or has no video stream raises `VideoReadError`;
one that ends before a needed frame its subclass `VideoTruncatedError`; one too short for
the clip `VideoTooShortError`. The sources catch that family, count and skip the file.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from dfm_jax.data import common

#: Clip placements: a uniform random offset (training) or the centre clip (evaluation).
CLIP_MODES = ("random", "center")


class VideoReadError(Exception):
    """A video file that cannot be read: unreadable, truncated, no video stream, too short."""


class VideoTooShortError(VideoReadError):
    """A readable video with fewer frames than the clip spans (``1 + (T - 1) * stride``)."""


class VideoTruncatedError(VideoReadError):
    """The decoder ran out of frames before a needed one; `decoded` frames were decoded."""

    def __init__(self, message: str, decoded: int):
        super().__init__(message)
        self.decoded = decoded


#: A container frame count may overstate the decodable frames by this many (edit lists,
#: a dropped last frame); `load_clip` then slides the clip back instead of failing.
FRAME_COUNT_SLACK = 2


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream.

    Attributes:
      num_frames: frames in the stream (container count, else counted from packets).
      fps: average frame rate (frames per second; 0.0 when the container has none).
      height, width: frame size in pixels.
    """

    num_frames: int
    fps: float
    height: int
    width: int


def _av() -> Any:
    """The PyAV module, imported on first use (keeps `import dfm_jax.config` light)."""
    import av

    return av


def _open(path: str | os.PathLike) -> Any:
    """``av.open`` that raises `VideoReadError` for unreadable files."""
    av = _av()
    try:
        return av.open(os.fspath(path), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot open video {os.fspath(path)!r}: {e}") from None


def _video_stream(container: Any, path: str | os.PathLike) -> Any:
    if not container.streams.video:
        raise VideoReadError(f"{os.fspath(path)!r} has no video stream")
    return container.streams.video[0]


def _count_packets(container: Any, stream: Any) -> int:
    """Frames of `stream` counted from its packets (demuxing only, no decoding)."""
    return sum(1 for packet in container.demux(stream) if packet.size)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average frame rate and size of `path`'s first video stream.

    Raises:
      VideoReadError: the file cannot be opened or has no video stream.
    """
    av = _av()
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            num_frames = int(stream.frames) or _count_packets(container, stream)
        except (av.FFmpegError, OSError) as e:
            raise VideoReadError(f"cannot read video {os.fspath(path)!r}: {e}") from None
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        context = stream.codec_context
        return VideoInfo(num_frames, float(rate or 0.0), int(context.height), int(context.width))


def decode_frames(path: str | os.PathLike, indices: Any = None) -> np.ndarray:
    """Decodes frames of `path` (presentation order) as RGB uint8 ``(len(indices), H, W, 3)``.

    `indices`: increasing-or-not frame numbers to keep (repeats allowed); None keeps all
    frames ``(N, H, W, 3)``. Decoding stops after the last needed frame and only the kept
    frames are converted to RGB, so a clip near the start is cheap.

    Raises:
      VideoReadError: unreadable or corrupt file, no video stream; its subclass
        VideoTruncatedError: the video ends before a needed frame.
    """
    wanted = None if indices is None else np.asarray(indices, np.int64).reshape(-1)
    if wanted is not None and (wanted.size == 0 or wanted.min() < 0):
        raise ValueError(f"indices must be non-empty and >= 0, got {indices!r}")
    last = None if wanted is None else int(wanted.max())
    keep = None if wanted is None else set(wanted.tolist())
    kept: dict[int, np.ndarray] = {}
    count, av = 0, _av()
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            for frame in container.decode(stream):
                if keep is None or count in keep:
                    kept[count] = frame.to_ndarray(format="rgb24")
                count += 1
                if last is not None and count > last:
                    break
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoReadError(f"cannot decode video {os.fspath(path)!r}: {e}") from None
    if last is not None and count <= last:
        raise VideoTruncatedError(
            f"video {os.fspath(path)!r} is truncated: it ends after {count} frames, frame "
            f"{last} was needed",
            count,
        )
    if not kept:
        raise VideoReadError(f"video {os.fspath(path)!r} has no decodable frames")
    order = range(count) if wanted is None else wanted.tolist()
    return np.stack([kept[i] for i in order])


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of `path`, RGB uint8 ``(N, H, W, 3)``, and its average frame rate."""
    info = probe(path)
    return decode_frames(path), info.fps


def clip_stride(video_fps: float, frame_stride: int = 1, fps: float = 0.0) -> int:
    """Decoded frames between clip frames: ``frame_stride``, or, when ``fps`` > 0,
    ``max(1, round(video_fps / fps))`` (raises `VideoReadError` if the video has no rate)."""
    if fps <= 0:
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        return int(frame_stride)
    if video_fps <= 0:
        raise VideoReadError("the video has no frame rate, so data.fps cannot set the stride")
    return max(1, round(video_fps / fps))


def clip_span(frames: int, stride: int) -> int:
    """Frames a clip of `frames` frames every `stride` covers: ``1 + (frames - 1) * stride``."""
    return 1 + (frames - 1) * stride


def clip_indices(
    num_frames: int,
    frames: int,
    stride: int,
    mode: str = "center",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The ``(frames,)`` int64 frame numbers of a clip: ``offset + stride * arange(frames)``.

    mode "random" draws ``offset ~ U{0, ..., num_frames - span}`` from `rng`; "center" takes
    ``offset = (num_frames - span) // 2``.

    Raises:
      VideoTooShortError: ``num_frames < span`` (``clip_span(frames, stride)``).
    """
    if frames < 1 or stride < 1:
        raise ValueError(f"need frames >= 1 and stride >= 1, got {frames}, {stride}")
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    span = clip_span(frames, stride)
    room = num_frames - span
    if room < 0:
        raise VideoTooShortError(
            f"{num_frames} frames, a clip of {frames} frames every {stride} needs {span}"
        )
    if mode == "random":
        if rng is None:
            raise ValueError('clip mode "random" needs a numpy Generator')
        offset = int(rng.integers(0, room + 1))
    else:
        offset = room // 2
    return offset + stride * np.arange(frames, dtype=np.int64)


def resize_clip(clip: np.ndarray, resolution: int) -> np.ndarray:
    """ADM centre crop of every frame: uint8 ``(T, H, W, 3)`` -> ``(T, res, res, 3)``."""
    return np.stack(
        [np.asarray(common.center_crop_resize(Image.fromarray(f), resolution)) for f in clip]
    )


def clip_pixels(clip: np.ndarray, flip: bool = False) -> np.ndarray:
    """uint8 ``(T, H, W, 3)`` -> float32 in [-1, 1], flipped left-right when `flip`."""
    pixels = common.uint8_to_float(clip)
    return np.ascontiguousarray(pixels[:, :, ::-1]) if flip else pixels


def read_clip(
    path: str | os.PathLike,
    *,
    frames: int,
    resolution: int,
    frame_stride: int = 1,
    fps: float = 0.0,
    mode: str = "center",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One clip of `path` as uint8 ``(frames, resolution, resolution, 3)`` (RGB).

    The stride comes from `frame_stride` / `fps` (`clip_stride`), the offset from `mode`
    (`clip_indices`; "random" draws it from `rng`), then each frame is centre-cropped.
    "center" uses no randomness (deterministic). When the container's frame count exceeds
    the decodable frames by at most `FRAME_COUNT_SLACK`, a clip past the real end slides
    back to end at the last frame.

    Raises:
      VideoReadError: unreadable / truncated video; VideoTooShortError: too short.
    """
    info = probe(path)
    stride = clip_stride(info.fps, frame_stride, fps)
    try:
        indices = clip_indices(info.num_frames, frames, stride, mode, rng)
    except VideoTooShortError as e:
        raise VideoTooShortError(f"video {os.fspath(path)!r} is too short: {e}") from None
    try:
        frames_uint8 = decode_frames(path, indices)
    except VideoTruncatedError as e:  # the container over-counted by a frame or two?
        shift = int(indices[-1]) + 1 - e.decoded  # slide the clip to end at the last frame
        if info.num_frames - e.decoded > FRAME_COUNT_SLACK or shift > indices[0]:
            raise
        frames_uint8 = decode_frames(path, indices - shift)
    return resize_clip(frames_uint8, resolution)


def load_clip(
    path: str | os.PathLike,
    *,
    frames: int,
    resolution: int,
    frame_stride: int = 1,
    fps: float = 0.0,
    mode: str = "center",
    flip_probability: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One clip of `path` as float32 ``(frames, resolution, resolution, 3)`` in [-1, 1].

    `read_clip`, then, with ``flip_probability`` > 0, flipped left-right when
    ``rng.random() < flip_probability`` (one draw per clip, after the offset's).

    Raises:
      VideoReadError: unreadable / truncated video; VideoTooShortError: too short.
    """
    clip = read_clip(
        path,
        frames=frames,
        resolution=resolution,
        frame_stride=frame_stride,
        fps=fps,
        mode=mode,
        rng=rng,
    )
    flip = flip_probability > 0 and rng is not None and rng.random() < flip_probability
    return clip_pixels(clip, flip)


def measure_decoding(source: Any, n: int, seed: int = 0) -> float:
    """Decoded clips per second (wall clock) of `n` loads, for benchmarks.

    `source`: a video source (``source.load(i % len(source), rng)`` is timed, with a fresh
    seeded Generator per clip) or any callable ``load(i)``, e.g. one that pulls a batch
    from a Grain iterator (then divide by the batch size for clips).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if callable(source):
        load = source
    else:

        def load(i: int) -> Any:
            return source.load(i % len(source), np.random.default_rng([seed, i]))

    begin = time.perf_counter()
    for i in range(n):
        load(i)
    return n / max(time.perf_counter() - begin, 1e-9)

"""Video data: PyAV decoding, clip sampling, the video folder / Kinetics sources, config.

The test videos (`video_files.write_video`, PyAV libx264, lossless in YUV): frame k has the gray
level ``LEVEL0 + STEP * k`` in its top half (so a decoded frame says which frame it is, up
to the RGB <-> YUV rounding) and a red left / blue right bottom half (so crops and flips
are visible).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
from video_files import HEIGHT, LEVEL0, STEP, WIDTH, write_video

from dfm_jax import data
from dfm_jax.data import common, video, video_folder


def frame_numbers(clip: np.ndarray) -> np.ndarray:
    """Which frame each of a uint8 or [-1, 1] clip's frames is (from the top rows' gray)."""
    clip = np.asarray(clip, np.float64)
    if clip.max() <= 1.0:
        clip = (clip + 1.0) * 127.5
    rows = clip.shape[1] * 3 // 8  # well inside the gray top half after a centre crop
    numbers = (clip[:, :rows].mean(axis=(1, 2, 3)) - LEVEL0) / STEP
    np.testing.assert_allclose(numbers, np.round(numbers), atol=0.3)  # codec loss << 1 step
    return np.round(numbers).astype(int)


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", 32, 30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/<class>/<video>.mp4: 2 classes x 3 videos of 24 frames (videos differ in length
    by a frame so that replacements are visible)."""
    root = tmp_path_factory.mktemp("folder")
    for label, name in enumerate(("beta", "alpha")):
        for i in range(3):
            write_video(root / name / f"v{i}.mp4", 20 + 2 * i + label, 30)
    return root


def test_probe_and_decode(clip_video):
    info = video.probe(clip_video)
    assert (info.num_frames, info.height, info.width) == (32, HEIGHT, WIDTH)
    assert info.fps == pytest.approx(30.0)
    frames, fps = video.read_video(clip_video)
    assert frames.shape == (32, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(30.0)
    np.testing.assert_array_equal(frame_numbers(frames), np.arange(32))
    window = video.decode_frames(clip_video, [9, 3, 3, 17])
    np.testing.assert_array_equal(frame_numbers(window), [9, 3, 3, 17])
    with pytest.raises(video.VideoReadError, match="truncated"):
        video.decode_frames(clip_video, [5, 32])
    cut = os.path.join(os.path.dirname(clip_video), "cut.mp4")
    with open(clip_video, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[: os.path.getsize(clip_video) // 2])
    with pytest.raises(video.VideoReadError):
        video.load_clip(cut, frames=2, resolution=16)


def test_clip_indices_and_stride():
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(200):
        indices = video.clip_indices(32, 4, 3, "random", rng)
        np.testing.assert_array_equal(np.diff(indices), 3)
        offsets.add(int(indices[0]))
    assert offsets == set(range(32 - 10 + 1))  # every offset 0..22, none beyond
    np.testing.assert_array_equal(video.clip_indices(32, 4, 3, "center"), [11, 14, 17, 20])
    np.testing.assert_array_equal(video.clip_indices(10, 4, 3, "center"), [0, 3, 6, 9])
    with pytest.raises(video.VideoTooShortError, match="needs 10"):
        video.clip_indices(9, 4, 3, "center")
    assert video.clip_stride(30.0, 5, 0.0) == 5
    assert video.clip_stride(30.0, 5, 10.0) == 3
    assert video.clip_stride(25.0, 1, 12.0) == 2
    assert video.clip_stride(30.0, 1, 8.0) == 4  # rounded, not floored
    assert video.clip_stride(24.0, 1, 60.0) == 1


def test_load_clip_takes_offset_plus_stride_frames(clip_video):
    kwargs = dict(frames=4, resolution=24)
    for seed in range(3):
        clip = video.load_clip(
            clip_video, frame_stride=2, mode="random", rng=np.random.default_rng(seed), **kwargs
        )
        want = video.clip_indices(32, 4, 2, "random", np.random.default_rng(seed))
        np.testing.assert_array_equal(frame_numbers(clip), want)
    center = video.load_clip(clip_video, frame_stride=2, **kwargs)
    np.testing.assert_array_equal(frame_numbers(center), 12 + 2 * np.arange(4))  # (32-7)//2
    by_fps = video.load_clip(clip_video, fps=10.0, **kwargs)  # 30 fps / 10 -> stride 3
    np.testing.assert_array_equal(frame_numbers(by_fps), 11 + 3 * np.arange(4))
    with pytest.raises(video.VideoTooShortError, match="too short"):
        video.load_clip(clip_video, frames=12, resolution=24, frame_stride=3)


class _LastOffset:
    """A stand-in Generator that always draws the largest offset (and never flips)."""

    def integers(self, low, high):
        return high - 1

    def random(self):
        return 1.0


def test_overstated_frame_count_slides_the_clip_back(clip_video, monkeypatch):
    real = video.probe(clip_video)  # 32 frames
    kwargs = dict(frames=4, resolution=16, frame_stride=10, mode="random", rng=_LastOffset())
    for claimed in (33, 34):  # last clip 3 + 10 i: frame 33 does not exist; slide back 2
        info = dataclasses.replace(real, num_frames=claimed)
        monkeypatch.setattr(video, "probe", lambda path, info=info: info)
        clip = video.load_clip(clip_video, **kwargs)
        np.testing.assert_array_equal(frame_numbers(clip), 31 - 10 * np.arange(4)[::-1])
    info = dataclasses.replace(real, num_frames=32 + video.FRAME_COUNT_SLACK + 1)
    monkeypatch.setattr(video, "probe", lambda path: info)
    with pytest.raises(video.VideoTruncatedError, match="truncated"):
        video.load_clip(clip_video, **kwargs)


def test_resize_crop_flip_and_range(clip_video):
    clip = video.load_clip(clip_video, frames=2, resolution=24)
    assert clip.shape == (2, 24, 24, 3) and clip.dtype == np.float32
    assert clip.min() >= -1.0 and clip.max() <= 1.0
    # 48x64 -> 24x32, centre 24 columns; bottom rows: columns 0..11 red, 12..23 blue.
    red, blue = clip[:, 14:, :, 0], clip[:, 14:, :, 2]
    assert (red[:, :, :10] > 0.5).all() and (blue[:, :, :10] < -0.5).all()
    assert (blue[:, :, 14:] > 0.5).all() and (red[:, :, 14:] < -0.5).all()
    np.testing.assert_array_equal(video.clip_pixels(np.zeros((1, 2, 2, 3), np.uint8)), -1.0)
    flipped = video.load_clip(
        clip_video, frames=2, resolution=24, flip_probability=1.0, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(flipped, clip[:, :, ::-1])


def _source(root, **kwargs):
    options = dict(frames=3, resolution=16, frame_stride=2, clip="random", random_flip=True)
    return data.VideoFolderSource(root, **{**options, **kwargs})


def test_folder_source_records_and_labels(folder):
    source = _source(folder)
    assert source.class_names == ("alpha", "beta") and source.num_classes == 2
    assert len(source) == 6 and source.example_shape == (3, 16, 16, 3)
    record = source[4]
    assert record["path"].endswith(os.path.join("beta", "v1.mp4")) and record["label"] == 1
    assert [type(op) for op in source.operations] == [data.DecodeClip]
    assert "VideoFolderSource(root=" in repr(source) and "0x" not in repr(source)
    center = _source(folder, clip="center")
    first, again = center.load(0), center.load(0)  # deterministic without an rng
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(frame_numbers(first["image"]), [8, 10, 12])  # 21 frames
    with pytest.raises(ValueError, match="rng"):
        source.load(0)
    copy = pickle.loads(pickle.dumps(center))  # Grain workers get pickled copies
    np.testing.assert_array_equal(copy.load(0)["image"], first["image"])
    assert copy.num_reads == 3 and data.measure_decoding(source, 2) > 0


def test_grain_batches_and_exact_resume(folder):
    source = _source(folder)

    def fresh(**kwargs):
        return data.make_train_iterator(
            source, global_batch_size=2, seed=5, process_index=0, process_count=1, **kwargs
        )

    it = fresh()
    batches = [next(it) for _ in range(4)]  # crosses an epoch (3 batches each)
    assert batches[0]["image"].shape == (2, 3, 16, 16, 3)
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    seen = np.concatenate([b["image"] for b in batches])
    flips = [bool((c[:, -1, 0, 0] < c[:, -1, -1, 0]).all()) for c in seen]  # red on the right?
    assert any(flips) and not all(flips), "random_flip should flip some clips, not all"
    state = it.get_state()
    json.dumps(state)
    expected = [next(it) for _ in range(3)]
    resumed = fresh()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_worker_process_decodes_the_same_batches(folder):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    source = _source(folder)
    kwargs = dict(global_batch_size=2, seed=5, process_index=0, process_count=1)
    want = [next(data.make_train_iterator(source, **kwargs))["image"]]
    it = data.make_train_iterator(source, worker_count=1, **kwargs)
    try:
        got = [next(it)["image"]]
    finally:
        it.close()
    np.testing.assert_array_equal(got[0], want[0])


def test_bad_videos_are_skipped_counted_and_limited(tmp_path, caplog):
    root = tmp_path / "bad"
    write_video(root / "a" / "0_good.mp4", 20)
    (root / "a" / "1_corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_video(root / "a" / "2_short.mp4", 4)  # 3 frames every 2 need 5
    write_video(root / "a" / "3_good.mp4", 24)
    source = _source(root, clip="center", random_flip=False)
    assert len(source) == 4
    with caplog.at_level(logging.WARNING):
        corrupt, short = source.load(1), source.load(2)  # both replaced by 3_good (24 frames)
        source.load(1)  # 1 -> 2 -> 3, 2 -> 3, 1 -> 2 -> 3: 8 reads, 5 bad, 3 of them short
    for name in ("1_corrupt.mp4", "2_short.mp4"):  # logged once per file
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    for example in (corrupt, short):
        np.testing.assert_array_equal(frame_numbers(example["image"]), [9, 11, 13])
    assert (source.num_reads, source.num_bad, source.num_too_short) == (8, 5, 3)
    assert sorted(os.path.basename(p) for p in source.bad_files) == ["1_corrupt.mp4", "2_short.mp4"]
    for index in (0, 3):
        assert source.load(index)["label"] == 0
    assert source.num_bad == 5  # good reads add none
    # 2 of every 3 reads fail: the limit fires at the first failure once 20 reads were made.
    limited = _source(root, clip="center", random_flip=False, max_bad_fraction=0.2)
    with pytest.raises(data.TooManyBadVideosError, match=r"too many bad videos under .*bad"):
        for _ in range(20):
            limited.load(1)
    assert limited.num_reads >= video_folder.MIN_READS_FOR_LIMIT
    with pytest.raises(data.TooManyBadVideosError, match=r"max_bad_fraction=0\.2"):
        limited.load(1)


def _kinetics_tree(root, with_csv=True):
    write_video(root / "train" / "air drumming" / "ytB_000010_000020.mp4", 12)
    write_video(root / "train" / "abseiling" / "ytA_000010_000020.mp4", 14)
    write_video(root / "val" / "abseiling" / "ytV_000000_000010.mp4", 12)
    if with_csv:
        (root / "annotations").mkdir()
        (root / "annotations" / "train.csv").write_text(
            "label,youtube_id,time_start,time_end,split\n"
            "air drumming,ytB,10,20,train\n"
            "abseiling,ytA,10,20,train\n"
            "zumba,ytMissing,0,10,train\n"
        )
        (root / "validate.csv").write_text(
            "label,youtube_id,time_start,time_end,split\nabseiling,ytV,0,10,validate\n"
        )


def test_kinetics_layout(tmp_path, caplog):
    _kinetics_tree(tmp_path)
    with caplog.at_level(logging.INFO):
        source = data.KineticsSource(tmp_path, "train", frames=2, resolution=16, clip="center")
    summary = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(summary) == 1 and "2 of 3 clips of train.csv found, 1 missing" in summary[0]
    assert source.class_names == ("abseiling", "air drumming", "zumba")
    assert source.num_missing == 1 and len(source) == 2
    labels = {os.path.basename(p): label for p, label in source.files}
    assert labels == {"ytB_000010_000020.mp4": 1, "ytA_000010_000020.mp4": 0}
    assert source.load(0)["image"].shape == (2, 16, 16, 3)
    for split in ("validate", "val"):
        val = data.KineticsSource(tmp_path, split, frames=2, resolution=16, clip="center")
        assert val.num_classes == 3 and val.files[0][1] == 0 and val.num_missing == 0


def test_kinetics_missing_data_names_the_fix(tmp_path):
    with pytest.raises(common.DataNotFoundError, match=r"Kinetics-700-2020.*kinetics-dataset"):
        data.KineticsSource(tmp_path / "nowhere", "train", frames=2, resolution=16)
    _kinetics_tree(tmp_path, with_csv=False)
    with pytest.raises(common.DataNotFoundError, match=r"annotations/train\.csv.*data\.dir"):
        data.KineticsSource(tmp_path, "train", frames=2, resolution=16)
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "validate.csv").write_text("label,youtube_id,time_start,time_end\n")
    with pytest.raises(common.DataNotFoundError, match=r"validate video folder.*cvdfoundation"):
        data.KineticsSource(tmp_path, "validate", frames=2, resolution=16)
    with pytest.raises(ValueError, match="split"):
        data.KineticsSource(tmp_path, "test", frames=2, resolution=16)


def test_config_and_factory(tmp_path, folder):
    from dfm_jax import config as config_lib

    _kinetics_tree(tmp_path)
    fields = dict(frame_stride=2, fps=0.0, clip="", random_flip=True, max_bad_fraction=0.1)
    base = {"source": "kinetics", "dir": str(tmp_path), "frames": 2, "resolution": 16}
    settings = config_lib.read({"data": {**base, **fields}}).data
    assert settings.frame_stride == 2 and settings.max_bad_fraction == 0.1
    source = data.make_source(settings)
    assert isinstance(source, data.KineticsSource) and source.clip == "random"
    assert source.frame_stride == 2 and source.random_flip and source.max_bad_fraction == 0.1
    val = data.make_source(config_lib.DataSettings(**{**settings.__dict__, "split": "validate"}))
    assert val.clip == "center"
    folder_settings = config_lib.DataSettings(
        source="video_folder", dir=str(folder), frames=3, resolution=16, clip="center"
    )
    assert isinstance(data.make_source(folder_settings), data.VideoFolderSource)
    for name, value in (("clip", "middle"), ("frame_stride", 0), ("fps", -1.0)):
        with pytest.raises(config_lib.ConfigError, match=rf"config\.data\.{name}:"):
            config_lib.read({"data": {name: value}})
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.max_bad_fraction:"):
        config_lib.read({"data": {"max_bad_fraction": 1.5}})
    no_frames = config_lib.DataSettings(source="video_folder", dir=str(folder), resolution=16)
    with pytest.raises(ValueError, match=r"data\.frames >= 1"):
        data.make_source(no_frames)

"""Tests of dataset preparation (dfm_jax.preparation, python -m dfm_jax.prepare)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import grain
import jax
import ml_dtypes
import numpy as np
import portpicker
import pytest
import tensorflow_datasets as tfds
import train_utils
from PIL import Image

from dfm_jax import config as config_lib
from dfm_jax.data import common, latents, record_format
from dfm_jax.models import autoencoder
from dfm_jax.preparation import run as prepare_run
from dfm_jax.preparation import runner, shards, stats
from dfm_jax.training import setup as setup_lib

RESOLUTION = 16
CLASSES = ("cat", "dog", "eel")
PYRAMIDS = ("laplacian_1", "laplacian_2", "laplacian_4", "laplacian_2x2", "haar_2")


# ----------------------------------------------------------------------------------------------
# Fixtures and independent references
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec():
    """The "tiny" autoencoder with random weights (numpy-initialised: quick to build)."""
    config = autoencoder.autoencoder_config("tiny")
    rng = np.random.default_rng(0)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32) + 0.1 * rng.standard_normal(leaf.shape)
        if "bias" in name:
            return 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, autoencoder.abstract_params(config))
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return autoencoder.Codec(config, params)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 5 readable images of random sizes, one corrupt file, one truncated JPEG.

    Returns (root, [(relative path, label) of the readable images in index order]).
    """
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    readable = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(5):
            h, w = rng.integers(14, 44, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
            readable.append((f"{name}/img{i}.png", label))
    (root / "cat" / "zz_corrupt.png").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "dog" / "img2b_truncated.jpg").write_bytes(buffer.getvalue()[:300])
    readable.sort(key=lambda item: (item[1], item[0]))
    return root, readable


def _options(out, data_dir, **overrides):
    defaults = dict(
        out=str(out),
        source="image_folder",
        data_dir=str(data_dir),
        resolution=RESOLUTION,
        autoencoder="tiny",
        images_per_shard=4,
        batch_size=8,
        pyramids=PYRAMIDS,
        workers=2,
        progress=False,
    )
    return runner.PrepareOptions(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, image_folder, codec):
    """One uninterrupted run with flips and moments; returns (out, PrepareResult)."""
    root, _ = image_folder
    out = tmp_path_factory.mktemp("prepared") / "latents"
    result = prepare_run(_options(out, root, flip=True), codec=codec)
    return out, result


def adm_center_crop(path, resolution):
    """guided-diffusion's `center_crop_arr`, written out independently of dfm_jax."""
    with Image.open(path) as image:
        pil_image = image.convert("RGB")
    while min(*pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = resolution / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - resolution) // 2
    crop_x = (arr.shape[1] - resolution) // 2
    return arr[crop_y : crop_y + resolution, crop_x : crop_x + resolution]


def _records(out):
    """Every record of every shard, decoded, in shard order."""
    source = grain.sources.ArrayRecordDataSource(latents.shard_paths(out))
    return [record_format.decode(source[i]) for i in range(len(source))]


def _resize_linear(x, size, axis):
    """Half-pixel linear resize without antialiasing along one axis (torch semantics)."""
    n = x.shape[axis]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).reshape([-1 if a == axis % x.ndim else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def _numpy_scales(x, kind, ratios):
    """Laplacian / Haar decomposition of (B, H, W, C) in float64 numpy, coarsest first."""

    def down(y, r):
        if kind == "haar":
            b, h, w, c = y.shape
            return y.reshape(b, h // r, r, w // r, r, c).mean(axis=(2, 4))
        return _resize_linear(_resize_linear(y, y.shape[1] // r, 1), y.shape[2] // r, 2)

    def up(y, r):
        if kind == "haar":
            return y.repeat(r, axis=1).repeat(r, axis=2)
        return _resize_linear(_resize_linear(y, y.shape[1] * r, 1), y.shape[2] * r, 2)

    lowpass = [x]
    for r in reversed(ratios):
        lowpass.insert(0, down(lowpass[0], r))
    return [lowpass[0]] + [f - up(c, r) for r, c, f in zip(ratios, lowpass, lowpass[1:])]


# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------


def test_plan_shards_and_ownership():
    plan = shards.plan_shards(10, images_per_shard=4)
    assert [(s.start, s.stop) for s in plan] == [(0, 3), (3, 6), (6, 10)]
    assert plan[0].name == "latents-00000-of-00003.array_record"
    plan = shards.plan_shards(7, num_shards=7)
    assert all(s.stop - s.start == 1 for s in plan)
    owners = [[s.index for s in plan if shards.owned_by(s, p, 3)] for p in range(3)]
    assert owners == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="num_shards must be in"):
        shards.plan_shards(3, num_shards=4)
    with pytest.raises(ValueError, match="exactly one"):
        shards.plan_shards(3, images_per_shard=1, num_shards=1)


def test_pyramid_names_match_the_config():
    for name in (*PYRAMIDS, "haar_2x2", "haar_1"):
        p = stats.pyramid_from_name(name)
        kind, _, ratios = name.partition("_")
        ratios = () if ratios == "1" else tuple(int(r) for r in ratios.split("x"))
        settings = config_lib.PyramidSettings(kind=kind, ratios=ratios)
        assert settings.name == name
        assert p == setup_lib.build_decomposition(settings, stds=None)
    for bad in ("laplacian", "dct_2", "laplacian_2x", "haar_4", "laplacian_02"):
        with pytest.raises(ValueError):
            stats.pyramid_from_name(bad)
    with pytest.raises(ValueError, match="does not fit"):
        stats.parse_pyramids(["laplacian_4x4"], (8, 8, 4))


def test_running_moments_merge_in_float64():
    rng = np.random.default_rng(0)
    blocks = [rng.normal(3.0, 0.5, size=n) for n in (1, 7, 1000, 3)]
    running = stats.RunningMoments()
    for block in blocks:
        running.add(len(block), block.mean(), ((block - block.mean()) ** 2).sum())
    np.testing.assert_allclose(running.std, np.concatenate(blocks).std(), rtol=1e-12)
    indices = stats.sample_indices(100, 10, seed=3)
    assert len(set(indices)) == 10 and np.all(np.diff(indices) > 0)
    np.testing.assert_array_equal(indices, stats.sample_indices(100, 10, seed=3))
    np.testing.assert_array_equal(stats.sample_indices(5, 10, seed=3), np.arange(5))


# ----------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------


def test_records_are_the_encoded_crops_and_their_flips(prepared, image_folder, codec):
    out, result = prepared
    root, readable = image_folder
    records = _records(out)
    assert len(records) == 2 * len(readable) == 30
    assert result.records_written == 30 and result.skipped_images == 2
    assert result.shards_written == result.num_shards == 5  # 17 files, 4 per shard
    assert result.summary().startswith("prepare: 30 records in 5 new shards")
    assert "2 unreadable images skipped" in result.summary() and result.images_per_second > 0
    assert [r["key"] for r in records[::2]] == [key for key, _ in readable]
    assert [int(r["label"]) for r in records] == [label for _, label in readable for _ in "ab"]
    assert [bool(r["flip"]) for r in records] == [False, True] * len(readable)

    crops = np.stack([adm_center_crop(root / key, RESOLUTION) for key, _ in readable])
    pixels = crops.astype(np.float32) / 127.5 - 1.0
    mean, std = codec.encode_moments(pixels)
    mean_flip, std_flip = codec.encode_moments(pixels[:, :, ::-1])
    got_mean = np.stack([r["mean"] for r in records])
    got_std = np.stack([r["std"] for r in records])
    assert got_mean.dtype == np.float32 and got_mean.shape == (30, 8, 8, 4)
    np.testing.assert_allclose(got_mean[0::2], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_std[0::2], std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_mean[1::2], mean_flip, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_std[1::2], std_flip, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_mean[0::2], got_mean[1::2], atol=1e-3)  # flips differ


def test_metadata_counts_provenance_and_scale_stds(prepared, codec):
    out, result = prepared
    metadata = latents.read_metadata(out)
    assert metadata == result.metadata
    assert metadata.num_examples == 30 and metadata.num_classes == 3
    assert metadata.latent_shape == (8, 8, 4) and metadata.dtype == "float32"
    assert metadata.moments and metadata.autoencoder == "tiny"
    assert metadata.scaling_factor == codec.config.scaling_factor
    assert metadata.shift_factor == codec.config.shift_factor
    extra = metadata.extra
    assert extra["class_names"] == list(CLASSES)
    assert extra["skipped_images"] == 2
    assert sorted(extra["skipped_keys"]) == ["cat/zz_corrupt.png", "dog/img2b_truncated.jpg"]
    assert extra["flip"] is True and extra["resolution"] == RESOLUTION
    assert extra["source"]["source"] == "image_folder" and extra["source"]["num_files"] == 17
    assert extra["scale_stds_measured_on"]["records"] == 30

    # Independent: model-space posterior means, numpy decompositions, float64 stds.
    records = _records(out)
    z = np.stack([r["mean"] for r in records]).astype(np.float64)
    z = (z - codec.config.shift_factor) * codec.config.scaling_factor
    assert sorted(metadata.scale_stds) == sorted(PYRAMIDS)
    for name in PYRAMIDS:
        kind, _, ratio_text = name.partition("_")
        ratios = () if ratio_text == "1" else tuple(int(r) for r in ratio_text.split("x"))
        expected = [s.std() for s in _numpy_scales(z, kind, ratios)]
        assert len(metadata.scale_stds[name]) == len(ratios) + 1
        np.testing.assert_allclose(metadata.scale_stds[name], expected, rtol=2e-5, err_msg=name)


def test_reader_returns_model_space_latents(prepared, codec):
    out, _ = prepared
    records = _records(out)
    source = latents.ArrayRecordLatentSource(out, latent_sample=False)
    assert len(source) == 30
    cfg = codec.config
    for i in (0, 7, 29):
        example = source[i]
        expected = (records[i]["mean"] - np.float32(cfg.shift_factor)) * np.float32(
            cfg.scaling_factor
        )
        np.testing.assert_array_equal(example["image"], expected)
        assert example["label"] == records[i]["label"]
    assert source.scale_stds("laplacian_2") == tuple(source.metadata.scale_stds["laplacian_2"])


def test_resume_after_a_crash_keeps_finished_shards(
    prepared, image_folder, codec, tmp_path, monkeypatch
):
    reference, _ = prepared
    root, _ = image_folder
    out = tmp_path / "resumed"
    original = latents.write_shard
    calls = []

    def crash_after_two(path, examples):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(os.path.basename(path))
        return original(path, examples)

    monkeypatch.setattr(latents, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_run(_options(out, root, flip=True), codec=codec)
    assert sorted(os.listdir(out)) == [calls[0], calls[1], "prepare_state"]  # no metadata yet
    finished = {name: os.stat(out / name).st_mtime_ns for name in calls}
    stale = out / "latents-00004-of-00005.array_record.tmp-1-dead"
    stale.write_bytes(b"partial")

    calls.clear()
    monkeypatch.setattr(latents, "write_shard", lambda p, e: calls.append(p) or original(p, e))
    result = prepare_run(_options(out, root, flip=True), codec=codec)
    assert len(calls) == 3 and result.shards_written == 3 and result.shards_kept == 2
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == finished
    assert not stale.exists()
    assert result.metadata.num_examples == 30 and result.metadata.extra["skipped_images"] == 2

    for got, want in zip(_records(out), _records(reference), strict=True):
        assert (got["key"], got["label"], got["flip"]) == (want["key"], want["label"], want["flip"])
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6, atol=1e-6)
    got_stds = latents.read_metadata(out).scale_stds
    want_stds = latents.read_metadata(reference).scale_stds
    for name in PYRAMIDS:
        np.testing.assert_allclose(got_stds[name], want_stds[name], rtol=1e-5)

    # A shard deleted after the fact is rewritten, and only that one.
    os.remove(out / "latents-00001-of-00005.array_record")
    calls.clear()
    result = prepare_run(_options(out, root, flip=True), codec=codec)
    assert [os.path.basename(p) for p in calls] == ["latents-00001-of-00005.array_record"]
    assert result.shards_kept == 4 and result.metadata.num_examples == 30


def test_output_of_another_preparation_is_refused(prepared, image_folder, codec, tmp_path):
    reference, _ = prepared
    root, _ = image_folder
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    with pytest.raises(FileExistsError, match="resolution: 16 -> 8"):
        prepare_run(_options(out, root, flip=True, resolution=8), codec=codec)
    with pytest.raises(FileExistsError, match="flip: True -> False"):
        prepare_run(_options(out, root), codec=codec)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    latents.write_metadata(foreign, latents.LatentMetadata((4, 4, 4), "float32", 10, 0))
    with pytest.raises(FileExistsError, match=r"metadata\.json"):
        prepare_run(_options(foreign, root), codec=codec)

    result = prepare_run(
        _options(out, root, resolution=8, max_examples=6, overwrite=True), codec=codec
    )
    assert result.metadata.latent_shape == (4, 4, 4) and result.metadata.num_examples == 5
    assert len(latents.shard_paths(out)) == 2  # the 5 old shards are gone


def test_sample_store_bfloat16_and_more_pyramids_on_rerun(image_folder, codec, tmp_path):
    root, readable = image_folder
    out = tmp_path / "sampled"
    options = _options(
        out, root, store="sample", dtype="bfloat16", max_examples=5, num_shards=2, seed=7,
        images_per_shard=None, pyramids=("laplacian_2",), stats_examples=3,
    )  # fmt: skip
    result = prepare_run(options, codec=codec)
    metadata = result.metadata
    assert not metadata.moments and metadata.dtype == "bfloat16"
    assert metadata.num_examples == 5 and metadata.extra["scale_stds_measured_on"]["records"] == 3
    records = _records(out)
    assert all(r["latent"].dtype == ml_dtypes.bfloat16 for r in records)
    crops = np.stack([adm_center_crop(root / key, RESOLUTION) for key, _ in readable[:5]])
    mean, std = codec.encode_moments(crops.astype(np.float32) / 127.5 - 1.0)
    key = jax.random.key(7)
    for i in range(5):  # record id = image index (no flips)
        eps = jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:], np.float32)
        expected = np.asarray(mean[i] + std[i] * eps)
        got = records[i]["latent"].astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)
    assert not np.allclose(records[0]["latent"].astype(np.float32), mean[0], atol=1e-3)

    more = dataclasses.replace(options, pyramids=("laplacian_2", "haar_2"))
    rerun = prepare_run(more, codec=codec)
    assert rerun.shards_written == 0 and rerun.shards_kept == 2
    assert rerun.summary().startswith("prepare: nothing to encode (2 shards finished earlier")
    assert sorted(rerun.metadata.scale_stds) == ["haar_2", "laplacian_2"]
    assert rerun.metadata.scale_stds["laplacian_2"] == metadata.scale_stds["laplacian_2"]


def test_tfds_imagenet_source(codec, tmp_path):
    out = tmp_path / "tfds"
    with tfds.testing.mock_data(num_examples=6):
        ds = tfds.data_source("imagenet2012", split="train")
        images = [ds[i]["image"] for i in range(6)]
        labels = [int(ds[i]["label"]) for i in range(6)]
        names = [ds[i]["file_name"] for i in range(6)]
        result = prepare_run(
            _options(out, "", source="tfds", tfds_name="imagenet2012", split="train", num_shards=2,
                     images_per_shard=None),
            codec=codec,
        )  # fmt: skip
    metadata = result.metadata
    assert metadata.num_examples == 6 and metadata.num_classes == 1000
    assert metadata.extra["class_names"][0] == "n01440764"
    records = _records(out)
    assert [int(r["label"]) for r in records] == labels
    assert [r["key"] for r in records] == [n.decode() if isinstance(n, bytes) else n for n in names]
    crop = common.center_crop_resize(Image.fromarray(images[3]).convert("RGB"), RESOLUTION)
    mean, _ = codec.encode_moments(np.asarray(crop, np.float32)[None] / 127.5 - 1.0)
    np.testing.assert_allclose(records[3]["mean"], mean[0], rtol=1e-5, atol=1e-5)


def test_clear_errors(image_folder, codec, tmp_path):
    root, _ = image_folder
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        prepare_run(_options(tmp_path / "a", root, resolution=15), codec=codec)
    with pytest.raises(common.DataNotFoundError, match="does not exist"):
        prepare_run(_options(tmp_path / "b", tmp_path / "missing"), codec=codec)
    with pytest.raises(ValueError, match="bad pyramid name"):
        prepare_run(_options(tmp_path / "c", root, pyramids=("dct_2",)), codec=codec)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        prepare_run(_options(tmp_path / "d", root, batch_size=12), codec=codec)
    with pytest.raises(ValueError, match="--store"):
        _options(tmp_path / "e", root, store="latent")
    with pytest.raises(ValueError, match="not both"):
        _options(tmp_path / "e", root, num_shards=2)
    with pytest.raises(FileNotFoundError, match="needs weights: --autoencoder_weights"):
        prepare_run(_options(tmp_path / "f", root, autoencoder="sd-vae-ft-ema", resolution=64))


def test_a_broken_source_stops_the_run(codec, tmp_path):
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for i in range(runner.MAX_CONSECUTIVE_FAILURES):
        (root / "a" / f"{i:03d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(RuntimeError, match="consecutive images are unreadable"):
        prepare_run(_options(tmp_path / "out", root), codec=codec)
    with pytest.raises(RuntimeError, match="none of the 3 images could be read"):
        prepare_run(_options(tmp_path / "out3", root, max_examples=3), codec=codec)


def test_cli_flags_reach_the_library(prepared, image_folder, tmp_path):
    """`python -m dfm_jax.prepare` refuses a directory holding another preparation at once."""
    reference, _ = prepared
    root, _ = image_folder
    out = tmp_path / "cli"
    shutil.copytree(reference, out)
    argv = [
        sys.executable, "-m", "dfm_jax.prepare", f"--out={out}", f"--data_dir={root}",
        "--autoencoder=tiny", "--resolution=16", "--images_per_shard=4", "--noflip",
        "--progress=false",
    ]  # fmt: skip
    completed = subprocess.run(
        argv, env=train_utils.subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "flip: True -> False" in completed.stderr
    plan = json.loads((out / "prepare_state" / "plan.json").read_text())
    assert plan["flip"] is True


def test_two_processes_write_their_own_shards(prepared, image_folder, tmp_path):
    """Two local processes (4 CPU devices each): process p writes shards p, p + 2, ...;
    process 0 writes the metadata once both are done."""
    reference, _ = prepared
    root, _ = image_folder
    out = tmp_path / "two"
    port = portpicker.pick_unused_port()
    argv = [
        sys.executable, "-m", "dfm_jax.prepare", f"--out={out}", f"--data_dir={root}",
        "--autoencoder=tiny", "--resolution=16", "--images_per_shard=4", "--flip",
        "--batch_size=8", "--noprogress",
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            argv,
            env=train_utils.subprocess_env(
                num_devices=4,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(index),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(logs)[-4000:]
    assert "this process: 3 shards" in logs[0] and "this process: 2 shards" in logs[1]
    assert "; dataset" in logs[0] and "; dataset" not in logs[1]  # metadata: process 0 only
    got, want = _records(out), _records(reference)
    assert [(r["key"], r["label"], r["flip"]) for r in got] == [
        (r["key"], r["label"], r["flip"]) for r in want
    ]
    metadata = latents.read_metadata(out)
    assert metadata.num_examples == 30 and metadata.extra["skipped_images"] == 2
    assert sorted(metadata.scale_stds) == sorted(runner.stats.DEFAULT_PYRAMIDS)


def test_options_from_flags_maps_every_flag_to_its_field():
    """Each flag set to a distinct non-default value lands in the field of the same name."""
    from absl import flags
    from absl.testing import flagsaver

    from dfm_jax import prepare

    values = {
        "out": "/tmp/out",
        "source": "kinetics",
        "data_dir": "/data",
        "tfds_name": "cifar10",
        "split": "validation",
        "image_key": "img",
        "label_key": "cls",
        "resolution": 64,
        "frames": 9,
        "frame_stride": 3,
        "fps": 7.5,
        "autoencoder": "tiny",
        "autoencoder_weights": "/w.safetensors",
        "autoencoder_dtype": "bfloat16",
        "flip": True,
        "store": "sample",
        "dtype": "float16",
        "num_shards": 3,  # (images_per_shard: the one of the two not given)
        "batch_size": 5,
        "pyramids": ["haar_2"],
        "stats_examples": 11,
        "max_examples": 13,
        "seed": 17,
        "workers": 2,
        "overwrite": True,
        "progress": False,
    }
    argv = ["prepare"]
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no'}{name}")
        else:
            argv.append(f"--{name}={','.join(value) if isinstance(value, list) else value}")
    was_parsed = flags.FLAGS.is_parsed()
    with flagsaver.flagsaver():
        flags.FLAGS(argv)
        options = prepare.options_from_flags()
    if not was_parsed:
        flags.FLAGS.unparse_flags()
    expected = {**values, "pyramids": ("haar_2",), "images_per_shard": None}
    fields = dataclasses.asdict(options)
    assert set(fields) == set(expected)
    for name, value in expected.items():
        assert fields[name] == value, name

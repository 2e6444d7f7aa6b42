"""Tests of dfm_jax.data: sources, serialisation, pipelines and global batches."""

import dataclasses
import gzip
import io
import json
import logging
import os
import struct

import grain
import jax
import ml_dtypes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from jax.sharding import PartitionSpec
from PIL import Image

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.data import fashion_mnist, record_format

# ----------------------------------------------------------------------------- helpers


def _make_source(fields: dict) -> data.Source:
    """``data.make_source`` of the data settings with ``fields`` (the rest default)."""
    return data.make_source(config_lib.DataSettings(**fields))


def _idx_bytes(array, type_code=0x08):
    """Reference IDX encoder written from the format description (independent of write_idx)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes()


def _write(path, payload, gz):
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)


def _fake_fashion_mnist(directory, n=6, split="train", gz=True):
    prefix = {"train": "train", "test": "t10k"}[split]
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), _idx_bytes(images), gz)
    _write(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), _idx_bytes(labels), gz)
    return images, labels


class IndexSource(data.Source):
    """Example i has label i: lets tests see exactly which records a pipeline read."""

    num_classes = 1
    example_shape = (1, 1, 1)

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return data.common.make_example(np.full((1, 1, 1), index, np.float32), index)

    def __repr__(self):
        return f"IndexSource({self.n})"


def _labels(iterator, num_batches):
    return np.stack([next(iterator)["label"] for _ in range(num_batches)])


def _all_labels(dataset):
    return np.concatenate([b["label"] for b in dataset])


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gzip_and_plain(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5)).astype(np.uint8)
    _write(tmp_path / "x", _idx_bytes(images), gz)
    out = data.read_idx(tmp_path / "x", expected_ndim=3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    ints = np.array([-5, 7, 1 << 20], np.int32)
    _write(tmp_path / "y", _idx_bytes(ints, 0x0C), gz)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "y"), ints)


def test_write_idx_round_trip(tmp_path):
    for dtype in (np.uint8, np.int16, np.float32):
        array = (np.arange(24) - 3).astype(dtype).reshape(2, 3, 4)
        data.write_idx(tmp_path / "a.gz", array)
        assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
        out = data.read_idx(tmp_path / "a.gz")
        assert out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_read_idx_errors(tmp_path):
    good = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    with pytest.raises(data.IdxFormatError, match="magic"):
        data.read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(data.IdxFormatError, match=r"17 bytes.*needs 18"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(data.IdxFormatError, match="19 bytes"):
        data.read_idx(tmp_path / "long")
    (tmp_path / "ndim").write_bytes(good)
    with pytest.raises(data.IdxFormatError, match="3 dimensions, expected 1"):
        data.read_idx(tmp_path / "ndim", expected_ndim=1)
    (tmp_path / "gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(data.IdxFormatError, match="gzip"):
        data.read_idx(tmp_path / "gz")


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    images, labels = _fake_fashion_mnist(tmp_path, n=6, split="test", gz=gz)
    source = data.FashionMnistSource(tmp_path, split="test")
    assert len(source) == 6 and source.num_classes == 10
    assert source.example_shape == (28, 28, 1)
    ex = source[4]
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (28, 28, 1)
    assert ex["label"].dtype == np.int32 and ex["label"].shape == () and ex["label"] == labels[4]
    np.testing.assert_allclose(ex["image"][..., 0], images[4] / 127.5 - 1.0, atol=1e-6)


def test_fashion_mnist_padding_to_32(tmp_path):
    images, _ = _fake_fashion_mnist(tmp_path, n=3)
    source = _make_source({"source": "fashion_mnist", "dir": str(tmp_path), "resolution": 32})
    image = source[1]["image"]
    assert image.shape == (32, 32, 1) == source.example_shape
    np.testing.assert_allclose(image[2:30, 2:30, 0], images[1] / 127.5 - 1.0, atol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(image[..., 0][border] == -1.0)
    with pytest.raises(ValueError, match=">= 28"):
        data.FashionMnistSource(tmp_path, resolution=24)


def test_fashion_mnist_validates_files(tmp_path):
    _fake_fashion_mnist(tmp_path, n=4)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(5, np.uint8)), True)
    with pytest.raises(data.IdxFormatError, match=r"4 images but .* 5 labels"):
        data.FashionMnistSource(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.full(4, 10, np.uint8)), True)
    with pytest.raises(data.IdxFormatError, match=r"0\.\.9"):
        data.FashionMnistSource(tmp_path)


def test_fashion_mnist_missing_names_paths_and_fix(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        _make_source({"source": "fashion_mnist", "dir": str(tmp_path / "nope")})
    message = str(info.value)
    assert str(tmp_path / "nope") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--config.data.dir" in message and "download" in message
    assert isinstance(info.value, ValueError)


def test_fashion_mnist_download_falls_back_to_tfds(tmp_path):
    with tfds.testing.mock_data(num_examples=5):
        source = data.FashionMnistSource(tmp_path, resolution=32, download=True)
        assert source.origin == "tfds:fashion_mnist" and len(source) == 5
        ex = source[2]
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.float32
    assert np.all(ex["image"][0] == -1.0) and ex["image"].max() <= 1.0
    assert 0 <= ex["label"] < 10


@pytest.mark.skipif(
    fashion_mnist.idx_files(fashion_mnist.DEBIAN_DIR, "train") is None,
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_files():
    train = _make_source({"source": "fashion_mnist", "resolution": 32})
    assert len(train) == 60000 and train.origin == fashion_mnist.DEBIAN_DIR
    labels = train._labels
    assert labels.min() == 0 and labels.max() == 9
    assert np.all(np.bincount(labels) == 6000)
    ex = train[0]
    assert ex["image"].shape == (32, 32, 1)
    assert ex["image"].min() == -1.0 and ex["image"].max() == 1.0
    assert len(data.FashionMnistSource(split="test")) == 10000


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_structured():
    a = data.SyntheticSource(num_examples=20, resolution=16, channels=3, num_classes=4)
    b = data.SyntheticSource(num_examples=20, resolution=16, channels=3, num_classes=4)
    other = data.SyntheticSource(num_examples=20, resolution=16, num_classes=4, seed=1)
    for i in (0, 7, 19):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == i % 4
        assert not np.allclose(a[i]["image"], other[i]["image"])
    images = np.stack([a[i]["image"] for i in range(20)])
    assert images.dtype == np.float32 and images.shape == (20, 16, 16, 3)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.2
    assert not np.allclose(a[0]["image"], a[4]["image"])  # same class, different example
    with pytest.raises(IndexError):
        a[20]


def test_synthetic_video_and_config():
    source = _make_source(
        {
            "source": "synthetic",
            "resolution": 8,
            "channels": 16,
            "num_classes": 3,
            "frames": 5,
            "num_examples": 7,
        }
    )
    assert source.example_shape == (5, 8, 8, 16) and len(source) == 7 and source.num_classes == 3
    video = source[1]["image"]
    assert video.shape == (5, 8, 8, 16)
    assert not np.allclose(video[0], video[1])  # frames move
    with pytest.raises(ValueError, match="num_classes"):
        data.SyntheticSource(num_classes=0)


# ----------------------------------------------------------------------------- image folder


def _save(path, array, fmt):
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_labels_crop_and_corrupt_files(tmp_path, caplog):
    root = tmp_path / "train"
    for name in ("zebra", "apple", "mango"):
        (root / name).mkdir(parents=True)
    # 64 wide x 32 high: red outer quarters, blue centre half -> the centre crop is blue.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = wide[:, 48:] = (255, 0, 0)
    wide[:, 16:48] = (0, 0, 255)
    _save(root / "apple" / "b.png", wide, "PNG")
    _save(root / "apple" / "a.jpg", np.full((20, 20, 3), 200, np.uint8), "JPEG")
    _save(root / "mango" / "gray.png", np.full((40, 40), 10, np.uint8), "PNG")
    _save(root / "zebra" / "z.bmp", np.full((16, 16, 3), 0, np.uint8), "BMP")
    (root / "zebra" / "corrupt.png").write_bytes(b"this is not a png" * 10)
    (root / "mango" / "empty.jpg").write_bytes(b"")
    (root / "mango" / "notes.txt").write_text("ignored: not an image extension")

    with caplog.at_level(logging.WARNING):
        source = _make_source(
            {"source": "image_folder", "dir": str(tmp_path), "split": "train", "resolution": 16}
        )
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 2 of 6" in warnings[0].getMessage()
    assert source.num_skipped == 2
    assert sorted(os.path.basename(p) for p in source.skipped_files) == ["corrupt.png", "empty.jpg"]
    assert source.class_names == ["apple", "mango", "zebra"] and source.num_classes == 3
    assert [(os.path.basename(p), label) for p, label in source.files] == [
        ("a.jpg", 0),
        ("b.png", 0),
        ("gray.png", 1),
        ("z.bmp", 2),
    ]
    examples = [source[i] for i in range(len(source))]
    assert [int(e["label"]) for e in examples] == [0, 0, 1, 2]
    for e in examples:
        assert e["image"].shape == (16, 16, 3) and e["image"].dtype == np.float32
    np.testing.assert_allclose(
        examples[1]["image"], np.broadcast_to([-1, -1, 1], (16, 16, 3)), atol=0.02
    )
    np.testing.assert_allclose(examples[2]["image"], 10 / 127.5 - 1, atol=1e-6)  # gray -> RGB


def test_image_folder_truncated_file_is_replaced_at_read_time(tmp_path, caplog):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    (tmp_path / "a" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _save(tmp_path / "b" / "ok.png", np.full((8, 8, 3), 255, np.uint8), "PNG")
    source = data.ImageFolderSource(tmp_path, resolution=8)
    assert len(source) == 2 and source.num_skipped == 0  # header is fine
    with caplog.at_level(logging.WARNING):
        first, again = source[0], source[0]
    assert first["label"] == 1 and np.all(first["image"] == 1.0)  # the next readable image
    np.testing.assert_array_equal(first["image"], again["image"])
    assert source.num_read_failures == 2
    assert sum("cannot decode" in r.getMessage() for r in caplog.records) == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="does not exist"):
        data.ImageFolderSource(tmp_path / "missing", resolution=8)
    with pytest.raises(data.DataNotFoundError, match="no class subfolders"):
        data.ImageFolderSource(tmp_path, resolution=8)
    with pytest.raises(data.DataNotFoundError, match=r"--config.data.dir"):
        _make_source({"source": "image_folder", "resolution": 8})


# ----------------------------------------------------------------------------- TFDS


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        cifar = _make_source(
            {
                "source": "tfds",
                "dir": "",
                "tfds_name": "cifar10",
                "split": "train",
                "num_classes": 10,
            }
        )
        assert len(cifar) == 12 and cifar.num_classes == 10 and cifar.example_shape == (32, 32, 3)
        ex = cifar[3]
        small = data.TfdsSource("cifar10", resolution=16)[3]
        mnist = data.TfdsSource("mnist", split="test", resolution=32, channels=3)
        m = mnist[0]
        batch = next(
            data.make_train_iterator(
                cifar, global_batch_size=4, seed=0, process_count=1, process_index=0
            )
        )
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
    assert ex["image"].min() >= -1.0 and ex["image"].max() <= 1.0
    assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < 10
    assert small["image"].shape == (16, 16, 3)
    assert mnist.example_shape == (32, 32, 3) and m["image"].shape == (32, 32, 3)
    assert np.all(m["image"][:2] == -1.0)  # 28 -> 32 padding
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4,)


def test_tfds_errors():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="no image feature 'img'"):
            data.TfdsSource("cifar10", image_key="img")
        with pytest.raises(ValueError, match="has 10 classes"):
            _make_source({"source": "tfds", "tfds_name": "cifar10", "num_classes": 100})
        unconditional = data.TfdsSource("cifar10", label_key="")
        assert unconditional.num_classes == 1 and unconditional[0]["label"] == 0
    with pytest.raises(ValueError, match="tfds_name"):
        _make_source({"source": "tfds"})


# ----------------------------------------------------------------------------- latents


def _latent_examples(n, shape, dtype, moments, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ex = {"label": i % 3, "key": f"img{i}.jpg"}
        if moments:
            ex["mean"] = rng.normal(size=shape).astype(dtype)
            ex["std"] = rng.uniform(0.1, 0.5, size=shape).astype(dtype)
        else:
            ex["latent"] = rng.normal(size=shape).astype(dtype)
        out.append(ex)
    return out


def _write_latents(directory, examples, shape, dtype, moments, **meta):
    directory.mkdir(parents=True, exist_ok=True)
    half = len(examples) // 2
    assert data.write_shard(directory / data.shard_filename(0, 2), examples[:half]) == half
    data.write_shard(directory / data.shard_filename(1, 2), examples[half:])
    metadata = data.LatentMetadata(
        latent_shape=shape,
        dtype=dtype,
        num_classes=3,
        num_examples=len(examples),
        autoencoder="test-ae",
        moments=moments,
        **meta,
    )
    data.write_metadata(directory, metadata)
    return metadata


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_latent_array_record_round_trip(tmp_path, dtype):
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    shape = (4, 4, 3)
    examples = _latent_examples(10, shape, np_dtype, moments=False)
    metadata = _write_latents(
        tmp_path / "train",
        examples,
        shape,
        dtype,
        False,
        scaling_factor=0.5,
        shift_factor=0.25,
        scale_stds={"laplacian-2-4": [1.5, [0.5, 0.6, 0.7]]},
        extra={"resolution": 32},
    )
    assert sorted(os.listdir(tmp_path / "train")) == [
        "latents-00000-of-00002.array_record",
        "latents-00001-of-00002.array_record",
        "metadata.json",
    ]  # no temp files left behind
    source = _make_source(
        {"source": "array_record", "dir": str(tmp_path), "split": "train", "num_classes": 3}
    )
    assert source.metadata == metadata == data.read_metadata(tmp_path / "train")
    assert source.scale_stds("laplacian-2-4") == (1.5, [0.5, 0.6, 0.7])
    assert source.scale_stds("haar-2") is None
    assert len(source) == 10 and source.example_shape == shape and source.num_classes == 3
    assert source.operations == ()
    for i in (0, 4, 9):
        ex = source[i]
        expected = (examples[i]["latent"].astype(np.float32) - 0.25) * 0.5
        np.testing.assert_array_equal(ex["image"], expected)
        assert ex["image"].dtype == np.float32 and ex["label"] == i % 3


def test_latent_moments_sampling(tmp_path):
    shape = (2, 4, 4, 2)  # video latents (T, H, W, C)
    examples = _latent_examples(8, shape, np.float32, moments=True)
    _write_latents(tmp_path, examples, shape, "float32", True, scaling_factor=2.0)
    mean_only = data.ArrayRecordLatentSource(tmp_path, latent_sample=False)
    np.testing.assert_allclose(mean_only[3]["image"], examples[3]["mean"] * 2.0)
    source = data.ArrayRecordLatentSource(tmp_path)
    assert isinstance(source.operations[0], data.SampleLatent)
    raw = source[3]
    np.testing.assert_allclose(raw["std"], examples[3]["std"] * 2.0)

    def draws(seed):
        it = data.make_train_iterator(
            source, global_batch_size=8, seed=seed, shuffle=False, process_index=0, process_count=1
        )
        return [next(it) for _ in range(2)]

    first, again, other = draws(0), draws(0), draws(1)
    batch = first[0]
    assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
    means = np.stack([e["mean"] * 2.0 for e in examples])
    stds = np.stack([e["std"] * 2.0 for e in examples])
    eps = (batch["image"] - means) / stds
    assert abs(eps.mean()) < 0.15 and 0.85 < eps.std() < 1.15  # a standard normal draw
    np.testing.assert_array_equal(batch["image"], again[0]["image"])  # seeded
    assert not np.allclose(batch["image"], other[0]["image"])  # seed matters
    assert not np.allclose(batch["image"], first[1]["image"])  # fresh draw each epoch


def test_latent_writer_and_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="either 'latent' or both"):
        data.write_shard(tmp_path / "x.array_record", [{"label": 0}])
    with pytest.raises(ValueError, match="dtype"):
        data.write_shard(
            tmp_path / "x.array_record", [{"latent": np.zeros((2, 2, 1), np.int32), "label": 0}]
        )
    assert os.listdir(tmp_path) == []  # failed writes leave nothing
    with pytest.raises(data.DataNotFoundError, match=r"metadata.json.*dfm_jax.prepare"):
        _make_source({"source": "array_record", "dir": str(tmp_path)})
    _write_latents(
        tmp_path / "d",
        _latent_examples(4, (2, 2, 1), np.float32, False),
        (2, 2, 1),
        "float32",
        False,
    )
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    meta["num_examples"] = 5
    (tmp_path / "d" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"hold 4 records.*says 5"):
        data.ArrayRecordLatentSource(tmp_path / "d")
    meta["num_examples"], meta["latent_shape"] = 4, [3, 3, 1]
    (tmp_path / "d" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(data.RecordFormatError, match=r"shape \(2, 2, 1\), metadata says"):
        data.ArrayRecordLatentSource(tmp_path / "d")[0]
    with pytest.raises(ValueError, match="latent dtype"):
        data.LatentMetadata(latent_shape=(2, 2, 1), dtype="int8", num_classes=1, num_examples=0)


def test_record_format_round_trip_and_errors():
    example = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.arange(4).astype(ml_dtypes.bfloat16),
        "big_endian": np.arange(3, dtype=">i4"),
        "label": np.int32(7),
        "name": "héllo",
    }
    record = record_format.encode(example)
    assert record[:4] == b"DFMR" and b"pickle" not in record
    out = record_format.decode(record)
    assert set(out) == set(example) and out["name"] == "héllo"
    for key in ("a", "b", "big_endian", "label"):
        np.testing.assert_array_equal(out[key], example[key])
    assert out["b"].dtype == ml_dtypes.bfloat16 and out["big_endian"].dtype == np.int32
    with pytest.raises(record_format.RecordFormatError, match="magic"):
        record_format.decode(b"XXXX" + record[4:])
    with pytest.raises(record_format.RecordFormatError, match="past the end"):
        record_format.decode(record[:-3])
    with pytest.raises(record_format.RecordFormatError, match="trailing"):
        record_format.decode(record + b"\x00")
    with pytest.raises(TypeError, match="cannot hold"):
        record_format.encode({"o": np.array([object()])})


# ----------------------------------------------------------------------------- pipeline


def test_shuffling_is_seeded():
    source = IndexSource(64)

    def order(seed, shuffle=True):
        it = data.make_train_iterator(
            source,
            global_batch_size=16,
            seed=seed,
            shuffle=shuffle,
            process_index=0,
            process_count=1,
        )
        return _labels(it, 8)  # two epochs

    a, b, c = order(3), order(3), order(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a[:4].ravel()) == list(range(64))  # epoch 1 is a permutation
    assert sorted(a[4:].ravel()) == list(range(64))  # so is epoch 2 ...
    assert not np.array_equal(a[:4], a[4:])  # ... in a different order
    np.testing.assert_array_equal(order(3, shuffle=False)[:4].ravel(), np.arange(64))


def test_per_process_shards_are_disjoint_and_cover():
    source = IndexSource(40)
    shards = []
    for process_index in range(2):
        ds = data.make_dataset(
            source,
            global_batch_size=8,
            seed=5,
            num_epochs=1,
            process_index=process_index,
            process_count=2,
        )
        batches = list(ds)
        assert all(b["label"].shape == (4,) for b in batches)  # local batch = 8 // 2
        shards.append(np.concatenate([b["label"] for b in batches]))
    assert len(shards[0]) == len(shards[1]) == 20
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(40))
    # An odd record count drops the remainder so that shards stay equal.
    odd = [
        _all_labels(
            data.make_dataset(
                IndexSource(41),
                global_batch_size=2,
                seed=0,
                num_epochs=1,
                process_index=i,
                process_count=2,
            )
        )
        for i in range(2)
    ]
    assert len(odd[0]) == len(odd[1]) == 20 and not set(odd[0]) & set(odd[1])


def test_finite_epochs_and_remainder():
    source = IndexSource(10)
    kept = list(
        data.make_dataset(
            source,
            global_batch_size=4,
            seed=0,
            num_epochs=1,
            drop_remainder=False,
            process_index=0,
            process_count=1,
        )
    )
    assert [len(b["label"]) for b in kept] == [4, 4, 2]
    dropped = list(
        data.make_dataset(
            source, global_batch_size=4, seed=0, num_epochs=2, process_index=0, process_count=1
        )
    )
    assert [len(b["label"]) for b in dropped] == [4] * 5  # batches span the epoch boundary


def test_iterator_resume_is_exact(tmp_path):
    shape = (2, 2, 1)
    _write_latents(tmp_path, _latent_examples(12, shape, np.float32, True), shape, "float32", True)
    source = data.ArrayRecordLatentSource(tmp_path)  # random per-example draws too

    def fresh():
        return data.make_train_iterator(
            source, global_batch_size=4, seed=11, process_index=0, process_count=1
        )

    it = fresh()
    for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
        next(it)
    state = it.get_state()
    json.dumps(state)  # serialisable
    expected = [next(it) for _ in range(4)]

    resumed = fresh()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])

    # Orbax path: Grain's checkpoint handler writes and restores the same state.
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(item=it))
    after_save = next(it)
    restored = handler.restore(
        epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(item=fresh())
    )
    np.testing.assert_array_equal(next(restored)["image"], after_save["image"])


def test_workers_match_in_process_and_resume():
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    source = data.SyntheticSource(num_examples=32, resolution=4, channels=1)
    kwargs = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    reference = data.make_train_iterator(source, **kwargs)
    want = [next(reference)["image"] for _ in range(6)]
    it = data.make_train_iterator(source, worker_count=2, **kwargs)
    try:
        got = [next(it)["image"] for _ in range(3)]
        state = it.get_state()
    finally:
        it.close()
    resumed = data.make_train_iterator(source, worker_count=2, **kwargs)
    try:
        resumed.set_state(state)
        got += [next(resumed)["image"] for _ in range(3)]
    finally:
        resumed.close()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_extra_operations():
    class Double(grain.transforms.Map):
        def map(self, element):
            return {**element, "label": element["label"] * 2}

    ds = data.make_dataset(
        IndexSource(6),
        global_batch_size=3,
        seed=0,
        num_epochs=1,
        shuffle=False,
        operations=[Double(), lambda ex: {**ex, "label": ex["label"] + 1}],
        process_index=0,
        process_count=1,
    )
    np.testing.assert_array_equal(_all_labels(ds), 2 * np.arange(6) + 1)
    with pytest.raises(TypeError, match="unsupported operation"):
        data.make_dataset(IndexSource(6), global_batch_size=3, seed=0, operations=[3])


def test_pipeline_errors():
    source = IndexSource(8)
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        data.make_dataset(source, global_batch_size=8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="seed"):
        data.make_dataset(source, global_batch_size=8, seed=-1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index 2"):
        data.make_dataset(source, global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no full batch"):
        data.make_dataset(
            source, global_batch_size=16, seed=0, num_epochs=1, process_index=0, process_count=1
        )
    assert data.local_batch_size(12, 4) == 3


def test_defaults_come_from_jax():
    ds = data.make_dataset(IndexSource(8), global_batch_size=4, seed=0)
    assert jax.process_count() == 1 and next(iter(ds))["label"].shape == (4,)


# ----------------------------------------------------------------------------- global arrays


def test_global_batch_on_8_device_mesh():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"))
    source = data.SyntheticSource(num_examples=16, resolution=4, channels=2)
    local = next(data.make_train_iterator(source, global_batch_size=8, seed=0))
    batch = parallel.make_global_batch(local, mesh, ("data", "fsdp"))
    image, label = batch["image"], batch["label"]
    assert isinstance(image, jax.Array) and image.shape == (8, 4, 4, 2)
    assert image.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert label.shape == (8,) and label.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(image), local["image"])
    np.testing.assert_array_equal(np.asarray(label), local["label"])
    for shard in image.addressable_shards:
        assert shard.data.shape == (2, 4, 4, 2)  # 8 examples over data x fsdp = 4 shards
        np.testing.assert_array_equal(np.asarray(shard.data), local["image"][shard.index])
    # Replicated over "model": devices differing only in the model coordinate hold equal data.
    devices = mesh.devices
    by_device = {s.device: np.asarray(s.data) for s in image.addressable_shards}
    np.testing.assert_array_equal(by_device[devices[1, 0, 0]], by_device[devices[1, 0, 1]])


def test_global_batch_errors():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"\['fsdp'\] are not axes"):
        parallel.make_global_batch({"x": np.zeros((8, 2))}, mesh, ("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible by the 4 shards"):
        parallel.make_global_batch({"x": np.zeros((6, 2))}, mesh, "data")


def test_pad_batch_marks_padding_and_builds_global_arrays():
    images = np.arange(3 * 2, dtype=np.uint8).reshape(3, 2)
    host = parallel.pad_batch({"image": images}, 8, first_id=5)
    assert host["image"].dtype == np.uint8 and host["image"].shape == (8, 2)
    np.testing.assert_array_equal(host["image"][:3], images)
    assert not host["image"][3:].any()
    np.testing.assert_array_equal(host["id"], [5, 6, 7, -1, -1, -1, -1, -1])
    assert host["id"].dtype == np.int32 and parallel.PADDING_ID == -1
    empty = parallel.pad_batch({"x": np.zeros((0, 4), np.float32)}, 2, first_id=0)
    assert empty["x"].shape == (2, 4) and list(empty["id"]) == [-1, -1]
    full = parallel.pad_batch({"x": np.ones((2, 1))}, 2)
    assert set(full) == {"x"} and full["x"].shape == (2, 1)
    with pytest.raises(ValueError, match="cannot pad"):
        parallel.pad_batch({"x": np.zeros((3,)), "y": np.zeros((2,))}, 4)
    with pytest.raises(ValueError, match="cannot pad"):
        parallel.pad_batch({"x": np.zeros((5,))}, 4)

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    sharding = parallel.batch_sharding(mesh, "data")
    ids = parallel.global_from_host(host["id"], sharding)
    assert ids.shape == (8,) and ids.sharding == sharding
    np.testing.assert_array_equal(np.asarray(ids), host["id"])


# ----------------------------------------------------------------------------- dispatcher


def test_make_source_errors():
    with pytest.raises(ValueError) as info:
        _make_source({"source": "imagenet"})
    for name in ("fashion_mnist", "synthetic", "image_folder", "tfds", "array_record"):
        assert name in str(info.value)
    with pytest.raises(data.DataNotFoundError, match=r"--config.data.dir"):
        _make_source({"source": "array_record"})
    with pytest.raises(ValueError, match="grayscale"):
        _make_source({"source": "fashion_mnist", "channels": 3})


def test_make_source_reads_the_data_settings(tmp_path):
    _fake_fashion_mnist(tmp_path, n=4)
    settings = config_lib.read(
        {"data": {"source": "fashion_mnist", "dir": str(tmp_path), "resolution": 32}}
    ).data
    assert settings.channels is None and settings.num_classes is None  # the dataset's own
    source = data.make_source(settings)
    assert source.example_shape == (32, 32, 1) and source.num_classes == 10 and len(source) == 4
    assert source.scale_stds("laplacian-16-32") is None  # pixel sources store no statistics
    with pytest.raises(ValueError, match="num_classes=5"):
        data.make_source(dataclasses.replace(settings, num_classes=5))

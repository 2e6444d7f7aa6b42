"""Sample grids and preview strips (``dfm_jax.utils.viz``) and the [-1, 1] <-> uint8 conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax import data
from dfm_jax.data import fashion_mnist, latents
from dfm_jax.utils import viz


def _old_to_uint8(x) -> np.ndarray:
    """The conversion as the package wrote it before ``viz.to_uint8`` was the only one."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _test_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    halves = (np.arange(-1, 257) + 0.5) / 127.5 - 1.0  # round-half-to-even cases
    levels = np.arange(256) / 127.5 - 1.0
    return np.concatenate([rng.uniform(-1.3, 1.3, 4096), halves, levels]).astype(np.float32)


def test_uint8_round_trips_the_256_levels():
    levels = np.arange(256, dtype=np.uint8)
    unit = viz.from_uint8(levels)
    assert unit.dtype == np.float32 and unit.min() == -1.0 and unit.max() == 1.0
    np.testing.assert_array_equal(unit, levels.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(viz.to_uint8(unit), levels)
    round_trip = jax.jit(lambda x: viz.to_uint8(viz.from_uint8(x)))(jnp.asarray(levels))
    assert isinstance(round_trip, jax.Array) and round_trip.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(round_trip), levels)


def test_to_uint8_matches_the_old_formula_on_host_and_in_jit():
    values = _test_values()
    expected = _old_to_uint8(values)
    host = viz.to_uint8(values)
    assert isinstance(host, np.ndarray) and host.dtype == np.uint8
    np.testing.assert_array_equal(host, expected)
    np.testing.assert_array_equal(viz.to_uint8(values.astype(np.float64)), expected)
    traced = jax.jit(viz.to_uint8)(jnp.asarray(values))
    np.testing.assert_array_equal(np.asarray(traced), expected)
    old_jax = jnp.clip(jnp.round((jnp.asarray(values) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(old_jax))


def _cell(grid: np.ndarray, row: int, column: int, size: int, left: int, padding: int = 2):
    top = padding + row * (size + padding)
    start = left + padding + column * (size + padding)
    return grid[top : top + size, start : start + size]


@pytest.mark.parametrize("size, channels, factor", [(8, 1, 8), (32, 3, 2), (80, 1, 1)])
def test_image_grid_is_the_upscaled_images_with_a_label_column(size, channels, factor):
    rng = np.random.default_rng(size)
    images = rng.uniform(-1, 1, (5, size, size, channels)).astype(np.float32)
    labels = ["T-shirt/top", "7", "Ankle boot"]
    grid = viz.image_grid(images, columns=2, row_labels=labels)
    cell = size * factor
    grid_width = 2 * (cell + 2) + 2
    assert grid.dtype == np.uint8 and grid.shape[0] == 3 * (cell + 2) + 2
    assert grid.shape[2] == channels
    label_width = grid.shape[1] - grid_width
    assert label_width > 0
    plain = viz.image_grid(images, columns=2)
    assert plain.shape == (grid.shape[0], grid_width, channels)
    np.testing.assert_array_equal(grid[:, label_width:], plain)
    for index in range(6):
        row, column = divmod(index, 2)
        got = _cell(grid, row, column, cell, label_width)
        if index == len(images):
            assert not got.any(), "an empty cell is black"
            continue
        upscaled = np.repeat(np.repeat(_old_to_uint8(images[index]), factor, 0), factor, 1)
        np.testing.assert_array_equal(got, upscaled, err_msg=f"cell {index}")
    for row in range(3):
        top = 2 + row * (cell + 2)
        band = grid[top : top + cell, :label_width]
        assert band.any(), f"row {row} has no label"
        assert (band[..., 0] == band[..., -1]).all()  # white text: every channel alike


def test_preview_strip_is_the_upscaled_previews():
    rng = np.random.default_rng(1)
    coarse = rng.uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    final = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    strip = viz.preview_strip([coarse, final], row_labels=["a", "b", "c"])
    plain = viz.preview_strip([coarse, final])
    cell = 64  # 8x8 samples upscaled by 8; the 4x4 previews by 16
    assert plain.shape == (3 * (cell + 2) + 2, 2 * (cell + 2) + 2, 1)
    label_width = strip.shape[1] - plain.shape[1]
    assert label_width > 0
    np.testing.assert_array_equal(strip[:, label_width:], plain)
    for example in range(3):
        for stage, factor in ((coarse, 16), (final, 8)):
            column = 0 if stage is coarse else 1
            expected = np.repeat(np.repeat(_old_to_uint8(stage[example]), factor, 0), factor, 1)
            np.testing.assert_array_equal(_cell(plain, example, column, cell, 0), expected)


def test_class_labels_and_label_checks():
    names = ("T-shirt/top", "Trouser", "Pullover")
    assert viz.class_labels(jnp.asarray([2, 0]), names) == ["Pullover", "T-shirt/top"]
    assert viz.class_labels(np.asarray([1, 3]), None) == ["1", "3"]
    assert viz.class_labels([1, 5], names) == ["Trouser", "5"]
    with pytest.raises(ValueError, match="2 row labels for a grid of 3 rows"):
        viz.image_grid(np.zeros((6, 8, 8, 1)), columns=2, row_labels=["a", "b"])
    long = viz.image_grid(np.zeros((1, 8, 8, 1)), columns=1, row_labels=["x" * 200])
    cut = viz.image_grid(np.zeros((1, 8, 8, 1)), columns=1, row_labels=["x" * 21 + "..."])
    np.testing.assert_array_equal(long, cut)  # long labels are cut


def test_sources_name_their_classes(tmp_path):
    """The row labels' names: Fashion-MNIST's ten, a latent dataset's metadata, else None."""
    assert fashion_mnist.FashionMnistSource.class_names == fashion_mnist.CLASS_NAMES
    assert len(fashion_mnist.CLASS_NAMES) == fashion_mnist.NUM_CLASSES
    assert data.SyntheticSource(num_examples=4, num_classes=2).class_names is None
    examples = [{"latent": np.zeros((2, 2, 4), np.float32), "label": i % 2} for i in range(4)]
    latents.write_shard(tmp_path / latents.shard_filename(0, 1), examples)
    for extra, expected in (({"class_names": ["cat", "dog"]}, ("cat", "dog")), ({}, None)):
        metadata = latents.LatentMetadata((2, 2, 4), "float32", 2, 4, extra=extra)
        latents.write_metadata(tmp_path, metadata)
        assert latents.ArrayRecordLatentSource(tmp_path).class_names == expected

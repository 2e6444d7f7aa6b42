"""Moving Fashion-MNIST: deterministic clips of one bouncing garment, from the IDX files."""

from __future__ import annotations

import numpy as np
import pytest

from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.data import fashion_mnist

pytestmark = pytest.mark.skipif(
    fashion_mnist.idx_files(fashion_mnist.DEBIAN_DIR, "test") is None,
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture(scope="module")
def source():
    settings = config_lib.DataSettings(
        source="moving_fashion_mnist", split="test", frames=6, resolution=32
    )
    return data.make_source(settings)


def _check_frames(clip, positions, garment):
    """Every frame holds ``garment`` at its corner, on the -1 background elsewhere."""
    size = garment.shape[0]
    for frame, (row, column) in zip(clip[..., 0], positions, strict=True):
        np.testing.assert_allclose(
            frame[row : row + size, column : column + size], garment, atol=1e-6
        )
        outside = frame.copy()
        outside[row : row + size, column : column + size] = -2
        assert np.all(outside[outside != -2] == -1.0)


def test_clip_is_the_garment_moving_and_bouncing(source):
    garments = data.FashionMnistSource(split="test")
    assert len(source) == len(garments) == 10000 and source.example_shape == (6, 32, 32, 1)
    full = data.MovingFashionMnistSource(split="test", frames=6, resolution=56)
    for index in (0, 7, 123):
        garment = garments[index]["image"][..., 0]
        # At 56 px the 28x28 garment is pasted as it is.
        example = full[index]
        assert int(example["label"]) == int(garments[index]["label"])
        _check_frames(example["image"], full.positions(index), garment)
        # At 32 px it is scaled to 16x16 (box filter: the mean brightness is kept).
        clip = source[index]["image"]
        assert clip.dtype == np.float32 and clip.shape == (6, 32, 32, 1)
        row, column = source.positions(index)[0]
        small = clip[0, row : row + 16, column : column + 16, 0]
        assert abs(small.mean() - garment.mean()) < 0.02
        _check_frames(clip, source.positions(index), small)
        for positions, room in ((full.positions(index), 28), (source.positions(index), 16)):
            assert positions.min() >= 0 and positions.max() <= room
            assert len({tuple(p) for p in positions}) > 1  # it moves
    # The closed-form reflection equals a frame-by-frame bouncing simulation.
    for index in range(20):
        start, velocity = full._trajectory(index)
        np.testing.assert_allclose(full.motion(index), velocity)
        position, expected = start.copy(), []
        for _ in range(6):
            expected.append(np.rint(position))
            position = position + velocity
            for axis in range(2):
                if position[axis] > 28:
                    position[axis], velocity[axis] = 56 - position[axis], -velocity[axis]
                elif position[axis] < 0:
                    position[axis], velocity[axis] = -position[axis], -velocity[axis]
        np.testing.assert_array_equal(full.positions(index), np.asarray(expected))


def test_clips_are_deterministic_and_seeded(source):
    again = data.MovingFashionMnistSource(split="test", frames=6, resolution=32)
    np.testing.assert_array_equal(again[5]["image"], source[5]["image"])
    other = data.MovingFashionMnistSource(split="test", frames=6, resolution=32, seed=1)
    assert not np.array_equal(other.positions(5), source.positions(5))
    with pytest.raises(ValueError, match="frames >= 2"):
        data.MovingFashionMnistSource(split="test", frames=0)
    with pytest.raises(ValueError, match="grayscale"):
        data.make_source(
            config_lib.DataSettings(source="moving_fashion_mnist", frames=4, channels=3)
        )

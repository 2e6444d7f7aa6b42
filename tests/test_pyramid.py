"""Decompositions: exact inverse, torch parity of the resize, previews, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfm_jax.method.pyramid import HaarDWT, Laplacian, Standardized, resize_bilinear

PYRAMIDS = {
    "laplacian_x2": Laplacian((2,)),
    "laplacian_x2x2": Laplacian((2, 2)),
    "laplacian_x4": Laplacian((4,)),
    "haar_1": HaarDWT(1),
    "haar_2": HaarDWT(2),
    "standardized": Standardized(Laplacian((2, 2)), (0.3, 1.7, 0.05)),
}


def _random(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _torch_resize(x, size):
    """Reference: torch bilinear, half-pixel centres, no antialias, channel-last in/out."""
    x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return y.permute(0, 2, 3, 1).numpy()


def _torch_laplacian(x, ratios):
    """Reference decomposition written directly with torch resizes (successive low-pass)."""
    lowpass = [np.asarray(x)]
    for ratio in reversed(ratios):
        h, w = lowpass[0].shape[1:3]
        lowpass.insert(0, _torch_resize(lowpass[0], (h // ratio, w // ratio)))
    scales = [lowpass[0]]
    for coarse, fine in itertools.pairwise(lowpass):
        scales.append(fine - _torch_resize(coarse, fine.shape[1:3]))
    return scales


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_resize_matches_torch_bilinear(factor, direction):
    x = _random((2, 16, 12, 3))
    size = (16 // factor, 12 // factor) if direction == "down" else (16 * factor, 12 * factor)
    np.testing.assert_allclose(resize_bilinear(x, *size), _torch_resize(x, size), atol=1e-5)


def test_x2_bilinear_downsample_is_2x2_average():
    x = _random((1, 8, 8, 2))
    expected = x.reshape(1, 4, 2, 4, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_bilinear(x, 4, 4), expected, atol=1e-6)


@pytest.mark.parametrize("ratios", [(2,), (2, 2), (4,)])
def test_laplacian_matches_torch_reference(ratios):
    x = _random((2, 16, 16, 3), seed=1)
    ours = Laplacian(ratios).decompose(x)
    reference = _torch_laplacian(x, ratios)
    assert len(ours) == len(reference) == len(ratios) + 1
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PYRAMIDS))
@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 3, 16, 8, 2)])
def test_recompose_inverts_decompose(name, shape):
    pyramid = PYRAMIDS[name]
    x = _random(shape, seed=2)
    scales = pyramid.decompose(x)
    assert [s.shape for s in scales] == pyramid.scale_shapes(shape)
    np.testing.assert_allclose(pyramid.recompose(scales), x, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PYRAMIDS))
def test_decompose_is_jittable(name):
    pyramid = PYRAMIDS[name]
    x = _random((2, 8, 8, 1))
    roundtrip = jax.jit(lambda v: pyramid.recompose(pyramid.decompose(v)))
    np.testing.assert_allclose(roundtrip(x), x, atol=1e-5)


def test_scale_resolutions_coarsest_first():
    sizes = Laplacian((2, 2)).scale_sizes(32, 64)
    assert sizes == [(8, 16), (16, 32), (32, 64)]
    assert Laplacian((4,)).scale_sizes(128, 128) == [(32, 32), (128, 128)]


def test_preview_is_the_low_pass_image():
    """Preview k is the k-th low-pass image, i.e. the input downsampled to scale k."""
    x = _random((2, 16, 16, 3), seed=3)
    pyramid = Laplacian((2, 2))
    scales = pyramid.decompose(x)
    np.testing.assert_allclose(pyramid.preview(scales, 1), scales[0])
    np.testing.assert_allclose(pyramid.preview(scales, 2), _torch_resize(x, (8, 8)), atol=1e-5)
    np.testing.assert_allclose(pyramid.preview(scales, 3), x, atol=1e-5)
    # Later scales are not read.
    np.testing.assert_allclose(pyramid.preview(scales[:2], 2), pyramid.preview(scales, 2))


def test_haar_detail_blocks_are_zero_sum_and_hold_haar_coefficients():
    x = _random((1, 4, 4, 1), seed=4)
    approx, detail = HaarDWT(1).decompose(x)
    blocks = np.asarray(detail).reshape(1, 2, 2, 2, 2, 1)
    np.testing.assert_allclose(blocks.sum(axis=(2, 4)), 0.0, atol=1e-6)
    # Haar coefficients of the top-left block from their textbook definition.
    a, b, c, d = np.asarray(x)[0, :2, :2, 0].ravel()
    np.testing.assert_allclose(approx[0, 0, 0, 0], (a + b + c + d) / 4, atol=1e-6)
    horizontal = (a - b + c - d) / 4
    vertical = (a + b - c - d) / 4
    diagonal = (a - b - c + d) / 4
    block = np.asarray(detail)[0, :2, :2, 0]
    np.testing.assert_allclose(
        block,
        [
            [horizontal + vertical + diagonal, -horizontal + vertical - diagonal],
            [horizontal - vertical - diagonal, -horizontal - vertical + diagonal],
        ],
        atol=1e-6,
    )


def test_standardized_divides_by_stds_and_inverts():
    base = Laplacian((2,))
    pyramid = Standardized(base, (0.5, 4.0))
    x = _random((2, 8, 8, 1), seed=5)
    for ours, raw, std in zip(pyramid.decompose(x), base.decompose(x), (0.5, 4.0)):
        np.testing.assert_allclose(ours, raw / std, rtol=1e-6)
    scales = pyramid.decompose(x)
    np.testing.assert_allclose(pyramid.preview(scales, 1), base.preview(base.decompose(x), 1))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by 4"):
        Laplacian((2, 2)).decompose(jnp.zeros((1, 10, 12, 1)))
    with pytest.raises(ValueError, match="image batch"):
        Laplacian((2,)).decompose(jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="ratios"):
        Laplacian((1,))
    with pytest.raises(ValueError, match="levels"):
        HaarDWT(0)
    with pytest.raises(ValueError, match="expected 2 scales"):
        Laplacian((2,)).recompose([jnp.zeros((1, 4, 4, 1))])
    with pytest.raises(ValueError, match="scale 2 has shape"):
        Laplacian((2,)).recompose([jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 6, 6, 1))])
    with pytest.raises(ValueError, match="3 per-scale stds"):
        Standardized(Laplacian((2,)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        Standardized(Laplacian((2,)), (1.0, 0.0))


def _np_block_mean(x, factor):
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _np_nearest_up(x, factor):
    return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


def test_haar_level_2_and_standardized_scales_are_block_means():
    """Every scale written with numpy block means (a wrong operator cannot pass)."""
    x = np.asarray(_random((2, 8, 8, 2), seed=6), np.float64)
    means = [_np_block_mean(x, 4), _np_block_mean(x, 2), x]
    haar = [np.asarray(s) for s in HaarDWT(2).decompose(jnp.asarray(x, jnp.float32))]
    expected = [means[0]] + [
        fine - _np_nearest_up(coarse, 2) for coarse, fine in itertools.pairwise(means)
    ]
    for got, want in zip(haar, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Laplacian x2 x2 (x2 bilinear down = 2x2 mean), standardised by known stds.
    stds = (0.3, 1.7, 0.05)
    scales = Standardized(Laplacian((2, 2)), stds).decompose(jnp.asarray(x, jnp.float32))
    lowpass = [means[0], means[1], x]
    laplacian = [lowpass[0]] + [
        fine - _torch_resize(coarse.astype(np.float32), fine.shape[1:3])
        for coarse, fine in itertools.pairwise(lowpass)
    ]
    for got, want, std in zip(scales, laplacian, stds, strict=True):
        np.testing.assert_allclose(np.asarray(got) * std, want, atol=1e-5)

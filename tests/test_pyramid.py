"""Decompositions: exact inverse, torch parity of the resize, previews, errors."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_utils

from dfm_jax import config as config_lib
from dfm_jax.method import sampling
from dfm_jax.method.pyramid import (
    HaarDWT,
    Laplacian,
    Standardized,
    make,
    metadata_name,
    resize_bilinear,
    resize_trilinear,
)
from dfm_jax.preparation import stats
from dfm_jax.training import setup as setup_lib

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


# ------------------------------------------------------------------ temporal (3-D) pyramid


def _torch_resize3d(x, size):
    """Reference: torch trilinear, half-pixel centres, (B, T, H, W, C) in and out."""
    x = torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3)
    y = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return y.permute(0, 2, 3, 4, 1).numpy()


def _torch_laplacian3d(x, ratios):
    """Reference 3-D decomposition with torch resizes: every ratio scales T, H and W."""
    lowpass = [np.asarray(x)]
    for ratio in reversed(ratios):
        t, h, w = lowpass[0].shape[1:4]
        lowpass.insert(0, _torch_resize3d(lowpass[0], (t // ratio, h // ratio, w // ratio)))
    return [lowpass[0]] + [
        fine - _torch_resize3d(coarse, fine.shape[1:4])
        for coarse, fine in itertools.pairwise(lowpass)
    ]


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_resize_matches_torch_trilinear(factor, direction):
    x = _random((2, 8, 16, 12, 3), seed=7)
    if direction == "down":
        size = (8 // factor, 16 // factor, 12 // factor)
    else:
        size = (8 * factor, 16 * factor, 12 * factor)
    np.testing.assert_allclose(resize_trilinear(x, *size), _torch_resize3d(x, size), atol=1e-5)


@pytest.mark.parametrize(
    "ratios, shapes",
    [
        ((2,), [(2, 4, 4, 6, 3), (2, 8, 8, 12, 3)]),
        ((2, 2), [(2, 2, 2, 3, 3), (2, 4, 4, 6, 3), (2, 8, 8, 12, 3)]),
    ],
)
def test_temporal_laplacian_halves_time_and_inverts(ratios, shapes):
    x = _random((2, 8, 8, 12, 3), seed=8)
    pyramid = Laplacian(ratios, temporal=True)
    assert pyramid.scale_shapes(x.shape) == shapes
    scales = pyramid.decompose(x)
    assert [s.shape for s in scales] == shapes
    for ours, reference in zip(scales, _torch_laplacian3d(x, ratios), strict=True):
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(pyramid.recompose(scales), x, atol=1e-5)
    # Preview k is the input trilinearly downsampled to scale k.
    k = len(ratios)
    np.testing.assert_allclose(
        pyramid.preview(scales, k), _torch_resize3d(x, shapes[k - 1][1:4]), atol=1e-5
    )
    standardized = Standardized(pyramid, (0.5,) * len(shapes))
    assert standardized.temporal and standardized.scale_shapes(x.shape) == shapes
    np.testing.assert_allclose(
        jax.jit(lambda v: standardized.recompose(standardized.decompose(v)))(x), x, atol=1e-5
    )


def test_spatial_pyramid_keeps_every_frame():
    """temporal=False (the default): a video is decomposed frame by frame."""
    x = _random((2, 3, 8, 8, 2), seed=9)
    pyramid = Laplacian((2,))
    scales = pyramid.decompose(x)
    assert [s.shape for s in scales] == [(2, 3, 4, 4, 2), (2, 3, 8, 8, 2)]
    for frame in range(3):
        for ours, reference in zip(scales, _torch_laplacian(x[:, frame], (2,)), strict=True):
            np.testing.assert_allclose(ours[:, frame], reference, atol=1e-5)


def test_temporal_pyramid_errors_and_names():
    pyramid = Laplacian((2,), temporal=True)
    with pytest.raises(ValueError, match=r"3 frames \(data.frames"):
        pyramid.decompose(jnp.zeros((1, 3, 8, 8, 1)))
    with pytest.raises(ValueError, match="videos"):
        pyramid.decompose(jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="videos"):
        pyramid.recompose([jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 8, 8, 1))])
    with pytest.raises(ValueError, match="scale 2 has shape"):  # time not x2
        pyramid.recompose([jnp.zeros((1, 2, 4, 4, 1)), jnp.zeros((1, 2, 8, 8, 1))])
    with pytest.raises(ValueError, match="only the Laplacian"):
        make("haar", (2,), temporal=True)
    assert make("laplacian", (2, 2), temporal=True) == Laplacian((2, 2), temporal=True)
    assert metadata_name("laplacian", (2,), temporal=True) == "laplacian_2_t"
    assert metadata_name("laplacian", (2,)) == "laplacian_2"
    assert stats.pyramid_from_name("laplacian_2x2_t") == Laplacian((2, 2), temporal=True)
    with pytest.raises(ValueError, match="did you mean"):
        stats.pyramid_from_name("haar_2_t")


def test_config_refuses_temporal_without_a_video_laplacian():
    with pytest.raises(config_lib.ConfigError, match=r"temporal.*laplacian"):
        train_utils.tiny_settings(
            {"data.frames": 4, "pyramid.kind": "haar", "pyramid.temporal": True}
        )
    with pytest.raises(config_lib.ConfigError, match=r"pyramid\.temporal.*images"):
        train_utils.tiny_settings({"pyramid.temporal": True})
    with pytest.raises(config_lib.ConfigError, match=r"data\.frames: 6 frames"):
        train_utils.tiny_settings(
            {
                "data.frames": 6,
                "pyramid.ratios": (2, 2),
                "pyramid.temporal": True,
                "model.patch_sizes": (1, 2, 4),
                "model.width": 48,
                "objective.stage_probs": (0.3, 0.3, 0.4),
                "sampling.steps_per_stage": (1, 1, 1),
                "sampling.thresholds": (0.9, 0.9),
            }
        )
    settings = train_utils.tiny_settings({"data.frames": 4, "pyramid.temporal": True})
    assert settings.pyramid.name == "laplacian_2_t"
    assert settings.pyramid.temporal_patch_sizes == (1, 2)


def test_tiny_temporal_video_dfm_computes_a_loss_and_samples():
    """DFM on (4, 8, 8, 1) clips whose coarse scale has 2 frames: 3-D patches (1, 2)."""
    settings = train_utils.tiny_settings(
        {"data.frames": 4, "pyramid.temporal": True, "pyramid.stds": (0.5, 0.25)}
    )
    source = types.SimpleNamespace(
        example_shape=(4, 8, 8, 1), num_classes=4, scale_stds=lambda name: None
    )
    method = setup_lib.build_method(settings, source)
    assert method.scale_shapes == [(2, 4, 4, 1), (4, 8, 8, 1)]
    assert method.model.config.temporal_patch_sizes == (1, 2)
    params = train_utils.random_params(method)
    videos = _random((2, 4, 8, 8, 1), seed=10)
    labels = jnp.asarray([0, 3], jnp.int32)
    loss, metrics = jax.jit(method.loss)(params, videos, labels, jax.random.key(2))
    assert np.isfinite(loss) and float(loss) > 0 and "loss_scale2" in metrics
    sampler = sampling.SamplerSettings(steps_per_stage=(1, 1), thresholds=(0.9,))
    clips, previews = method.generate(params, jax.random.key(3), labels, sampler, previews=True)
    assert clips.shape == (2, 4, 8, 8, 1) and np.isfinite(clips).all()
    assert [p.shape for p in previews] == [(2, 2, 4, 4, 1), (2, 4, 8, 8, 1)]

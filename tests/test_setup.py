"""Trainer setup pieces that decide what the model sees: standardisation and the
preconditioning stds."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.preparation import stats
from dfm_jax.training import setup

DATA_STDS = (0.5, 0.25)


def test_model_stds_are_one_for_a_standardised_pyramid():
    standardised = train_utils.tiny_settings(
        {"pyramid.standardize": True, "pyramid.stds": DATA_STDS, "model.preconditioning": True}
    )
    # The model sees X_s / sigma_s, whose std is 1, not the data's sigma_s.
    assert setup.model_stds(standardised, DATA_STDS) == (1.0, 1.0)
    arch = standardised.model.architecture(
        in_channels=1, num_classes=4, scale_stds=setup.model_stds(standardised, DATA_STDS)
    )
    assert tuple(arch.scale_stds) == (1.0, 1.0)


def test_model_stds_are_the_data_stds_otherwise():
    plain = train_utils.tiny_settings({"pyramid.stds": DATA_STDS, "model.preconditioning": True})
    assert setup.model_stds(plain, DATA_STDS) == DATA_STDS
    with pytest.raises(config_lib.ConfigError, match="needs per-scale data stds"):
        setup.model_stds(plain, None)
    off = train_utils.tiny_settings({"pyramid.stds": DATA_STDS})
    assert setup.model_stds(off, DATA_STDS) is None


def test_videos_are_standardised_by_default_with_measured_stds():
    """Video DFM standardises each scale (spec section 6); a pixel source stores no stds,
    so they are measured, and the standardised scales of those examples have std 1."""
    video = train_utils.tiny_settings({"data.frames": 2})
    assert video.pyramid.standardize is True
    assert train_utils.tiny_settings().pyramid.standardize is False  # images: paper default
    source = data.make_source(video.data)
    method = setup.build_method(video, source)
    indices = stats.sample_indices(len(source), setup.MEASURED_STD_EXAMPLES, seed=0)
    clips = jnp.stack([source[int(i)]["image"] for i in indices])
    for scale in method.decomposition.decompose(clips):
        np.testing.assert_allclose(float(jnp.std(scale)), 1.0, rtol=1e-3)
    pinned = train_utils.tiny_settings({"data.frames": 2, "pyramid.stds": DATA_STDS})
    assert setup.data_stds(pinned.pyramid, source, needed=True) == DATA_STDS
    unstandardised = train_utils.tiny_settings({"data.frames": 2, "pyramid.standardize": False})
    assert setup.data_stds(unstandardised.pyramid, source) is None


def test_standardising_without_data_needs_the_stds_in_the_config():
    """Without reading data (evaluating imported weights) nothing can be measured."""
    settings = train_utils.tiny_settings({"pyramid.standardize": True})
    with pytest.raises(ValueError, match=r"config\.pyramid\.stds: standardize=True needs"):
        setup.build(settings, read_data=False)
    pinned = train_utils.tiny_settings({"pyramid.standardize": True, "pyramid.stds": DATA_STDS})
    assert setup.build(pinned, read_data=False).method.decomposition.stds == DATA_STDS

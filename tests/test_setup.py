"""Trainer setup pieces that decide what the model sees: the preconditioning stds."""

from __future__ import annotations

import pytest
import train_utils

from dfm_jax import config as config_lib
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

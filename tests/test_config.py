"""The config schema: rendered once, read once, every experiment file valid."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib

import pytest
import train_utils

from dfm_jax import config as config_lib

CONFIGS = sorted(p for p in (train_utils.REPO / "configs").glob("*.py") if p.name != "__init__.py")


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _experiments():
    for path in CONFIGS:
        module = _load(path)
        for variant in getattr(module, "VARIANTS", (None,)):
            config = module.get_config(variant) if variant else module.get_config()
            yield f"{path.stem}{':' + variant if variant else ''}", config


def test_base_config_is_the_schema_defaults():
    assert config_lib.read(config_lib.base_config()) == config_lib.Settings()
    rendered = config_lib.base_config()
    # Unset optional fields are typed placeholders, so --config.model.depth=4 parses.
    rendered.model.depth = 4
    assert config_lib.read(rendered).model.depth == 4
    entry = config_lib.evaluator(metrics=("fd_fmnist",), every=10)
    assert config_lib.EvalSettings(**entry.to_dict()) == config_lib.EvalSettings(
        metrics=("fd_fmnist",), every=10
    )


@pytest.mark.parametrize(("name", "config"), list(_experiments()), ids=lambda x: str(x)[:40])
def test_every_experiment_reads_and_fits_its_devices(name, config):
    settings = config_lib.read(config)
    assert config_lib.read(settings.to_dict()) == settings  # JSON-able and lossless
    for devices in (1, 8, 256):
        if settings.batch_size % devices == 0 or settings.mesh.data != -1:
            config_lib.check_devices(settings, devices)
    if settings.method == "flow_matching":
        assert settings.num_scales == 1 and settings.objective.stage_probs == (1.0,)


def test_flow_matching_twin_keeps_the_budget():
    for name, config in _experiments():
        if config.method != "dfm":
            continue
        dfm = config_lib.read(config)
        fm = config_lib.read(config_lib.flow_matching_twin(config))
        assert fm.method == "flow_matching" and fm.num_scales == 1, name
        assert fm.model.patch_sizes == (dfm.model.patch_sizes[-1],), name
        assert sum(fm.sampling.steps_per_stage) == sum(dfm.sampling.steps_per_stage), name
        same = ("batch_size", "total_steps", "optimizer", "data", "evals", "autoencoder")
        assert all(getattr(fm, f) == getattr(dfm, f) for f in same), name
        twin_model = dataclasses.replace(dfm.model, patch_sizes=fm.model.patch_sizes)
        assert fm.model == dataclasses.replace(twin_model, stage_embedding=False), name


def test_a_size_override_gives_that_size_s_heads():
    """--config.model.size=S on the DFM-SiT config is DiT-S (6 heads of 64), not 16 heads
    of 24 inherited from the file (issue 15's trap)."""
    config = importlib.import_module("configs.imagenet512_dfm_sit").get_config()
    assert (
        config_lib.read(config)
        .model.architecture(in_channels=4, num_classes=1000, scale_stds=None)
        .num_heads
        == 16
    )
    config.model.size = "S"
    architecture = config_lib.read(config).model.architecture(
        in_channels=4, num_classes=1000, scale_stds=None
    )
    assert (architecture.width, architecture.num_heads) == (384, 6)

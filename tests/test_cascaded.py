"""Tests for dfm_jax.method.cascaded: the two-model baseline behind the Method interface."""

from __future__ import annotations

import importlib.util
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from dfm_jax.method import cascaded, methods, objective, pyramid, sampling
from dfm_jax.models import dit

SHAPE = (8, 8, 1)


def _dit(patch_sizes):
    return dit.DiT(
        dit.dit_config(
            "S",
            patch_sizes=patch_sizes,
            in_channels=1,
            num_classes=3,
            depth=1,
            width=32,
            num_heads=2,
        )
    )


def _method(**fields):
    return cascaded.Cascaded(
        stage1=_dit((1,)),
        stage2=_dit((2, 2)),
        ratio=2,
        objective=objective.ObjectiveConfig(label_dropout=0.0),
        example_shape=SHAPE,
        num_classes=3,
        batch_size=4,
        **fields,
    )


def test_loss_trains_stage1_on_low_res_and_stage2_on_the_noised_condition():
    method = _method(stage1_fraction=0.5)
    assert isinstance(method, methods.Method)
    params = train_utils.random_params(method)
    assert set(params) == {"stage1", "stage2"}
    images = jax.random.normal(jax.random.key(3), (4, *SHAPE))
    labels = jnp.asarray([0, 1, 2, 0], jnp.int32)
    key = jax.random.key(9)
    loss, metrics = jax.jit(method.loss)(params, images, labels, key)
    keys = jax.random.split(key, 6)
    t = objective.logit_normal(keys[1], (4,), 0.0, 1.0)
    low = pyramid.resize_bilinear(images, 4, 4)  # the 2x2 means
    noise1 = jax.random.normal(keys[2], (2, 4, 4, 1))
    x1 = t[:2, None, None, None] * low[:2] + (1 - t[:2, None, None, None]) * noise1
    apply1, apply2 = jax.jit(method.stage1.apply), jax.jit(method.stage2.apply)
    pred1 = apply1({"params": params["stage1"]}, (x1,), t[:2, None], jnp.ones((2, 1)), labels[:2])
    err1 = np.mean((np.asarray(pred1[0]) - np.asarray(low[:2] - noise1)) ** 2)
    t_c = objective.logit_normal(keys[3], (2,), 1.5, 1.0)
    eps_c = jax.random.normal(keys[4], (2, 4, 4, 1))
    noisy_low = t_c[:, None, None, None] * low[2:] + (1 - t_c[:, None, None, None]) * eps_c
    condition = pyramid.resize_bilinear(noisy_low, 8, 8)
    noise2 = jax.random.normal(keys[5], (2, *SHAPE))
    x2 = t[2:, None, None, None] * images[2:] + (1 - t[2:, None, None, None]) * noise2
    pred2 = apply2(
        {"params": params["stage2"]},
        (condition, x2),
        jnp.stack([t_c, t[2:]], axis=1),
        jnp.ones((2, 2)),
        labels[2:],
    )[1]
    err2 = np.mean((np.asarray(pred2) - np.asarray(images[2:] - noise2)) ** 2)
    np.testing.assert_allclose(metrics["loss_stage1"], err1, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_stage2"], err2, rtol=1e-5)
    np.testing.assert_allclose(loss, (err1 + err2) / 2, rtol=1e-5)
    f1 = dit.forward_flops(method.stage1.config, [(4, 4, 1)])
    f2 = dit.forward_flops(method.stage2.config, [SHAPE, SHAPE])
    assert method.forward_flops() == (2 * f1 + 2 * f2) // 4
    assert _method(stage1_fraction=0.75).forward_flops() == (3 * f1 + f2) // 4


def test_generate_runs_stage1_then_stage2_on_its_output():
    method = _method(inference_noise=0.0)
    params = train_utils.random_params(method)
    labels = jnp.asarray([0, 2], jnp.int32)
    sampler = sampling.SamplerSettings((3, 2), (0.9,), cfg_scale=2.0)
    generate = jax.jit(lambda p, k: method.generate(p, k, labels, sampler, previews=True))
    images, (low, final) = generate(params, jax.random.key(5))
    assert images.shape == (2, *SHAPE) and low.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(final, images)
    k1, _, k3 = jax.random.split(jax.random.key(5), 3)
    one = sampling.SamplerSettings((3,), (), cfg_scale=2.0)
    (expected_low,) = sampling.sample(
        method.stage1_velocity(params),
        [jax.random.normal(k1, (2, 4, 4, 1))],
        labels,
        one,
        null_label=3,
    )
    np.testing.assert_allclose(low, expected_low, rtol=1e-5, atol=1e-5)
    condition = pyramid.resize_bilinear(expected_low, 8, 8)  # inference_noise 0: clean
    (expected,) = sampling.sample(
        method.stage2_velocity(params, condition, 1.0),
        [jax.random.normal(k3, (2, *SHAPE))],
        labels,
        sampling.SamplerSettings((2,), (), cfg_scale=2.0),
        null_label=3,
    )
    np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)
    # Stage 2 depends on the stage-1 sample (through its conditioning slot).
    other = dict(params, stage1=train_utils.random_params(method, key=7)["stage1"])
    moved, (other_low, _) = generate(other, jax.random.key(5))
    assert np.abs(np.asarray(other_low) - np.asarray(low)).max() > 1e-3
    assert np.abs(np.asarray(moved) - np.asarray(images)).max() > 1e-4


def test_validation():
    with pytest.raises(ValueError, match="stage1_fraction"):
        _method(stage1_fraction=1.0)
    with pytest.raises(ValueError, match="two-slot"):
        cascaded.Cascaded(
            stage1=_dit((1,)),
            stage2=_dit((1, 2)),
            ratio=2,
            objective=objective.ObjectiveConfig(),
            example_shape=SHAPE,
            num_classes=3,
        )
    with pytest.raises(ValueError, match="leaves a stage"):
        _method(stage1_fraction=0.1).split(4)


CASCADED_TINY = {
    "method": "cascaded",
    "total_steps": 2,
    "log_every": 1,
    "checkpoint_every": 1,
    "sample_every": 100,  # no sample grid here: generate is tested above
}


@pytest.mark.slow  # 23 s; the same trainer path as test_pyramidal.py resume
def test_trains_checkpoints_and_resumes_bitwise(tmp_path):
    """Two steps straight == step 1 restored from its checkpoint, then step 2."""
    from dfm_jax.training import loop

    settings = train_utils.tiny_settings(CASCADED_TINY)
    with train_utils.persistent_compile_cache():
        straight = train_utils.to_host(loop.run(settings, str(tmp_path / "straight")))
        checkpoints = tmp_path / "straight" / "checkpoints"
        assert train_utils.checkpoint_steps(checkpoints) == [1, 2]
        shutil.copytree(checkpoints / "1", tmp_path / "resumed" / "checkpoints" / "1")
        resumed = train_utils.to_host(loop.run(settings, str(tmp_path / "resumed")))
    assert int(straight.step) == 2 and set(straight.params) == {"stage1", "stage2"}
    train_utils.assert_trees_equal(resumed, straight, "resumed vs straight")


@pytest.mark.parametrize("variant", ["pyramidal", "cascaded"])
def test_study_twins_have_the_dfm_training_flops(variant):
    """configs/study_fmnist.py: steps x FLOPs per example x batch equal DFM's (to a step)."""
    from dfm_jax import config as config_lib
    from dfm_jax import data
    from dfm_jax.training import setup as setup_lib

    path = train_utils.REPO / "configs" / "study_fmnist.py"
    spec = importlib.util.spec_from_file_location("study_fmnist_config", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    budgets = {}
    for name in ("dfm", variant):
        settings = config_lib.read(study.get_config(name))
        method = setup_lib.build_method(settings, data.data_spec(settings.data))
        assert method.name == name
        budgets[name] = (settings.total_steps, method.forward_flops(), settings.batch_size)
    (steps, flops, batch), (twin_steps, twin_flops, twin_batch) = budgets.values()
    assert twin_batch == batch
    assert abs(twin_steps * twin_flops - steps * flops) <= twin_flops

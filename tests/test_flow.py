"""The DFM objective: stage and time distributions, masks, noising, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from dfm_jax.method import objective
from dfm_jax.method.pyramid import Laplacian

KEY = jax.random.key(0)


def _scales(batch=4, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, 8, 8, 2), dtype=np.float32)
    return Laplacian((2, 2)).decompose(jnp.asarray(x))


@pytest.mark.parametrize("probs", [(0.9, 0.1), (0.7, 0.2, 0.1)])
def test_stage_frequencies_match_stage_probs(probs):
    config = objective.ObjectiveConfig(stage_probs=probs)
    n = 200_000
    stage = np.asarray(objective.sample_stages(KEY, n, config))
    assert stage.min() >= 1 and stage.max() <= len(probs)
    observed = np.bincount(stage, minlength=len(probs) + 1)[1:]
    _, p_value = scipy.stats.chisquare(observed, n * np.asarray(probs))
    assert p_value > 1e-3, (observed / n, probs)


def test_per_batch_stage_is_shared_and_still_follows_probs():
    config = objective.ObjectiveConfig(stage_probs=(0.8, 0.2), stage_sampling="per_batch")
    keys = jax.random.split(KEY, 4000)
    stages = np.asarray(jax.vmap(lambda k: objective.sample_stages(k, 16, config))(keys))
    assert (stages == stages[:, :1]).all()
    frequency = (stages[:, 0] == 2).mean()
    assert abs(frequency - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 4000)


@pytest.mark.parametrize("location", [1.5, 2.0, 0.0])
def test_time_distributions(location):
    config = objective.ObjectiveConfig(stage_probs=(0.0, 0.0, 1.0), earlier_location=location)
    n = 100_000
    stage = jnp.full((n,), 3, jnp.int32)
    t, mask = objective.sample_times(KEY, stage, config)
    t = np.asarray(t)
    assert (np.asarray(mask) == 1).all()
    for s in (0, 1):  # earlier stages: LogitNormal(location, 1)
        assert abs(np.median(t[:, s]) - scipy.special.expit(location)) < 0.005
        _, p_value = scipy.stats.kstest(scipy.special.logit(t[:, s]), "norm", args=(location, 1))
        assert p_value > 1e-3
    # Current stage: LogitNormal(0, 1).
    assert abs(np.median(t[:, 2]) - 0.5) < 0.005
    assert scipy.stats.kstest(scipy.special.logit(t[:, 2]), "norm").pvalue > 1e-3


def test_scales_beyond_the_stage_are_masked_with_zero_time():
    config = objective.ObjectiveConfig(stage_probs=(0.5, 0.3, 0.2))
    stage = objective.sample_stages(KEY, 5000, config)
    t, mask = objective.sample_times(jax.random.key(1), stage, config)
    stage, t, mask = map(np.asarray, (stage, t, mask))
    scale_number = np.arange(1, 4)[None]
    beyond = scale_number > stage[:, None]
    assert (t[beyond] == 0).all() and (mask[beyond] == 0).all()
    assert (mask[~beyond] == 1).all() and (t[~beyond] > 0).all() and (t[~beyond] < 1).all()
    np.testing.assert_array_equal(mask.sum(axis=1), stage)


def test_training_inputs_interpolate_and_recover_data():
    scales = _scales(batch=6)
    config = objective.ObjectiveConfig(stage_probs=(0.2, 0.3, 0.5))
    inputs = objective.make_training_inputs(KEY, scales, config)
    assert inputs.t.shape == inputs.mask.shape == (6, 3)
    for s, (data, noisy, target) in enumerate(zip(scales, inputs.noisy, inputs.targets)):
        assert noisy.shape == target.shape == data.shape
        recovered = objective.predicted_data(noisy, target, inputs.t[:, s])
        np.testing.assert_allclose(recovered, data, atol=1e-5)
        noise = data - target
        expected = (
            inputs.t[:, s, None, None, None] * data + (1 - inputs.t[:, s, None, None, None]) * noise
        )
        np.testing.assert_allclose(noisy, expected, atol=1e-6)
    # Independent noise per scale: the implied noises are uncorrelated.
    noise_1 = np.asarray(scales[1] - inputs.targets[1])
    noise_2 = np.asarray(scales[2] - inputs.targets[2])[:, ::2, ::2]
    assert abs(np.corrcoef(noise_1.ravel(), noise_2.ravel())[0, 1]) < 0.2


def test_training_inputs_keep_the_scales_dtype():
    """bfloat16 scales give bfloat16 noisy inputs and targets (the noise is drawn in the
    data's dtype, not promoted to float32); times and masks stay float32."""
    scales = [x.astype(jnp.bfloat16) for x in _scales(batch=4)]
    inputs = objective.make_training_inputs(KEY, scales, objective.ObjectiveConfig((0.2, 0.3, 0.5)))
    assert {x.dtype for x in (*inputs.noisy, *inputs.targets)} == {jnp.dtype(jnp.bfloat16)}
    assert inputs.t.dtype == inputs.mask.dtype == jnp.float32


def test_implied_training_noise_is_standard_normal_per_scale():
    """eps_s = X_s - v_s has mean ~0 and std ~1 on every scale (not a scaled N(0, 1))."""
    scales = _scales(batch=64, seed=1)
    inputs = objective.make_training_inputs(KEY, scales, objective.ObjectiveConfig((0.2, 0.3, 0.5)))
    for data, target in zip(scales, inputs.targets, strict=True):
        noise = np.asarray(data - target, np.float64).ravel()
        # n >= 64 * 2 * 2 * 2 = 512 values: mean within ~4.5 standard errors, std within 12 %.
        assert abs(noise.mean()) < 4.5 / np.sqrt(noise.size), noise.mean()
        assert 0.88 < noise.std() < 1.12, noise.std()


def test_masked_prediction_does_not_change_the_loss():
    scales = _scales(batch=8, seed=1)
    config = objective.ObjectiveConfig(stage_probs=(0.5, 0.25, 0.25))
    inputs = objective.make_training_inputs(KEY, scales, config)
    assert (inputs.mask == 0).any()
    predictions = [jnp.zeros_like(x) for x in inputs.targets]
    base = objective.loss_fn(predictions, inputs.targets, inputs.mask)
    masked = np.asarray(inputs.mask == 0)
    changed = []
    for s, prediction in enumerate(predictions):
        junk = jnp.where(masked[:, s].reshape(-1, *([1] * (prediction.ndim - 1))), 1e6, prediction)
        changed.append(junk)
    perturbed = objective.loss_fn(changed, inputs.targets, inputs.mask)
    assert float(perturbed.loss) == float(base.loss)
    np.testing.assert_array_equal(perturbed.per_scale, base.per_scale)
    # Non-finite values in masked predictions are ignored too, gradient included.
    nans = [jnp.where(c == 1e6, jnp.nan, c) for c in changed]
    assert float(objective.loss_fn(nans, inputs.targets, inputs.mask).loss) == float(base.loss)
    grads = jax.grad(lambda p: objective.loss_fn(p, inputs.targets, inputs.mask).loss)(predictions)
    for s, g in enumerate(grads):
        assert (np.asarray(g)[masked[:, s]] == 0).all()


def test_loss_is_the_sum_of_active_per_scale_mses():
    rng = np.random.default_rng(2)
    targets = [
        jnp.asarray(rng.standard_normal((3, 2, 2, 1))),
        jnp.asarray(rng.standard_normal((3, 4, 4, 1))),
    ]
    # Non-zero predictions (with zeros, (p - t)^2 and (p + t)^2 agree), one in bfloat16.
    predictions = [
        jnp.asarray(rng.standard_normal((3, 2, 2, 1)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((3, 4, 4, 1))),
    ]
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out = objective.loss_fn(predictions, targets, mask)
    assert out.loss.dtype == out.per_scale.dtype == jnp.float32
    mse = [
        np.square(np.asarray(p, np.float64) - np.asarray(x, np.float64)).reshape(3, -1).mean(1)
        for p, x in zip(predictions, targets)
    ]
    expected = np.mean([mse[0][0] + mse[1][0], mse[0][1], mse[0][2]])
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    np.testing.assert_allclose(out.per_scale, [mse[0].mean(), mse[1][0]], rtol=1e-6)
    np.testing.assert_allclose(out.active_fraction, [1.0, 1 / 3], rtol=1e-6)


def test_flow_matching_is_one_scale():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8, 8, 1), dtype=np.float32))
    config = objective.ObjectiveConfig(stage_probs=(1.0,))
    inputs = objective.make_training_inputs(KEY, [x], config)
    assert (inputs.mask == 1).all() and (inputs.stage == 1).all()
    assert ((inputs.t > 0) & (inputs.t < 1)).all()


def test_drop_labels():
    labels = jnp.arange(100_000) % 10
    dropped = np.asarray(objective.drop_labels(KEY, labels, 0.1, null_label=10))
    is_null = dropped == 10
    assert abs(is_null.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    assert objective.drop_labels(KEY, labels, 0.0, null_label=10) is labels


def test_config_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        objective.ObjectiveConfig(stage_probs=(0.9, 0.2))
    with pytest.raises(ValueError, match="non-negative"):
        objective.ObjectiveConfig(stage_probs=(1.1, -0.1))
    with pytest.raises(ValueError, match="2 entries but the pyramid has 3"):
        objective.make_training_inputs(
            KEY, _scales(), objective.ObjectiveConfig(stage_probs=(0.9, 0.1))
        )
    with pytest.raises(ValueError, match="stage_sampling"):
        objective.ObjectiveConfig(stage_sampling="per_device")
    with pytest.raises(ValueError, match="label_dropout"):
        objective.ObjectiveConfig(label_dropout=1.0)
    with pytest.raises(ValueError, match="earlier_scale"):
        objective.ObjectiveConfig(earlier_scale=0.0)


def test_loss_fn_rejects_mismatched_scale_counts():
    two = [jnp.zeros((2, 3)), jnp.zeros((2, 3))]
    with pytest.raises(ValueError, match="got 1 predictions, 2 targets and a mask for 2 scales"):
        objective.loss_fn(two[:1], two, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="got 2 predictions, 2 targets and a mask for 3 scales"):
        objective.loss_fn(two, two, jnp.ones((2, 3)))

"""The training-method interface: DFM and Flow Matching behind one API."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from dfm_jax.method import methods, objective, pyramid, sampling
from dfm_jax.models import dit

SHAPE = (8, 8, 1)


def _dfm(**objective_fields) -> methods.DecomposableFlowMatching:
    model = dit.DiT(
        dit.dit_config(
            "S", patch_sizes=(1, 2), in_channels=1, num_classes=3, depth=1, width=32, num_heads=2
        )
    )
    return methods.DecomposableFlowMatching(
        model=model,
        decomposition=pyramid.Laplacian((2,)),
        objective=objective.ObjectiveConfig(**objective_fields),
        example_shape=SHAPE,
        num_classes=3,
    )


def test_dfm_loss_is_the_objective_on_the_model_with_the_documented_keys():
    """loss = loss_fn(model(noisy inputs of split(key)[0]), labels dropped with split(key)[1])."""
    method = _dfm(label_dropout=0.5)
    params = train_utils.random_params(method)
    images = jax.random.normal(jax.random.key(3), (6, *SHAPE))
    labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
    key = jax.random.key(11)
    method_loss = jax.jit(method.loss)  # compiled: one program, not hundreds of eager ops
    loss, metrics = method_loss(params, images, labels, key)

    @jax.jit
    def reference(params, images, labels, key):
        key_inputs, key_labels = jax.random.split(key)
        scales = pyramid.Laplacian((2,)).decompose(images)
        inputs = objective.make_training_inputs(key_inputs, scales, method.objective)
        dropped = objective.drop_labels(key_labels, labels, 0.5, 3)
        predictions = method.model.apply(
            {"params": params}, inputs.noisy, inputs.t, inputs.mask, dropped
        )
        return objective.loss_fn(predictions, inputs.targets, inputs.mask), dropped

    expected, dropped = reference(params, images, labels, key)
    assert int((dropped == 3).sum()) > 0  # some labels were dropped to the null class
    np.testing.assert_allclose(loss, expected.loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_scale1"], expected.per_scale[0], rtol=1e-6)
    np.testing.assert_allclose(metrics["active_scale2"], expected.active_fraction[1])
    assert sorted(metrics) == ["active_scale1", "active_scale2", "loss_scale1", "loss_scale2"]
    # Images of another dtype (bfloat16 latents) are decomposed in float32: the same loss
    # as their float32 values, to the bit.
    rounded = images.astype(jnp.bfloat16)
    loss_bf16, _ = method_loss(params, rounded, labels, key)
    loss_f32, _ = method_loss(params, rounded.astype(jnp.float32), labels, key)
    assert float(loss_bf16) == float(loss_f32)


def test_init_checks_the_scale_shapes_against_the_patch_sizes():
    """Patch sizes (1, 4) on an 8x8 two-scale pyramid give 4x4 and 2x2 token grids: init
    names the shapes (parameters alone do not depend on them)."""
    model = dit.DiT(
        dit.dit_config(
            "S", patch_sizes=(1, 4), in_channels=1, num_classes=3, depth=1, width=32, num_heads=2
        )
    )
    method = dataclasses.replace(_dfm(), model=model)
    with pytest.raises(ValueError, match=r"different token grids \[\(4, 4\), \(2, 2\)\]"):
        method.init(jax.random.key(0))


def test_dfm_refuses_stage_probs_of_another_length_than_the_scales():
    """Three stage probabilities for a two-scale pyramid are refused when the method is
    built, not at the first training step."""
    with pytest.raises(ValueError, match=r"has 3 entries but the pyramid has 2 scales"):
        _dfm(stage_probs=(0.2, 0.3, 0.5))


def test_generate_recomposes_the_sampler_and_its_previews():
    method = _dfm()
    params = train_utils.random_params(method)
    labels = jnp.asarray([0, 2], jnp.int32)
    sampler = sampling.SamplerSettings(steps_per_stage=(3, 2), thresholds=(0.8,), cfg_scale=2.0)
    images, previews = method.generate(params, jax.random.key(5), labels, sampler, previews=True)
    assert images.shape == (2, *SHAPE) and [p.shape for p in previews] == [
        (2, 4, 4, 1),
        images.shape,
    ]
    np.testing.assert_array_equal(previews[-1], images)
    alone = method.generate(params, jax.random.key(5), labels, sampler)
    np.testing.assert_allclose(alone, images, rtol=1e-6, atol=1e-6)
    # The same as the sampler by hand, from noise fold_in(key, s) per scale.
    noise = sampling.initial_noise(
        jax.random.key(5), method.decomposition.scale_shapes((2, *SHAPE))
    )
    scales = sampling.sample(method.network(params), noise, labels, sampler, null_label=3)
    np.testing.assert_allclose(method.decomposition.recompose(scales), images, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="describes 1 stage"):
        method.generate(params, jax.random.key(5), labels, sampling.SamplerSettings((4,), ()))


def test_flow_matching_is_one_scale_with_stage_probs_one():
    model = dit.DiT(
        dit.dit_config(
            "S", patch_sizes=(2,), in_channels=1, num_classes=3, depth=1, width=32, num_heads=2
        )
    )
    fm = methods.FlowMatching(
        model=model,
        decomposition=pyramid.Laplacian(()),
        objective=objective.ObjectiveConfig(stage_probs=(1.0,)),
        example_shape=SHAPE,
        num_classes=3,
    )
    params = train_utils.random_params(fm)
    loss, metrics = jax.jit(fm.loss)(
        params, jnp.zeros((4, *SHAPE)), jnp.zeros(4, jnp.int32), jax.random.key(0)
    )
    assert np.isfinite(loss) and float(metrics["active_scale1"]) == 1.0
    assert fm.forward_flops() == dit.forward_flops(model.config, [SHAPE])
    two_scales = r"^Flow Matching has one scale and stage_probs \(1\.0,\), got 2 scales and"
    with pytest.raises(ValueError, match=two_scales):
        methods.FlowMatching(
            model=_dfm().model,
            decomposition=pyramid.Laplacian((2,)),
            objective=objective.ObjectiveConfig(),
            example_shape=SHAPE,
            num_classes=3,
        )
    # One scale is not enough: stage probabilities other than (1.0,) are refused too.
    with pytest.raises(ValueError, match=r"got 1 scales and \(0\.5, 0\.5\)$"):
        methods.FlowMatching(
            model=model,
            decomposition=pyramid.Laplacian(()),
            objective=objective.ObjectiveConfig(stage_probs=(0.5, 0.5)),
            example_shape=SHAPE,
            num_classes=3,
        )
    assert set(methods.METHODS) == {"dfm", "flow_matching", "pyramidal", "cascaded"}


@dataclasses.dataclass(frozen=True)
class _RecordingDFM(methods.DecomposableFlowMatching):
    """DFM whose network records what it is called with and predicts zeros."""

    calls: list = dataclasses.field(default_factory=list)

    def network(self, params):
        def velocity(scales, t, mask, labels):
            self.calls.append((scales, t, mask, labels))
            return tuple(jnp.zeros_like(x) for x in scales)

        return velocity


def test_the_network_sees_ten_percent_null_labels_and_the_drawn_masks():
    base = _dfm()
    method = _RecordingDFM(
        model=base.model,
        decomposition=base.decomposition,
        objective=base.objective,  # label_dropout 0.1, stage_probs (0.9, 0.1)
        example_shape=SHAPE,
        num_classes=3,
    )
    n = 4000
    labels = jnp.asarray(np.arange(n) % 3, jnp.int32)
    images = jax.random.normal(jax.random.key(2), (n, *SHAPE))
    key = jax.random.key(7)
    loss, _ = method.loss(None, images, labels, key)
    ((scales, t, mask, seen),) = method.calls
    seen = np.asarray(seen)
    null = seen == 3
    assert 0.08 < null.mean() < 0.12, null.mean()  # binomial sd 0.005
    np.testing.assert_array_equal(seen[~null], np.asarray(labels)[~null])
    # The masks (and times, inputs) are those drawn from split(key)[0], not all ones.
    inputs = objective.make_training_inputs(
        jax.random.split(key)[0], base.decomposition.decompose(images), base.objective
    )
    np.testing.assert_array_equal(mask, inputs.mask)
    np.testing.assert_array_equal(t, inputs.t)
    assert 0.07 < float(np.asarray(mask)[:, 1].mean()) < 0.13  # p_q = (0.9, 0.1)
    for x, y in zip(scales, inputs.noisy, strict=True):
        np.testing.assert_array_equal(x, y)
    # Zero predictions: the loss is the masked mean of |v|^2.
    expected = objective.loss_fn([jnp.zeros_like(v) for v in inputs.targets], inputs.targets, mask)
    np.testing.assert_allclose(loss, expected.loss, rtol=1e-6)

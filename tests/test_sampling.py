"""Tests for dfm_jax.method.sampling: schedule, solvers, guidance, previews, exactness.

The exactness tests use data with a known Gaussian distribution, for which the
true velocity field E[Z - eps | Y] is analytic (``GaussianScales``): sampling
with it must reproduce the mean and covariance of every scale and of the
recomposed image, up to the solver's discretisation error.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax.method import generation, guidance, methods, objective, sampling, schedule, solvers
from dfm_jax.method import pyramid as pyramid_lib

Settings = sampling.SamplerSettings

# Schedule
# --------------------------------------------------------------------------- #


def test_two_stage_schedule_matches_spec_example():
    times, active = sampling.stage_schedule((30, 10), (0.9,))
    assert times.shape == (41, 2) and times.dtype == np.float64
    assert active.shape == (40, 2) and active.dtype == bool
    np.testing.assert_allclose(times[:31, 0], 0.9 * np.arange(31) / 30, atol=1e-15)
    assert times[30, 0] == 0.9
    np.testing.assert_allclose(times[35], [0.95, 0.5], atol=1e-15)
    np.testing.assert_array_equal(times[:31, 1], 0.0)
    np.testing.assert_allclose(times[30:, 1], np.arange(11) / 10, atol=1e-15)
    np.testing.assert_array_equal(times[40], [1.0, 1.0])
    assert active[:, 0].all()
    assert not active[:30, 1].any() and active[30:, 1].all()


def test_official_two_stage_schedule_agrees():
    """The official scheduler (SiT convention t_code = 1 - t, thresholds 1 - tau), re-derived."""
    steps, tau = (12, 5), 0.7
    times, _ = sampling.stage_schedule(steps, (tau,))
    # Official: phase 1 scale 1 runs 1 -> 1 - tau in code time; phase 2 scale 2 runs 1 -> 0 and
    # scale 1 follows t1_code = t2_code * (1 - tau).
    t1_code = np.concatenate([1 - tau * np.arange(12) / 12, (1 - tau) * (1 - np.arange(6) / 5)])
    t2_code = np.concatenate([np.ones(12), 1 - np.arange(6) / 5])
    np.testing.assert_allclose(times[:, 0], 1 - t1_code, atol=1e-12)
    np.testing.assert_allclose(times[:, 1], 1 - t2_code, atol=1e-12)


@pytest.mark.parametrize("thresholds", [(0.6, 0.8), (0.9, 0.7)])
def test_three_stage_schedule(thresholds):
    steps = (5, 4, 3)
    times, active = sampling.stage_schedule(steps, thresholds)
    bounds = (0, 5, 9, 12)
    taus = (*thresholds, 1.0)
    assert np.all(np.diff(times, axis=0) >= 0), "every scale is non-decreasing"
    np.testing.assert_array_equal(times[0], 0.0)
    np.testing.assert_array_equal(times[-1], 1.0)
    for k in range(3):
        assert times[bounds[k + 1], k] == pytest.approx(taus[k], abs=1e-15)
        np.testing.assert_array_equal(times[: bounds[k] + 1, k], 0.0)
        assert not active[: bounds[k], k].any() and active[bounds[k] :, k].all()
    # Active exactly where the time moves.
    np.testing.assert_array_equal(active, np.diff(times, axis=0) > 0)
    # Hand values: stage 1 after its phase goes tau_1 -> 1 over the remaining 7 steps.
    assert times[9, 0] == pytest.approx(taus[0] + (1 - taus[0]) * 4 / 7)
    assert times[7, 1] == pytest.approx(taus[1] * 2 / 4)
    assert times[11, 1] == pytest.approx(taus[1] + (1 - taus[1]) * 2 / 3)
    assert times[10, 2] == pytest.approx(1 / 3)


def test_single_stage_schedule_is_flow_matching():
    times, active = sampling.stage_schedule((7,), ())
    np.testing.assert_allclose(times[:, 0], np.linspace(0, 1, 8), atol=1e-15)
    assert active.shape == (7, 1) and active.all()


@pytest.mark.parametrize(
    ("steps", "thresholds", "match"),
    [
        ((30, 10), (0.0,), "inside"),
        ((30, 10), (1.0,), "inside"),
        ((30, 10), (1.2,), "inside"),
        ((30, 10), (float("nan"),), "inside"),
        ((30, 10), (), "threshold"),
        ((30,), (0.5,), "threshold"),
        ((10, 10, 10), (0.5,), "threshold"),
        ((30, 10), 0.9, "sequence"),
        ((0, 10), (0.9,), "at least one step"),
        ((-3,), (), "at least one step"),
        ((2.5,), (), "int"),
        ((True,), (), "bool"),
        ((), (), "empty"),
        (30, (), "sequence"),
    ],
)
def test_schedule_validation(steps, thresholds, match):
    with pytest.raises(ValueError, match=match):
        sampling.stage_schedule(steps, thresholds)


# --------------------------------------------------------------------------- #
# A toy velocity field, written once for numpy (reference) and jax (sampler)
# --------------------------------------------------------------------------- #

NULL = 10


def toy_velocity(xp, scales, t, mask, labels):
    """Couples scales (through masked means), depends on t and on the label."""
    batch = labels.shape[0]
    means = [xp.mean(x.reshape(batch, -1), axis=1) for x in scales]
    out = []
    for s, x in enumerate(scales):
        bshape = (batch,) + (1,) * (x.ndim - 1)
        coupling = sum(mask[:, j] * means[j] for j in range(len(scales)) if j != s)
        label_term = 0.1 * (labels.astype(t.dtype) + 1.0) * (s + 1)
        ts = t[:, s]
        v = -(1.0 + ts).reshape(bshape) * x + (0.3 * coupling + label_term - ts).reshape(bshape)
        out.append(v * mask[:, s].reshape(bshape) + (1 - mask[:, s]).reshape(bshape) * 7.0)
    return out


def jax_toy_velocity(scales, t, mask, labels):
    return toy_velocity(jnp, scales, t, mask, labels)


def spec_schedule(steps, thresholds):
    """DFM spec section 4 written out: times ``(N + 1, S)`` and active stages ``(N, S)``.

    Phase k (steps N_(k-1)..N_k) moves stage k from 0 to tau_k; afterwards it goes on
    linearly to 1 over the remaining steps; stage k is updated from step N_(k-1) on.
    """
    taus = [*thresholds, 1.0]
    bounds = [0, *np.cumsum(steps).tolist()]
    total = bounds[-1]
    times = np.zeros((total + 1, len(steps)))
    for n in range(total + 1):
        for s, (start, end) in enumerate(itertools.pairwise(bounds)):
            if start <= n <= end:
                times[n, s] = taus[s] * (n - start) / steps[s]
            elif n > end:
                times[n, s] = taus[s] + (1 - taus[s]) * (n - end) / (total - end)
    active = np.array([[n >= start for start in bounds[:-1]] for n in range(total)])
    return times, active


def test_stage_schedule_hard_coded():
    times, active = sampling.stage_schedule((2, 1, 2), (0.5, 0.8))
    expected = [
        [0.0, 0.0, 0.0],
        [0.25, 0.0, 0.0],
        [0.5, 0.0, 0.0],
        [2 / 3, 0.8, 0.0],
        [5 / 6, 0.9, 0.5],
        [1.0, 1.0, 1.0],
    ]
    np.testing.assert_allclose(times, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(active, [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    for steps, thresholds in [((6,), ()), ((5, 3), (0.7,)), ((4, 3, 2), (0.6, 0.8))]:
        got, got_active = sampling.stage_schedule(steps, thresholds)
        want, want_active = spec_schedule(steps, thresholds)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got_active, want_active)


def reference_sample(
    noise, labels, steps, thresholds, solver, cfg_scale=1.0, interval=(0.0, 1.0), pyr=None
):
    """Plain float64 loop over the spec's rules (independent of the scan implementation)."""
    times, active = spec_schedule(steps, thresholds)
    num_steps, num_stages = active.shape
    bounds = list(np.cumsum(steps))
    x = [np.asarray(e, np.float64) for e in noise]
    labels = np.asarray(labels)
    batch = labels.shape[0]
    xhats = {}

    def velocity(state, t_row, act):
        t = np.tile(t_row, (batch, 1))
        mask = np.tile(act.astype(np.float64), (batch, 1))
        v_c = toy_velocity(np, state, t, mask, labels)
        if cfg_scale == 1.0:
            return v_c
        v_u = toy_velocity(np, state, t, mask, np.full_like(labels, NULL))
        low, high = interval
        return [
            v_u[s] + cfg_scale * (v_c[s] - v_u[s]) if act[s] and low <= t_row[s] <= high else v_c[s]
            for s in range(num_stages)
        ]

    for n in range(num_steps):
        act = active[n]
        dt = times[n + 1] - times[n]
        d = velocity(x, times[n], act)
        if n in bounds[:-1]:
            k = bounds.index(n) + 1
            xhats[k] = [x[s] + (1 - times[n, s]) * d[s] for s in range(k)]
        pred = [x[s] + dt[s] * d[s] if act[s] else x[s] for s in range(num_stages)]
        if solver == "heun" and n < num_steps - 1:
            d2 = velocity(pred, times[n + 1], act)
            x = [x[s] + dt[s] * 0.5 * (d[s] + d2[s]) if act[s] else x[s] for s in range(num_stages)]
        else:
            x = pred
    if pyr is None:
        return x
    previews = [np.asarray(pyr.preview(xhats[k], k)) for k in range(1, num_stages)]
    previews.append(np.asarray(pyr.recompose(x)))
    return x, previews, [xhats[k] for k in range(1, num_stages)]


def make_noise(key, pyr, shape):
    return sampling.initial_noise(key, pyr.scale_shapes(shape))


CASES = [
    # (pyramid, steps, thresholds, solver, cfg, interval)
    (pyramid_lib.Laplacian(()), (6,), (), "euler", 1.0, (0.0, 1.0)),
    (pyramid_lib.Laplacian(()), (6,), (), "heun", 3.0, (0.0, 1.0)),
    (pyramid_lib.Laplacian((2,)), (5, 3), (0.7,), "euler", 1.0, (0.0, 1.0)),
    (pyramid_lib.Laplacian((2,)), (5, 3), (0.7,), "heun", 2.5, (0.3, 0.8)),
    (pyramid_lib.Laplacian((2,)), (4, 4), (0.9,), "euler", 2.0, (0.5, 1.0)),
    (pyramid_lib.Laplacian((2, 2)), (4, 3, 2), (0.6, 0.8), "heun", 1.0, (0.0, 1.0)),
    (pyramid_lib.HaarDWT(2), (4, 3, 2), (0.9, 0.7), "euler", 1.5, (0.0, 0.6)),
]


@pytest.mark.parametrize(("pyr", "steps", "thresholds", "solver", "cfg", "interval"), CASES)
def test_sampler_matches_reference_loop(pyr, steps, thresholds, solver, cfg, interval):
    noise = make_noise(jax.random.key(0), pyr, (3, 8, 8, 2))
    labels = jnp.array([0, 3, 7], jnp.int32)
    fn = jax.jit(
        functools.partial(
            sampling.sample,
            jax_toy_velocity,
            settings=Settings(steps, thresholds, solver, cfg, interval),
            null_label=NULL,
            return_previews=True,
        )
    )
    out, predicted = fn(noise, labels)
    ref, ref_previews, ref_predicted = reference_sample(
        noise, labels, steps, thresholds, solver, cfg, interval, pyr
    )
    assert len(out) == len(steps)
    for got, want, e in zip(out, ref, noise):
        assert got.shape == e.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # The sampler returns the predicted clean scales x_hat_1..x_hat_k, not recomposed.
    assert len(predicted) == len(steps) - 1
    for k, (got_k, want_k) in enumerate(zip(predicted, ref_predicted, strict=True), start=1):
        assert isinstance(got_k, tuple) and len(got_k) == k
        for got, want, e in zip(got_k, want_k, noise[:k], strict=True):
            assert got.shape == e.shape and got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Previews as the caller recomposes them: one per stage at that stage's resolution.
    previews = [pyr.preview(list(p), k) for k, p in enumerate(predicted, start=1)]
    previews.append(pyr.recompose(list(out)))
    assert len(previews) == len(steps)
    for k, (got, want) in enumerate(zip(previews, ref_previews), start=1):
        assert got.shape == noise[k - 1].shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(previews[-1], pyr.recompose(list(out)), rtol=1e-6, atol=1e-6)


def test_video_scales_and_no_previews():
    pyr = pyramid_lib.Laplacian((2,))
    noise = make_noise(jax.random.key(1), pyr, (2, 3, 4, 4, 1))
    labels = jnp.array([1, 2], jnp.int32)
    out = jax.jit(lambda n, y: sampling.sample(jax_toy_velocity, n, y, Settings((3, 2), (0.8,))))(
        noise, labels
    )
    assert isinstance(out, tuple) and [o.shape for o in out] == [e.shape for e in noise]
    ref = reference_sample(noise, labels, (3, 2), (0.8,), "euler")
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_inactive_scales_keep_their_noise_until_their_phase():
    """After phase 1 alone (the final stage's steps cut to 1), scale 2 is moved by one step only."""
    pyr = pyramid_lib.Laplacian((2,))
    noise = make_noise(jax.random.key(2), pyr, (2, 4, 4, 1))
    labels = jnp.zeros((2,), jnp.int32)
    seen = []

    def recording(scales, t, mask, y):
        jax.debug.callback(
            lambda x2, m: seen.append((np.asarray(x2), np.asarray(m))), scales[1], mask
        )
        return jax_toy_velocity(scales, t, mask, y)

    jax.jit(lambda n, y: sampling.sample(recording, n, y, Settings((4, 2), (0.5,))))(noise, labels)
    assert len(seen) == 6
    for n, (x2, mask) in enumerate(seen):
        np.testing.assert_array_equal(mask[:, 1], 1.0 if n >= 4 else 0.0)
        if n <= 4:  # untouched through phase 1, including the first step of phase 2
            np.testing.assert_array_equal(x2, np.asarray(noise[1]))
    assert not np.array_equal(seen[5][0], np.asarray(noise[1]))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_masked_scales_are_not_updated_even_by_non_finite_outputs(solver):
    """A network may return anything for masked scales (here NaN): it must not leak in."""

    def nan_when_masked(scales, t, mask, labels):
        out = jax_toy_velocity(scales, t, mask, labels)
        return [
            jnp.where(mask[:, s].reshape((-1,) + (1,) * (v.ndim - 1)) > 0, v, jnp.nan)
            for s, v in enumerate(out)
        ]

    pyr = pyramid_lib.Laplacian((2, 2))
    noise = make_noise(jax.random.key(4), pyr, (2, 8, 8, 1))
    labels = jnp.array([1, 2], jnp.int32)
    out, predicted = sampling.sample(
        nan_when_masked,
        noise,
        labels,
        Settings((3, 2, 2), (0.8, 0.9), solver),
        return_previews=True,
    )
    ref = reference_sample(noise, labels, (3, 2, 2), (0.8, 0.9), solver)
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert all(np.isfinite(x).all() for p in predicted for x in p)
    previews = [pyr.preview(list(p), k) for k, p in enumerate(predicted, start=1)]
    assert all(np.isfinite(p).all() for p in previews)


# --------------------------------------------------------------------------- #
# Classifier-free guidance
# --------------------------------------------------------------------------- #


def label_velocity(scales, t, mask, labels):
    """v_c = label + 1 (per example), v_u = -1 for the null class; independent of x."""
    batch = labels.shape[0]
    value = jnp.where(labels == NULL, -1.0, labels.astype(jnp.float32) + 1.0)
    return [
        jnp.broadcast_to(value.reshape((batch,) + (1,) * (x.ndim - 1)), x.shape) for x in scales
    ]


def test_guided_update_is_uncond_plus_w_times_difference():
    noise = [jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1))]
    labels = jnp.array([0, 4], jnp.int32)
    w = 3.0
    out = sampling.sample(
        label_velocity, noise, labels, Settings((1, 1), (0.5,), cfg_scale=w), null_label=NULL
    )
    v_c = np.array([1.0, 5.0])
    guided = -1.0 + w * (v_c + 1.0)
    # Scale 1: dt = 0.5 in both steps; scale 2: dt = 1 in step 2 only.
    np.testing.assert_allclose(out[0][:, 0, 0, 0], guided, rtol=1e-6)
    np.testing.assert_allclose(out[1][:, 0, 0, 0], guided, rtol=1e-6)


def test_guidance_interval_switches_guidance_off_per_scale():
    noise = [jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1))]
    labels = jnp.array([0, 4], jnp.int32)
    w = 3.0
    v_c = np.array([1.0, 5.0])
    guided = -1.0 + w * (v_c + 1.0)
    # steps (2, 2), tau 0.5: scale 1 evaluated at t = 0, .25, .5, .75; scale 2 at 0, .5.
    out = sampling.sample(
        label_velocity,
        noise,
        labels,
        Settings((2, 2), (0.5,), cfg_scale=w, guidance_interval=(0.2, 0.6)),
        null_label=NULL,
    )
    # Scale 1: steps at t = .25, .5 guided (dt .25 each), t = 0, .75 not.
    np.testing.assert_allclose(out[0][:, 0, 0, 0], 0.5 * guided + 0.5 * v_c, rtol=1e-6)
    # Scale 2: t = 0 not guided (dt .5), t = .5 guided (dt .5).
    np.testing.assert_allclose(out[1][:, 0, 0, 0], 0.5 * guided + 0.5 * v_c, rtol=1e-6)
    # An interval outside every evaluated t: no guidance at all.
    out = sampling.sample(
        label_velocity,
        noise,
        labels,
        Settings((2, 2), (0.5,), cfg_scale=w, guidance_interval=(0.95, 1.0)),
        null_label=NULL,
    )
    np.testing.assert_allclose(out[0][:, 0, 0, 0], v_c, rtol=1e-6)
    np.testing.assert_allclose(out[1][:, 0, 0, 0], v_c, rtol=1e-6)


def _trace_batches(
    cfg_scale, interval=(0.0, 1.0), steps=(3, 2), solver="euler", batching="doubled"
):
    """Batch sizes and labels of the velocity_fn calls made while tracing `sample`."""
    traced = []

    def recording(scales, t, mask, labels):
        traced.append((scales[0].shape[0], t.shape, mask.shape, labels))
        return jax_toy_velocity(scales, t, mask, labels)

    noise = [jnp.zeros((4, 2, 2, 1)), jnp.zeros((4, 4, 4, 1))]
    labels = jnp.arange(4, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(
        functools.partial(
            sampling.sample,
            recording,
            settings=Settings(steps, (0.5,), solver, cfg_scale, interval, batching),
            null_label=NULL,
        )
    )(noise, labels)
    return traced, str(jaxpr)


def test_cfg_scale_one_calls_with_batch_b_and_guided_with_2b():
    traced, _ = _trace_batches(1.0)
    assert [b for b, *_ in traced] == [4]
    assert traced[0][1] == (4, 2) and traced[0][2] == (4, 2)
    traced, _ = _trace_batches(2.0)
    assert [b for b, *_ in traced] == [8]
    # The second half of the doubled batch carries the null label (checked by value below).
    out = sampling.sample(
        lambda s, t, m, y: [
            jnp.broadcast_to(y.astype(jnp.float32).reshape(-1, 1, 1, 1), x.shape) for x in s
        ],
        [jnp.zeros((4, 2, 2, 1))],
        jnp.arange(4, dtype=jnp.int32),
        Settings((1,), (), cfg_scale=0.0),  # w = 0: the unconditional velocity alone
        null_label=NULL,
    )
    np.testing.assert_array_equal(out[0], NULL)
    # A partially-guided schedule traces both calls and switches with a cond.
    traced, jaxpr = _trace_batches(2.0, interval=(0.3, 1.0))
    assert sorted(b for b, *_ in traced) == [4, 8]
    assert "cond" in jaxpr
    # An interval that no evaluated t reaches: guidance never applies, no doubled call at all.
    traced, _ = _trace_batches(2.0, interval=(0.95, 1.0))
    assert [b for b, *_ in traced] == [4]


def test_split_guidance_calls_twice_with_b_and_matches_the_doubled_batch(monkeypatch):
    traced, _ = _trace_batches(2.0, batching="split")
    assert [b for b, *_ in traced] == [4, 4]
    # w = 0 leaves the unconditional velocity alone: the second call had the null labels.
    out = sampling.sample(
        lambda s, t, m, y: [
            jnp.broadcast_to(y.astype(jnp.float32).reshape(-1, 1, 1, 1), x.shape) for x in s
        ],
        [jnp.zeros((4, 2, 2, 1))],
        jnp.arange(4, dtype=jnp.int32),
        Settings((1,), (), cfg_scale=0.0, guidance_batching="split"),
        null_label=NULL,
    )
    np.testing.assert_array_equal(out[0], NULL)
    noise = [jax.random.normal(jax.random.key(i), (4, 2 * i + 2, 2 * i + 2, 1)) for i in range(2)]
    labels = jnp.array([0, 3, 1, 2], jnp.int32)

    def run(batching):
        settings = Settings((3, 2), (0.5,), "heun", 1.7, (0.2, 0.8), batching)
        return sampling.sample(jax_toy_velocity, noise, labels, settings, null_label=NULL)

    for split, doubled in zip(run("split"), run("doubled"), strict=True):
        np.testing.assert_allclose(np.asarray(split), np.asarray(doubled), rtol=1e-6, atol=1e-6)
    assert guidance.splits_batch("auto")  # the tests run on the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not guidance.splits_batch("auto") and guidance.splits_batch("split")
    with pytest.raises(ValueError, match="guidance_batching must be one of"):
        Settings(guidance_batching="halves")


def test_network_call_checks_the_velocities_and_returns_float32():
    x = (jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 8, 8, 1)))
    t, mask, labels = jnp.zeros(2), jnp.ones(2), jnp.zeros(2, jnp.int32)
    out = guidance.network_call(
        lambda s, *_: [e.astype(jnp.bfloat16) + 1 for e in s], x, t, mask, labels
    )
    assert [v.dtype for v in out] == [jnp.float32] * 2
    with pytest.raises(ValueError, match="must return a sequence of 2 per-scale arrays, got Array"):
        guidance.network_call(lambda s, *_: s[0], x, t, mask, labels)
    with pytest.raises(ValueError, match="must return a sequence of 2 per-scale arrays, got list"):
        guidance.network_call(lambda s, *_: [s[0]], x, t, mask, labels)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 1\) for scale 2, expected"):
        guidance.network_call(lambda s, *_: [s[0], s[0]], x, t, mask, labels)


def test_guidance_batching_defaults():
    """``guided_velocity`` doubles the batch unless told to split; ``make_evaluators``
    resolves "auto" (here, on CPU: two calls of B)."""
    calls = []

    def recording(scales, t, mask, labels):
        calls.append(scales[0].shape[0])
        return list(scales)

    x, row = (jnp.ones((3, 2, 2, 1)),), jnp.ones(1)
    both = jnp.array([0, 1, 2, NULL, NULL, NULL], jnp.int32)
    guidance.guided_velocity(recording, x, row, row, jnp.ones(1, bool), both, 2.0)
    assert calls == [6]
    (evaluate,) = guidance.make_evaluators(
        recording, both[:3], (np.array([True]),), cfg_scale=2.0, null_label=NULL
    )
    calls.clear()
    evaluate(x, row, row, jnp.ones(1, bool), jnp.array(True))
    assert calls == [3, 3]
    with pytest.raises(ValueError, match="guidance_batching must be one of"):
        guidance.splits_batch("halves")


def test_sampler_is_one_scan_with_constant_tracing():
    for solver, calls in (("euler", 1), ("heun", 2)):
        small, jaxpr_small = _trace_batches(1.0, steps=(3, 2), solver=solver)
        large, jaxpr_large = _trace_batches(1.0, steps=(30, 20), solver=solver)
        assert len(small) == len(large) == calls, "the network is traced once per solver stage"
        assert jaxpr_small.count("scan[") == 1 and jaxpr_large.count("scan[") == 1
        assert "length=50" in jaxpr_large
        # No unrolling: the program text does not grow with the number of steps.
        assert abs(len(jaxpr_large) - len(jaxpr_small)) < 0.05 * len(jaxpr_small)
    lowered = (
        jax.jit(
            functools.partial(
                sampling.sample, jax_toy_velocity, settings=Settings((30, 10), (0.9,))
            )
        )
        .lower([jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1))], jnp.zeros((2,), jnp.int32))
        .as_text()
    )
    assert "stablehlo.while" in lowered


# --------------------------------------------------------------------------- #
# NFE and validation
# --------------------------------------------------------------------------- #


def test_num_function_evaluations():
    nfe = sampling.num_function_evaluations
    assert nfe((30, 10), (0.9,)) == 40
    assert nfe((30, 10), (0.9,), solver="heun") == 79
    assert nfe((30, 10), (0.9,), cfg_scale=1.5) == 80
    assert nfe((30, 10), (0.9,), solver="heun", cfg_scale=1.5) == 158
    assert nfe((50,), ()) == 50
    # Interval [0.5, 1]: S = 1 with 4 steps evaluates at t = 0, .25, .5, .75 -> 2 guided.
    assert nfe((4,), (), cfg_scale=2.0, guidance_interval=(0.5, 1.0)) == 6
    # Heun adds correctors at t = .25, .5, .75 -> 1 unguided + 2 guided.
    assert nfe((4,), (), "heun", 2.0, (0.5, 1.0)) == 6 + 5
    # Only updated scales count: steps (5, 3), tau 0.6, interval [0, 0.2]. Scale 1 is in it at
    # steps 0, 1 (t = 0, .12), scale 2 at step 5 (t = 0); its t = 0 during phase 1 does not count.
    assert nfe((5, 3), (0.6,), cfg_scale=2.0, guidance_interval=(0.0, 0.2)) == 8 + 3
    assert nfe((1,), (), "heun") == 1


@pytest.mark.parametrize(
    ("solver", "cfg", "interval"),
    [("euler", 1.0, (0, 1)), ("heun", 2.0, (0, 1)), ("heun", 2.0, (0.3, 0.7))],
)
def test_nfe_counts_actual_evaluations(solver, cfg, interval):
    batch, counted = 3, []

    def counting(scales, t, mask, labels):
        jax.debug.callback(lambda y: counted.append(y.shape[0]), labels)
        return jax_toy_velocity(scales, t, mask, labels)

    noise = [jnp.zeros((batch, 2, 2, 1)), jnp.zeros((batch, 4, 4, 1))]
    jax.jit(
        lambda n, y: sampling.sample(
            counting, n, y, Settings((5, 3), (0.6,), solver, cfg, interval), null_label=NULL
        )
    )(noise, jnp.zeros((batch,), jnp.int32))
    jax.effects_barrier()
    expected = sampling.num_function_evaluations((5, 3), (0.6,), solver, cfg, interval)
    assert sum(counted) == expected * batch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "rk4"}, "solver"),
        ({"cfg_scale": 2.0}, "null_label"),
        ({"guidance_interval": (0.8, 0.2)}, "low <= high"),
        ({"guidance_interval": (0.1,)}, "pair"),
        ({"thresholds": (0.9, 0.95)}, "threshold"),
        ({"steps_per_stage": (4,), "thresholds": ()}, "noise has 2 scales"),
        ({"labels": jnp.zeros((3,), jnp.int32)}, "labels"),
        ({"noise": jnp.zeros((2, 4, 4, 1))}, "one array per scale"),
        ({"noise": [jnp.zeros((2, 2, 2, 1)), jnp.zeros((3, 4, 4, 1))]}, "batch"),
        ({"noise": [jnp.zeros((2, 2, 2)), jnp.zeros((2, 4, 4, 1))]}, "shape"),
    ],
)
def test_sample_validation_before_tracing(kwargs, match):
    def never(*args):
        raise AssertionError("velocity_fn must not be traced for invalid arguments")

    args = {
        "noise": [jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1))],
        "labels": jnp.zeros((2,), jnp.int32),
        "steps_per_stage": (3, 2),
        "thresholds": (0.9,),
    }
    args.update(kwargs)
    noise, labels = args.pop("noise"), args.pop("labels")
    options = {k: args.pop(k) for k in ("null_label", "return_previews") if k in args}
    with pytest.raises(ValueError, match=match):
        sampling.sample(never, noise, labels, Settings(**args), **options)


def test_velocity_fn_output_is_checked():
    with pytest.raises(ValueError, match="expected"):
        sampling.sample(
            lambda s, t, m, y: [s[0], s[0]],
            [jnp.zeros((2, 2, 2, 1)), jnp.zeros((2, 4, 4, 1))],
            jnp.zeros((2,), jnp.int32),
            Settings((2, 2), (0.5,)),
        )


def test_sample_needs_sampler_settings():
    with pytest.raises(TypeError, match="SamplerSettings"):
        sampling.sample(
            jax_toy_velocity,
            [jnp.zeros((2, 2, 2, 1))],
            jnp.zeros((2,), jnp.int32),
            {"steps_per_stage": (2,), "thresholds": ()},
        )


# --------------------------------------------------------------------------- #
# SamplerSettings
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps_per_stage": 30}, r"^steps_per_stage must be a sequence"),
        ({"steps_per_stage": ()}, r"^steps_per_stage is empty"),
        ({"steps_per_stage": (0, 10)}, r"^steps_per_stage\[0\] = 0: every stage"),
        ({"steps_per_stage": (2.5,), "thresholds": ()}, r"^steps_per_stage\[0\] must be an int"),
        ({"steps_per_stage": (True,), "thresholds": ()}, r"^steps_per_stage\[0\] is a bool"),
        ({"thresholds": 0.9}, r"^thresholds must be a sequence"),
        ({"thresholds": (0.9, 0.95)}, r"^thresholds: 2 stage\(s\) need 1 threshold"),
        ({"thresholds": ("a",)}, r"^thresholds\[0\] must be a float"),
        ({"thresholds": (1.2,)}, r"^thresholds\[0\] = 1\.2 must lie strictly inside \(0, 1\)"),
        ({"solver": "rk4"}, r"^solver must be one of \('euler', 'heun'\), got 'rk4'"),
        ({"cfg_scale": "big"}, r"^cfg_scale must be a float"),
        ({"cfg_scale": float("inf")}, r"^cfg_scale must be finite"),
        ({"guidance_interval": (0.8, 0.2)}, r"^guidance_interval must satisfy low <= high"),
        ({"guidance_interval": (0.1,)}, r"^guidance_interval must be a pair"),
    ],
)
def test_sampler_settings_validation_messages_start_with_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_sampler_settings_normalise_count_and_subclass():
    settings = Settings([30, np.int64(10)], [0.9], "heun", 2, [0, 1])
    assert settings == Settings((30, 10), (0.9,), "heun", 2.0, (0.0, 1.0))
    assert hash(settings) == hash(Settings((30, 10), (0.9,), "heun", 2.0, (0.0, 1.0)))
    assert settings.steps_per_stage == (30, 10) and type(settings.steps_per_stage[1]) is int
    assert type(settings.thresholds[0]) is float and type(settings.cfg_scale) is float
    assert settings.guidance_interval == (0.0, 1.0)
    assert settings.num_stages == 2
    assert settings.nfe == sampling.num_function_evaluations((30, 10), (0.9,), "heun", 2.0) == 158
    assert Settings() == Settings((30, 10), (0.9,), "euler", 1.0, (0.0, 1.0))
    assert Settings().nfe == 40
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.solver = "euler"

    @dataclasses.dataclass(frozen=True)
    class WithGrid(Settings):
        grid_classes: int = 10

    grid = WithGrid(steps_per_stage=[4], thresholds=[], grid_classes=3)
    assert grid.steps_per_stage == (4,) and grid.nfe == 4 and grid.grid_classes == 3
    with pytest.raises(ValueError, match=r"^thresholds\[0\]"):
        WithGrid(thresholds=(2.0,))
    out = sampling.sample(jax_toy_velocity, [jnp.zeros((2, 2, 2, 1))], jnp.zeros((2,)), grid)
    assert out[0].shape == (2, 2, 2, 1)
    # The public names stay importable from `sampling`.
    assert sampling.SOLVERS == ("euler", "heun") == tuple(solvers.SOLVERS)
    assert sampling.stage_schedule is schedule.stage_schedule


def test_check_num_scales():
    settings = Settings((3, 2), (0.9,))
    settings.check_num_scales(2)
    with pytest.raises(ValueError, match=r"^steps_per_stage \(3, 2\) describes 2 .* has 3 scales"):
        settings.check_num_scales(3)
    with pytest.raises(ValueError, match="the pyramid has 3 scales"):
        settings.check_num_scales(3, what="the pyramid")


# --------------------------------------------------------------------------- #
# Previews: predicted scales from the sampler, recomposed by the caller
# --------------------------------------------------------------------------- #


class ToyNetwork(nn.Module):
    """A flax module without parameters around the toy velocity field."""

    @nn.compact
    def __call__(self, scales, t, mask, labels):
        return jax_toy_velocity(scales, t, mask, labels)


def test_previews_are_predicted_scales_and_generation_recomposes_them():
    pyr = pyramid_lib.Laplacian((2, 2))
    steps, thresholds, solver, cfg, interval = (3, 2, 2), (0.8, 0.9), "heun", 2.0, (0.0, 0.9)
    settings = Settings(steps, thresholds, solver, cfg, interval)
    key, labels = jax.random.key(7), jnp.array([1, 4], jnp.int32)
    noise = sampling.initial_noise(key, pyr.scale_shapes((2, 8, 8, 2)))
    final, predicted = jax.jit(
        functools.partial(
            sampling.sample,
            jax_toy_velocity,
            settings=settings,
            null_label=NULL,
            return_previews=True,
        )
    )(noise, labels)
    # previews[k - 1] are x_hat_1 .. x_hat_k = x_s + (1 - t_s) v_s at tau_k, per scale.
    _, ref_previews, ref_predicted = reference_sample(
        noise, labels, steps, thresholds, solver, cfg, interval, pyr
    )
    assert [tuple(x.shape for x in p) for p in predicted] == [
        tuple(e.shape for e in noise[:k]) for k in (1, 2)
    ]
    for got_k, want_k in zip(predicted, ref_predicted, strict=True):
        for got, want in zip(got_k, want_k, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    recomposed = [pyr.preview(list(p), k) for k, p in enumerate(predicted, start=1)]
    recomposed.append(pyr.recompose(list(final)))
    for got, want in zip(recomposed, ref_previews, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    # Generation (as the trainer and evaluation call it) recomposes exactly these.
    generate = generation.make_generate_fn(toy_method(pyr, (8, 8, 2)), settings, previews=True)
    images, previews = generate({}, key, labels)
    assert len(previews) == len(steps)
    for got, want in zip(previews, recomposed, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(images, previews[-1])
    plain = generation.make_generate_fn(toy_method(pyr, (8, 8, 2)), settings)
    np.testing.assert_allclose(plain({}, key, labels), images, rtol=1e-6, atol=1e-6)


def toy_method(pyr, example_shape):
    """DFM around the parameter-free ``ToyNetwork``, with null label ``NULL``."""
    probs = (1.0 / pyr.num_scales,) * pyr.num_scales
    return methods.DecomposableFlowMatching(
        model=ToyNetwork(),
        decomposition=pyr,
        objective=objective.ObjectiveConfig(stage_probs=probs),
        example_shape=example_shape,
        num_classes=NULL,
    )


def test_generation_checks_stages_against_the_decomposition():
    generate = generation.make_generate_fn(
        toy_method(pyramid_lib.Laplacian((2, 2)), (8, 8, 1)), Settings((3, 2), (0.9,))
    )
    with pytest.raises(ValueError, match="has 3 scales"):
        generate({}, jax.random.key(0), jnp.zeros((2,), jnp.int32))


# --------------------------------------------------------------------------- #
# Exactness on Gaussian data with the analytic velocity field
# --------------------------------------------------------------------------- #


def smooth_covariance(height, width, length_scale=2.0, nugget=0.05):
    """Squared-exponential kernel over the pixel grid plus a small white-noise term."""
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * dist2 / length_scale**2) + nugget * np.eye(height * width)


class GaussianScales:
    """X ~ N(mu, Sigma) on (H, W, 1) images, seen through a (linear) decomposition.

    Z = P X (all scales, flattened and concatenated coarsest first) is Gaussian with
    mean P mu and covariance C = P Sigma P^T (singular when the pyramid is
    overcomplete, as the Laplacian is). At per-scale times t (D_t: t_s on scale s's
    entries) the noisy vector is Y = D_t Z + D_(1-t) eps and the exact velocity is

      E[Z - eps | Y] = m + (C D_t - D_(1-t)) K^-1 (Y - D_t m),  K = D_t C D_t + D_(1-t)^2,

    evaluated in float64 numpy through ``jax.pure_callback``. K is invertible as long
    as no scale sits at t = 1, which neither solver evaluates.
    """

    def __init__(self, pyr, height, width, mu, sigma):
        self.pyr = pyr
        d = height * width
        basis = pyr.decompose(jnp.eye(d, dtype=jnp.float32).reshape(d, height, width, 1))
        self.shapes = [tuple(b.shape[1:]) for b in basis]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        # Row-vector convention: Z = X @ PT. Entries are dyadic, exact in float32.
        self.pt = np.concatenate([np.asarray(b, np.float64).reshape(d, -1) for b in basis], 1)
        total = self.pt.shape[1]
        unit = np.eye(total, dtype=np.float32)
        self.rt = np.asarray(  # X = Z @ RT
            pyr.recompose(list(self.split(jnp.asarray(unit)))), np.float64
        ).reshape(total, d)
        self.mu, self.sigma = mu, sigma
        self.mean = mu @ self.pt
        self.cov = self.pt.T @ sigma @ self.pt
        self.calls = []

    def split(self, flat):
        batch = flat.shape[0]
        parts = np.split(np.arange(flat.shape[1]), np.cumsum(self.sizes)[:-1])
        return [flat[:, p[0] : p[-1] + 1].reshape((batch, *s)) for p, s in zip(parts, self.shapes)]

    def flatten(self, scales):
        return jnp.concatenate([x.reshape(x.shape[0], -1) for x in scales], axis=1)

    def host_velocity(self, y, t):
        y, t = np.asarray(y, np.float64), np.asarray(t, np.float64)
        t_row = t[0]
        assert np.all(t == t_row), "the sampler gives every example the same times"
        assert np.all(t_row < 1.0), "the exact field is never evaluated at t = 1"
        self.calls.append(y.shape[0])
        tv = np.repeat(t_row, self.sizes)
        k = tv[:, None] * self.cov * tv[None, :] + np.diag((1.0 - tv) ** 2)
        # Row form of the formula (K symmetric): v = m + (Y - D_t m) K^-1 (D_t C - D_(1-t)).
        gain = np.linalg.solve(k, tv[:, None] * self.cov - np.diag(1.0 - tv))
        v = self.mean + (y - tv * self.mean) @ gain
        return v.astype(np.float32)

    def velocity_fn(self, scales, t, mask, labels):
        del mask, labels  # masked scales are never updated; the data is unconditional
        flat = self.flatten(scales)
        out = jax.pure_callback(
            self.host_velocity, jax.ShapeDtypeStruct(flat.shape, jnp.float32), flat, t
        )
        return self.split(out)

    def run(self, noise_flat, steps, thresholds, solver):
        noise = self.split(jnp.asarray(noise_flat, jnp.float32))
        fn = jax.jit(
            functools.partial(
                sampling.sample, self.velocity_fn, settings=Settings(steps, thresholds, solver)
            )
        )
        out = fn(noise, jnp.zeros((noise_flat.shape[0],), jnp.int32))
        return np.asarray(self.flatten(out), np.float64)

    def exact_moments(self, steps, thresholds, solver):
        """Mean and covariance of the sampler's output distribution, without Monte Carlo.

        With an affine velocity field each solver step is affine in the state, so the
        whole sampler is Z_out = A eps + b: run it on eps = 0 and on every unit vector.
        """
        total = self.pt.shape[1]
        probes = np.concatenate([np.zeros((1, total)), np.eye(total)])
        out = self.run(probes, steps, thresholds, solver)
        b, cols = out[0], out[1:] - out[0]
        return b, cols.T @ cols

    def errors(self, mean, cov):
        """Max abs error per scale (relative to the scale's max variance), joint and image."""
        edges = np.cumsum([0, *self.sizes])
        rel = []
        for lo, hi in itertools.pairwise(edges):
            scale = np.abs(self.cov[lo:hi, lo:hi]).max()
            rel.append(
                (
                    np.abs(mean[lo:hi] - self.mean[lo:hi]).max() / np.sqrt(scale),
                    np.abs(cov[lo:hi, lo:hi] - self.cov[lo:hi, lo:hi]).max() / scale,
                )
            )
        joint = np.abs(cov - self.cov).max() / np.abs(self.cov).max()
        image_cov = self.rt.T @ cov @ self.rt
        image = np.abs(image_cov - self.sigma).max() / np.abs(self.sigma).max()
        image_mean = np.abs(mean @ self.rt - self.mu).max() / np.sqrt(np.abs(self.sigma).max())
        return rel, joint, image, image_mean


SIZE = 8
MU = 0.5 * np.sin(np.arange(SIZE * SIZE) / 5.0)
SIGMA = smooth_covariance(SIZE, SIZE)

# Tolerances on every relative error of `GaussianScales.errors` (mean and covariance of each
# scale, joint covariance, recomposed image covariance and mean). Measured errors (8x8 image,
# float32 state) are about half of these: Euler 1.5e-2 (S = 1), 2.6e-2 (S = 2), 3.6e-2 (S = 3,
# finest scale); Heun 3.9e-3 (S = 1), 1.6e-2 (S = 2 and 3, finest scale), below 1e-3 for the
# coarser scales. The finest scale needs the most steps: it has the smallest variance, and the
# exact field stiffens near t = 1 on a time scale of about its standard deviation.
EULER_TOL, HEUN_TOL = 6e-2, 3e-2
L1, L2, L3 = pyramid_lib.Laplacian(()), pyramid_lib.Laplacian((2,)), pyramid_lib.Laplacian((2, 2))
GAUSSIAN_CASES = [
    (L1, (256,), (), "euler", EULER_TOL),
    (L1, (32,), (), "heun", HEUN_TOL),
    (L2, (160, 96), (0.9,), "euler", EULER_TOL),
    (L2, (24, 16), (0.9,), "heun", HEUN_TOL),
    (L3, (128, 96, 64), (0.7, 0.8), "euler", EULER_TOL),
    (L3, (32, 24, 16), (0.9, 0.7), "heun", HEUN_TOL),
    (pyramid_lib.HaarDWT(2), (32, 24, 16), (0.9, 0.7), "heun", HEUN_TOL),
]


@pytest.mark.parametrize(("pyr", "steps", "thresholds", "solver", "tol"), GAUSSIAN_CASES)
def test_exact_gaussian_moments(pyr, steps, thresholds, solver, tol):
    gauss = GaussianScales(pyr, SIZE, SIZE, MU, SIGMA)
    mean, cov = gauss.exact_moments(steps, thresholds, solver)
    rel, joint, image, image_mean = gauss.errors(mean, cov)
    for s, (mean_err, cov_err) in enumerate(rel):
        assert mean_err < tol, f"scale {s + 1} mean error {mean_err:.2e}"
        assert cov_err < tol, f"scale {s + 1} covariance error {cov_err:.2e}"
    assert joint < tol, f"joint covariance error {joint:.2e}"
    assert image < tol and image_mean < tol, f"image errors {image:.2e} {image_mean:.2e}"
    assert len(gauss.calls) == sampling.num_function_evaluations(steps, thresholds, solver)


def test_gaussian_errors_shrink_at_solver_order():
    """Doubling the steps divides the error by 2 for Euler and 4 for Heun (measured 1.97, 4.08)."""
    gauss = GaussianScales(L3, SIZE, SIZE, MU, SIGMA)

    def error(factor, solver):
        steps = tuple(factor * n for n in (8, 6, 4))
        _, cov = gauss.exact_moments(steps, (0.9, 0.7), solver)
        return np.abs(cov - gauss.cov).max()

    euler = error(4, "euler") / error(8, "euler")
    heun = error(2, "heun") / error(4, "heun")
    assert 1.8 < euler < 2.2, euler
    assert 3.6 < heun < 4.6, heun


def test_gaussian_monte_carlo_samples():
    """Random noise through the sampler: sample moments within Monte-Carlo error."""
    gauss = GaussianScales(L3, SIZE, SIZE, MU, SIGMA)
    num = 4096
    noise = np.asarray(jax.random.normal(jax.random.key(0), (num, gauss.pt.shape[1])), np.float64)
    z = gauss.run(noise, (32, 24, 16), (0.9, 0.7), "heun")
    rel, joint, image, image_mean = gauss.errors(z.mean(0), np.cov(z, rowvar=False))
    # Standard error of a covariance entry is up to sqrt(2 / num) = 0.022 of the scale's
    # variance, of a mean entry 1 / sqrt(num) = 0.016 of its std; the maximum over ~3500
    # entries reaches ~3.5 standard errors (measured over seeds: <= 0.074 and <= 0.043).
    for mean_err, cov_err in rel:
        assert mean_err < 0.08 and cov_err < 0.1
    assert joint < 0.1 and image < 0.1 and image_mean < 0.08
    # The recomposed samples follow the image distribution: check Sigma directly too.
    x = z @ gauss.rt
    np.testing.assert_allclose(np.cov(x, rowvar=False), SIGMA, atol=0.1)

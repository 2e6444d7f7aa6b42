"""Tests for dfm_jax.method.pyramidal: formulas, block noise, the jump, exact sampling.

The distribution tests use Gaussian data X ~ N(mu, Sigma) on 8x8 one-channel images, for
which every stage's clean latent x_k = D_k X (successive 2x2 means) and the exact stage
velocity E[x_end - x_start | x_tau] are analytic (``GaussianStages``), as the DFM
sampler's tests (tests/test_sampling.py) do.
"""

from __future__ import annotations

import functools
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from dfm_jax.method import pyramidal, sampling
from dfm_jax.models import dit

SIZE = 8
GAMMA = 1.0 / 3.0


def smooth_covariance(size, length_scale=2.0, nugget=0.05):
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * dist2 / length_scale**2) + nugget * np.eye(size * size)


MU = 0.5 * np.sin(np.arange(SIZE * SIZE) / 5.0)
SIGMA = smooth_covariance(SIZE)


# --------------------------------------------------------------------------- formulas


def test_schedule_matches_the_pyramid_flow_code():
    """Corrected starts and model-time windows re-derived in the code's sigma convention."""
    sched = pyramidal.PyramidalSchedule(3)
    assert sched.boundaries == pytest.approx((1 / 3, 2 / 3))
    ori_start_sigmas = [1.0, 2 / 3, 1 / 3]  # sigma = 1 - t; end sigma of stage k = start of k+1
    end_sigmas = [2 / 3, 1 / 3, 0.0]
    start_sigmas = [1.0]
    for ori in ori_start_sigmas[1:]:  # scheduling_flow_matching.init_sigmas_for_each_stage
        ori_sigma = 1 - ori
        corrected = ori_sigma / (math.sqrt(1 + 1 / GAMMA) * (1 - ori_sigma) + ori_sigma)
        start_sigmas.append(1 - corrected)
    distance = [a - b for a, b in zip(start_sigmas, end_sigmas, strict=True)]
    ratios = np.concatenate([[0.0], np.cumsum(distance) / sum(distance)])
    for k in range(3):
        assert sched.corrected_start(k) == pytest.approx(1 - start_sigmas[k], abs=1e-12)
        assert sched.end(k) == pytest.approx(1 - end_sigmas[k], abs=1e-12)
    np.testing.assert_allclose(sched.model_time_edges(), ratios, atol=1e-12)
    # The pipeline's jump constants (generate_one_unit), with ori_sigma = 1 - ori_start_sigma.
    for k in (1, 2):
        s = 1 - ori_start_sigmas[k]
        alpha = 1 / (math.sqrt(1 + 1 / GAMMA) * (1 - s) + s)
        assert sched.alpha(k) == pytest.approx(alpha) and sched.beta(k) == pytest.approx(
            alpha * (1 - s) / math.sqrt(GAMMA)
        )
        # Signal alpha s = s', white-noise std alpha (1 - s) sqrt(1 + 1/gamma) = 1 - s'.
        assert alpha * s == pytest.approx(sched.corrected_start(k))
        noise_std = alpha * (1 - s) * math.sqrt(1 + 1 / GAMMA)
        assert noise_std == pytest.approx(1 - sched.corrected_start(k))
    assert sched.model_time(1, 0.0) == pytest.approx(ratios[1])
    assert sched.model_time(2, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2, 0.05])
def test_paper_form_of_the_jump_is_the_same_map(gamma):
    """Paper eqs. 25-27 (gamma_paper = -gamma): e from s', then (s'/e) up(x) + a n'."""
    sched = pyramidal.PyramidalSchedule(3, (0.3, 0.7), gamma)
    for k in (1, 2):
        s_new, e = sched.corrected_start(k), sched.start(k)
        paper_e = (
            s_new
            * math.sqrt(1 + gamma)
            / ((1 - s_new) * math.sqrt(gamma) + s_new * math.sqrt(1 + gamma))
        )
        assert paper_e == pytest.approx(e, abs=1e-12)
        assert s_new / e == pytest.approx(sched.alpha(k), abs=1e-12)
        assert (1 - s_new) / math.sqrt(1 + gamma) == pytest.approx(sched.beta(k), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_stages": 1}, "num_stages"),
        ({"num_stages": 3, "boundaries": (0.5,)}, "2 boundaries"),
        ({"num_stages": 3, "boundaries": (0.6, 0.4)}, "increase"),
        ({"num_stages": 2, "boundaries": (1.0,)}, "increase"),
        ({"num_stages": 2, "gamma": 0.5}, "gamma"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyramidal.PyramidalSchedule(**kwargs)


def _blocks(x):
    """(N, H, W, 1) -> (N * H/2 * W/2, 4): the 2x2 blocks as rows."""
    n, h, w, _ = x.shape
    return np.asarray(x).reshape(n, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_covariance(gamma):
    """Every 2x2 block ~ N(0, (1 + gamma) I - gamma 11^T); blocks independent."""
    noise = pyramidal.block_noise(jax.random.key(0), (4096, 4, 4, 1), gamma)
    blocks = _blocks(noise)  # 16384 blocks
    expected = (1 + gamma) * np.eye(4) - gamma * np.ones((4, 4))
    # Standard error of a covariance entry <= sqrt(2 / 16384) = 0.011; 4.5 of them.
    np.testing.assert_allclose(np.cov(blocks, rowvar=False), expected, atol=0.05)
    np.testing.assert_allclose(blocks.mean(0), 0.0, atol=0.035)
    neighbours = np.asarray(noise)[:, :, 1, 0] * np.asarray(noise)[:, :, 2, 0]  # across blocks
    assert abs(neighbours.mean()) < 0.035
    if gamma == 1 / 3:  # rank 3: the block mean is exactly zero
        np.testing.assert_allclose(blocks.mean(1), 0.0, atol=1e-6)


def test_noise_pyramid_is_white_at_every_level():
    noise = jax.random.normal(jax.random.key(1), (8192, SIZE, SIZE, 1))
    for level in pyramidal.noise_pyramid(noise, 3):
        flat = np.asarray(level).reshape(level.shape[0], -1)
        np.testing.assert_allclose(np.cov(flat, rowvar=False), np.eye(flat.shape[1]), atol=0.07)


# --------------------------------------------------------------------------- Gaussian data


def _stage_matrices(num_stages):
    """D_k (d_k x d): x_k = D_k X for images flattened row-major; and nearest-up U_k."""
    eye = jnp.eye(SIZE * SIZE, dtype=jnp.float32).reshape(-1, SIZE, SIZE, 1)
    levels = pyramidal.clean_pyramid(eye, num_stages)
    downs = [np.asarray(x, np.float64).reshape(SIZE * SIZE, -1).T for x in levels]
    ups = [None]
    for k in range(1, num_stages):
        d = downs[k - 1].shape[0]
        basis = jnp.eye(d, dtype=jnp.float32).reshape(d, *levels[k - 1].shape[1:])
        ups.append(np.asarray(pyramidal.nearest_up(basis), np.float64).reshape(d, -1).T)
    return downs, ups


def _sample_data(key, n, num_stages):
    chol = np.linalg.cholesky(SIGMA)
    z = np.asarray(jax.random.normal(key, (n, SIZE * SIZE)), np.float64)
    x = jnp.asarray((MU + z @ chol.T).reshape(n, SIZE, SIZE, 1), jnp.float32)
    return pyramidal.clean_pyramid(x, num_stages)


def _moment_errors(samples, mean, cov):
    flat = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
    scale = np.abs(cov).max()
    mean_err = np.abs(flat.mean(0) - mean).max() / np.sqrt(scale)
    return mean_err, np.abs(np.cov(flat, rowvar=False) - cov).max() / scale


# Monte Carlo with 16384 samples: a covariance entry's standard error is about
# sqrt(2 / 16384) = 0.011 of the variance, a mean entry's 0.008 of the std; the maxima over
# the ~2000 entries stay below ~4.5 standard errors.
MC_SAMPLES, MC_COV_TOL, MC_MEAN_TOL = 16384, 0.06, 0.045


@pytest.mark.parametrize(("num_stages", "k"), [(2, 1), (3, 1), (3, 2)])
def test_jump_lands_on_the_next_stage_training_start(num_stages, k):
    """end of stage k-1 (training end point) -> jump -> distributed as stage k's start point."""
    sched = pyramidal.PyramidalSchedule(num_stages)
    downs, ups = _stage_matrices(num_stages)
    clean = _sample_data(jax.random.key(2), MC_SAMPLES, num_stages)
    noise = pyramidal.noise_pyramid(
        jax.random.normal(jax.random.key(3), (MC_SAMPLES, SIZE, SIZE, 1)), num_stages
    )
    coarser = clean[k - 2] if k >= 2 else None
    _, end = pyramidal.training_points(k - 1, clean[k - 1], coarser, noise[k - 1], sched)
    block = pyramidal.block_noise(jax.random.key(4), clean[k].shape, GAMMA)
    jumped = pyramidal.jump(end, block, k, sched)
    # Stage k's start point: s' U D_(k-1) X + (1 - s') n, n white.
    s = sched.corrected_start(k)
    lift = ups[k] @ downs[k - 1]
    mean = s * lift @ MU
    cov = s**2 * lift @ SIGMA @ lift.T + (1 - s) ** 2 * np.eye(lift.shape[0])
    mean_err, cov_err = _moment_errors(jumped, mean, cov)
    assert mean_err < MC_MEAN_TOL and cov_err < MC_COV_TOL, (mean_err, cov_err)
    # The implemented training start point has the same distribution (same tolerance).
    start, _ = pyramidal.training_points(k, clean[k], clean[k - 1], noise[k], sched)
    assert max(_moment_errors(start, mean, cov)) < MC_COV_TOL
    # The test has power: the jump without its re-noising is far off.
    naive = pyramidal.nearest_up(end)
    assert _moment_errors(naive, mean, cov)[1] > 5 * MC_COV_TOL


class GaussianStages:
    """The exact stage velocity for X ~ N(MU, SIGMA) (column vectors, float64).

    At stage k: ``x_tau = a n + L X`` and ``v = (s' - e) n + M X`` with ``a = (1 - tau)
    (1 - s') + tau (1 - e)``, ``L = (1 - tau) s' U D_(k-1) + tau e D_k`` and ``M = e D_k -
    s' U D_(k-1)``, so ``E[v | x] = M mu + Cov(v, x) Cov(x)^-1 (x - L mu)``.
    """

    def __init__(self, num_stages):
        self.sched = pyramidal.PyramidalSchedule(num_stages)
        self.downs, self.ups = _stage_matrices(num_stages)
        self.calls = 0

    def operators(self, k, tau):
        s, e = self.sched.corrected_start(k), self.sched.end(k)
        lift = self.ups[k] @ self.downs[k - 1] if k else np.zeros_like(self.downs[k])
        a = (1 - tau) * (1 - s) + tau * (1 - e)
        return (
            a,
            s - e,
            (1 - tau) * s * lift + tau * e * self.downs[k],
            e * self.downs[k] - s * lift,
        )

    def host_velocity(self, k, x, tau):
        x, tau = np.asarray(x, np.float64), np.asarray(tau, np.float64)
        assert (np.all(tau == tau[0]) and tau[0] < 1.0) or k < self.sched.num_stages - 1
        self.calls += 1
        a, c, lin, m = self.operators(k, float(tau[0]))
        flat = x.reshape(x.shape[0], -1)
        cov_x = a * a * np.eye(lin.shape[0]) + lin @ SIGMA @ lin.T
        cov_xv = a * c * np.eye(lin.shape[0]) + lin @ SIGMA @ m.T
        v = m @ MU + (flat - lin @ MU) @ np.linalg.solve(cov_x, cov_xv)
        return v.reshape(x.shape).astype(np.float32)

    def velocity_fn(self, k, x, tau, labels):
        del labels
        return jax.pure_callback(
            functools.partial(self.host_velocity, k),
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            x,
            tau,
        )

    def exact_moments(self, steps, solver):
        """The sampler is affine in its noises: probe it with zero and unit noises."""
        shapes = pyramidal.stage_shapes((1, SIZE, SIZE, 1), self.sched.num_stages)
        sizes = [math.prod(s) for s in shapes]
        probes = np.concatenate([np.zeros((1, sum(sizes))), np.eye(sum(sizes))])
        offsets = np.cumsum([0, *sizes])
        noise = [
            jnp.asarray(probes[:, lo:hi].reshape(-1, *shape[1:]), jnp.float32)
            for lo, hi, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
        ]
        settings = sampling.SamplerSettings(steps, self.sched.boundaries, solver=solver)
        run = jax.jit(
            lambda n: pyramidal.sample(
                self.velocity_fn, n, jnp.zeros(len(probes), jnp.int32), settings, self.sched
            )[-1]
        )
        out = np.asarray(run(noise), np.float64).reshape(len(probes), -1)
        b, cols = out[0], out[1:] - out[0]
        input_cov = np.zeros((sum(sizes), sum(sizes)))
        input_cov[: sizes[0], : sizes[0]] = np.eye(sizes[0])
        for k in range(1, len(sizes)):  # block noise: per 2x2 block (1 + g) I - g 11^T
            same = _same_block(shapes[k][1], shapes[k][2])
            lo, hi = offsets[k], offsets[k + 1]
            input_cov[lo:hi, lo:hi] = (1 + GAMMA) * np.eye(sizes[k]) - GAMMA * same
        return b, cols.T @ input_cov @ cols


def _same_block(h, w):
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (rows // 2 * (w // 2) + cols // 2).ravel()
    return (block[:, None] == block[None, :]).astype(np.float64)


# Discretisation errors of the exact-velocity sampler (relative to max |Sigma|), measured:
# Heun (12, 12) 5.7e-3, (12, 12, 12) 3.4e-3; Euler (64, 64) 2.5e-2; training the stages from
# the UNcorrected start s_k instead of s'_k gives 0.30 (Heun, K = 3): the correction matters.
@pytest.mark.parametrize(
    ("num_stages", "steps", "solver", "tol"),
    [(2, (12, 12), "heun", 2e-2), (3, (12, 12, 12), "heun", 2e-2), (2, (64, 64), "euler", 5e-2)],
)
def test_exact_velocity_sampling_reproduces_the_data(num_stages, steps, solver, tol):
    gauss = GaussianStages(num_stages)
    mean, cov = gauss.exact_moments(steps, solver)
    scale = np.abs(SIGMA).max()
    assert np.abs(cov - SIGMA).max() / scale < tol
    assert np.abs(mean - MU).max() / np.sqrt(scale) < tol


# --------------------------------------------------------------------------- the method


def _method(num_stages=2, boundaries=None):
    model = dit.DiT(
        dit.dit_config(
            "S", patch_sizes=(1,), in_channels=1, num_classes=3, depth=1, width=32, num_heads=2
        )
    )
    return pyramidal.PyramidalFlow(
        model=model,
        schedule=pyramidal.PyramidalSchedule(num_stages, boundaries),
        example_shape=(SIZE, SIZE, 1),
        num_classes=3,
        label_dropout=0.0,
    )


def test_loss_is_the_stage_objective_on_the_model():
    """Part k of the batch: MSE of the DiT at stage k's resolution against x_end - x_start."""
    method = _method(2)
    params = train_utils.random_params(method)
    images = jax.random.normal(jax.random.key(3), (4, SIZE, SIZE, 1))
    labels = jnp.asarray([0, 1, 2, 0], jnp.int32)
    key = jax.random.key(7)
    loss, metrics = jax.jit(method.loss)(params, images, labels, key)
    key_noise, key_tau, _ = jax.random.split(key, 3)
    clean = pyramidal.clean_pyramid(images, 2)
    noise = pyramidal.noise_pyramid(jax.random.normal(key_noise, images.shape), 2)
    errors, apply = [], jax.jit(method.model.apply)
    for k in range(2):
        rows = slice(2 * k, 2 * k + 2)
        coarser = clean[k - 1][rows] if k else None
        start, end = pyramidal.training_points(
            k, clean[k][rows], coarser, noise[k][rows], method.schedule
        )
        tau = jax.random.uniform(jax.random.fold_in(key_tau, k), (2,))
        x = (1 - tau[:, None, None, None]) * start + tau[:, None, None, None] * end
        t = method.schedule.model_time(k, tau)
        assert np.all((t >= method.schedule.model_time_edges()[k]) & (t <= 1.0))
        pred = apply({"params": params}, (x,), t[:, None], jnp.ones((2, 1)), labels[rows])[0]
        assert pred.shape == (2, SIZE // 2 ** (1 - k), SIZE // 2 ** (1 - k), 1)
        errors.append(np.mean((np.asarray(pred) - np.asarray(end - start)) ** 2))
        np.testing.assert_allclose(metrics[f"loss_stage{k + 1}"], errors[-1], rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(errors), rtol=1e-5)
    flops = [dit.forward_flops(method.model.config, [(s, s, 1)]) for s in (4, 8)]
    assert method.forward_flops() == sum(flops) // 2


def test_generate_is_the_sampler_on_the_model_with_cfg():
    method = _method(2)
    params = train_utils.random_params(method)
    labels = jnp.asarray([0, 2], jnp.int32)
    sampler = sampling.SamplerSettings((3, 2), (0.5,), solver="heun", cfg_scale=2.0)
    images, previews = method.generate(params, jax.random.key(5), labels, sampler, previews=True)
    assert images.shape == (2, SIZE, SIZE, 1) and previews[0].shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(previews[-1], images)
    noise = pyramidal.initial_noise(jax.random.key(5), (2, SIZE, SIZE, 1), method.schedule)
    ends = pyramidal.sample(
        functools.partial(method.apply, params),
        noise,
        labels,
        sampler,
        method.schedule,
        null_label=3,
    )
    np.testing.assert_allclose(ends[-1], images, rtol=1e-6, atol=1e-6)
    unguided = method.generate(
        params, jax.random.key(5), labels, sampling.SamplerSettings((3, 2), (0.5,), solver="heun")
    )
    assert np.abs(np.asarray(unguided) - np.asarray(images)).max() > 1e-3
    with pytest.raises(ValueError, match="fixed in training"):
        method.generate(params, jax.random.key(5), labels, sampling.SamplerSettings((3, 2), (0.9,)))


# --------------------------------------------------------------------------- the trainer

PYRAMIDAL_TINY = {
    "method": "pyramidal",
    "model.patch_sizes": (1,),
    "sampling.thresholds": (0.5,),
    "total_steps": 2,
    "log_every": 1,
    "checkpoint_every": 1,
    "sample_every": 100,  # no sample grid: keeps the test fast (generate is tested above)
}


def test_config_checks():
    from dfm_jax import config as config_lib

    with pytest.raises(config_lib.ConfigError, match=r"sampling\.thresholds"):
        train_utils.tiny_settings({**PYRAMIDAL_TINY, "sampling.thresholds": (0.9,)})
    with pytest.raises(config_lib.ConfigError, match=r"model\.patch_sizes"):
        train_utils.tiny_settings({**PYRAMIDAL_TINY, "model.patch_sizes": (1, 2)})
    with pytest.raises(config_lib.ConfigError, match=r"pyramid\.ratios"):
        train_utils.tiny_settings({**PYRAMIDAL_TINY, "pyramid.ratios": (4,)})


@pytest.mark.slow  # 16 s; the trainer's resume is method-agnostic (test_train_resume, test_faults)
def test_trains_checkpoints_and_resumes_bitwise(tmp_path):
    """Two steps straight == step 1 restored from its checkpoint, then step 2."""
    from dfm_jax.training import loop

    settings = train_utils.tiny_settings(PYRAMIDAL_TINY)
    with train_utils.persistent_compile_cache():
        straight = train_utils.to_host(loop.run(settings, str(tmp_path / "straight")))
        checkpoints = tmp_path / "straight" / "checkpoints"
        assert train_utils.checkpoint_steps(checkpoints) == [1, 2]
        shutil.copytree(checkpoints / "1", tmp_path / "resumed" / "checkpoints" / "1")
        resumed = train_utils.to_host(loop.run(settings, str(tmp_path / "resumed")))
    assert int(straight.step) == 2
    train_utils.assert_trees_equal(resumed, straight, "resumed vs straight")
    assert any(p.suffix == ".png" for p in (tmp_path / "straight").rglob("*"))

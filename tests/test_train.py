"""Tests of the train step and its setup: sharding, warm-up, EMA, non-finite steps, config errors.

The step-level tests drive ``setup_lib.build`` / ``setup_lib.compile_train_step`` directly on
hand-made meshes; whole runs (``loop.run``: resume, SIGTERM, non-finite stop) are in
test_train_resume.py, subprocess runs (CLI, kill -9) in test_train_cli.py and the
two-process run in test_multiprocess.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_utils

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.training import samples as samples_lib
from dfm_jax.training import setup as setup_lib
from dfm_jax.training import train_step
from dfm_jax.training.train_step import learning_rate_schedule


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


@pytest.fixture(scope="module")
def config():
    return train_utils.tiny_settings()


@pytest.fixture(scope="module")
def setup8(config):
    return train_utils.data_parallel_setup(config)


@pytest.fixture(scope="module")
def step8(setup8):
    return setup_lib.compile_train_step(setup8)


@pytest.fixture(scope="module")
def host_init(setup8, config):
    """The initial state of the run's seed, as numpy (so every test starts from a copy)."""
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    return train_utils.to_host(setup_lib.initial_state(setup8, init_key))


@pytest.fixture(scope="module")
def batches(setup8, config):
    """The first five process-local batches of the run's data order (numpy)."""
    iterator = data.make_train_iterator(
        setup8.source, global_batch_size=config.batch_size, seed=config.seed
    )
    return [next(iterator) for _ in range(5)]


def _train_key(config):
    return jax.random.split(jax.random.key(config.seed))[1]


def _run_steps(setup, run_step, host_state, local_batches, key):
    """Steps from a copy of ``host_state`` placed with ``setup``'s shardings.

    Returns the host copies of the states after every step and the metrics.
    """
    # Copies: CPU buffers may alias numpy memory, and the step donates its input state.
    state = jax.device_put(jax.tree.map(np.copy, host_state), setup.state_shardings)
    states, metrics = [], []
    for batch in local_batches:
        state, m = run_step(
            state, parallel.make_global_batch(batch, setup.mesh, parallel.BATCH_AXES), key
        )
        states.append(train_utils.to_host(state))
        metrics.append(jax.device_get(m))
    return states, metrics


# ----------------------------------------------------------------------------- sharding


def _kernel(params):
    """The largest weight matrix of the tiny model, (width, 4 * width): logical (embed, mlp)."""
    return params["blocks_0"]["mlp"]["fc1"]["kernel"]


@pytest.mark.slow  # 20 s; test_train_paths checks {data: 8} and {data 2, fsdp 2, model 2}
def test_one_device_data_parallel_and_fsdp_steps_agree(config, setup8, step8, host_init, batches):
    """Three steps on {data: 1} (one device), {data: 8} and {data: 2, fsdp: 4} agree.

    Tolerance: the sharded runs reduce gradients across devices (and FSDP's all-gathers /
    reduce-scatters reorder sums), so float32 results differ in the last bits (observed
    ~2e-8); parameters and EMA after three AdamW steps must agree to rtol 1e-5 / atol 1e-6,
    Adam moments to rtol 1e-4 / atol 1e-9. A wrong batch split or key would move them by
    ~1e-4 (the learning rate is 1e-3 after a 2-step warm-up).
    """
    key = _train_key(config)
    steps = batches[:3]
    mesh1 = parallel.create_mesh({"data": 1}, jax.devices()[:1])
    mesh_fsdp = parallel.create_mesh({"data": 2, "fsdp": 4})
    setup1 = setup_lib.build(config, mesh=mesh1)
    setup_fsdp = setup_lib.build(config, mesh=mesh_fsdp)

    ref_states, ref_metrics = _run_steps(
        setup1, setup_lib.compile_train_step(setup1), host_init, steps, key
    )
    dp_states, dp_metrics = _run_steps(setup8, step8, host_init, steps, key)

    # FSDP: the big kernels (and their Adam moments) are split 4 ways along "embed".
    state = jax.device_put(jax.tree.map(np.copy, host_init), setup_fsdp.state_shardings)
    run_fsdp = setup_lib.compile_train_step(setup_fsdp)
    fsdp_states, fsdp_metrics = [], []
    for batch in steps:
        global_batch = parallel.make_global_batch(batch, mesh_fsdp, parallel.BATCH_AXES)
        assert {s.data.shape[0] for s in global_batch["image"].addressable_shards} == {1}
        state, m = run_fsdp(state, global_batch, key)
        fsdp_states.append(train_utils.to_host(state))
        fsdp_metrics.append(jax.device_get(m))
    width = config.model.width
    for name, tree in [("params", state.params), ("ema", state.ema_params)]:
        kernel = _kernel(tree)
        assert kernel.shape == (width, 4 * width)
        assert kernel.sharding.spec[0] == "fsdp", (name, kernel.sharding.spec)
        assert {s.data.shape for s in kernel.addressable_shards} == {(width // 4, 4 * width)}
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw = (ScaleByAdamState, ...)
    assert isinstance(adam, optax.ScaleByAdamState)
    for moment in (adam.mu, adam.nu):
        assert {s.data.shape for s in _kernel(moment).addressable_shards} == {
            (width // 4, 4 * width)
        }
    # ... while {data: 8} replicates them and splits only the batch.
    dp_state = jax.device_put(jax.tree.map(np.copy, host_init), setup8.state_shardings)
    assert {s.data.shape for s in _kernel(dp_state.params).addressable_shards} == {
        (width, 4 * width)
    }

    # Non-vacuous: the steps moved the parameters (step 0 has learning rate 0, steps 1-2 not).
    assert train_utils.trees_differ(ref_states[-1].params, host_init.params)
    for states, metrics, name in [
        (dp_states, dp_metrics, "data8"),
        (fsdp_states, fsdp_metrics, "fsdp"),
    ]:
        for ref_m, m in zip(ref_metrics, metrics):
            np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5, err_msg=name)
        for ref, got in zip(ref_states, states):
            assert int(got.step) == int(ref.step)
            train_utils.assert_trees_close(
                got.params, ref.params, rtol=1e-5, atol=1e-6, what=f"{name} params"
            )
            train_utils.assert_trees_close(
                got.ema_params, ref.ema_params, rtol=1e-5, atol=1e-6, what=f"{name} ema"
            )
            train_utils.assert_trees_close(
                got.opt_state, ref.opt_state, rtol=1e-4, atol=1e-9, what=f"{name} opt_state"
            )


def test_build_checks_batch_against_the_given_mesh(config):
    mesh3 = parallel.create_mesh({"data": 3}, jax.devices()[:3])
    with pytest.raises(ValueError, match=r"batch_size: 8 is not divisible by the 3 data-parallel"):
        setup_lib.build(config, mesh=mesh3)


# ----------------------------------------------------------------------------- step semantics


@pytest.fixture(scope="module")
def trajectory(config, setup8, step8, host_init, batches):
    """Five steps on {data: 8}: good, good, NaN, NaN, good batches."""
    poisoned = [dict(b) for b in batches]
    for i in (2, 3):
        poisoned[i]["image"] = np.full_like(batches[i]["image"], np.nan)
    states, metrics = _run_steps(setup8, step8, host_init, poisoned, _train_key(config))
    return [host_init, *states], metrics


def _with(settings, **changes):
    return dataclasses.replace(settings, **changes)


def test_learning_rate_warmup_then_constant(config, trajectory):
    opt = config.optimizer
    schedule = learning_rate_schedule(opt)
    peak, warmup = opt.learning_rate, opt.warmup_steps
    np.testing.assert_allclose(
        [float(schedule(step)) for step in (0, warmup // 2, warmup, warmup + 1, 10 * warmup)],
        [0.0, peak * (warmup // 2) / warmup, peak, peak, peak],
        rtol=1e-6,
    )
    long = _with(opt, warmup_steps=1000, learning_rate=3e-4)
    np.testing.assert_allclose(
        [float(learning_rate_schedule(long)(s)) for s in (0, 250, 999, 1000, 10**6)],
        [0.0, 7.5e-5, 3e-4 * 999 / 1000, 3e-4, 3e-4],
        rtol=1e-6,
    )
    np.testing.assert_allclose(float(learning_rate_schedule(_with(opt, warmup_steps=0))(0)), peak)
    one = learning_rate_schedule(_with(opt, warmup_steps=1))  # the shortest warm-up
    np.testing.assert_allclose([float(one(s)) for s in (0, 1, 2)], [0.0, peak, peak], rtol=1e-6)
    # The optimizer follows it: step 0 (lr 0) moves no parameter but fills Adam's moments.
    states, metrics = trajectory
    np.testing.assert_allclose(
        [float(m["learning_rate"]) for m in metrics],
        [peak * min(s, warmup) / warmup for s in range(len(metrics))],
        rtol=1e-6,
    )
    train_utils.assert_trees_equal(states[1].params, states[0].params, "params after lr-0 step")
    assert train_utils.trees_differ(states[1].opt_state, states[0].opt_state)
    assert train_utils.trees_differ(states[2].params, states[1].params)


def test_ema_update(config, trajectory):
    """e <- e + (1 - d_t)(p - e) with the new parameters p and d_t = min(d, (1 + t) / (10 + t))
    (the EMA warm-up, t = steps taken before this one), checked on steps that move p."""
    states, _ = trajectory
    decay = config.optimizer.ema_decay
    assert config.optimizer.ema_warmup
    train_utils.assert_trees_equal(states[0].ema_params, states[0].params, "initial ema")
    for before, after in [(states[1], states[2]), (states[4], states[5])]:
        t = int(before.step)
        decay_t = np.float32(min(decay, (1 + t) / (10 + t)))
        assert train_utils.trees_differ(after.params, before.params)
        expected = jax.tree.map(
            lambda e, p, d=decay_t: e + (np.float32(1) - d) * (p - e),
            before.ema_params,
            after.params,
        )
        train_utils.assert_trees_close(
            after.ema_params, expected, rtol=1e-5, atol=1e-8, what=f"ema of step {t}"
        )
        assert train_utils.trees_differ(after.ema_params, after.params)


def test_ema_decay_schedule():
    for step in (0, 1, 5, 89, 90, 1000, 10**6):
        np.testing.assert_allclose(
            float(train_step.ema_decay_at(step, 0.9, warmup=True)),
            min(0.9, (1 + step) / (10 + step)),
            rtol=1e-6,
        )
        assert float(train_step.ema_decay_at(step, 0.9999, warmup=False)) == np.float32(0.9999)
    assert float(train_step.ema_decay_at(10**6, 0.9999, warmup=True)) == np.float32(0.9999)


def test_nonfinite_batch_skips_the_update(trajectory):
    states, metrics = trajectory
    assert [int(s.step) for s in states] == [0, 1, 2, 3, 4, 5]
    assert [float(m["finite"]) for m in metrics] == [1, 1, 0, 0, 1]
    assert not np.isfinite(metrics[2]["loss"])
    assert [int(s.consecutive_nonfinite) for s in states] == [0, 0, 0, 1, 2, 0]
    assert [int(s.skipped_updates) for s in states] == [0, 0, 0, 1, 2, 2]
    assert [int(m["consecutive_nonfinite"]) for m in metrics] == [0, 0, 1, 2, 0]
    good = states[2]
    for skipped in states[3:5]:
        for field in ("params", "ema_params", "opt_state"):
            train_utils.assert_trees_equal(
                getattr(skipped, field), getattr(good, field), f"{field} after NaN step"
            )
    # The next good batch updates again, from finite values.
    assert train_utils.trees_differ(states[5].params, good.params)
    for leaf in jax.tree.leaves((states[5].params, states[5].ema_params, states[5].opt_state)):
        assert np.all(np.isfinite(leaf))


@dataclasses.dataclass(frozen=True)
class _SqrtLossMethod:
    """A stand-in method: loss ``sum(sqrt(w * mean(image)))``. For an all-zero batch the
    loss is 0 (finite) while its gradient is 0 / 0 (NaN)."""

    def init(self, key):
        return {"w": jnp.ones(3)}

    def loss(self, params, images, labels, key):
        return jnp.sum(jnp.sqrt(params["w"] * images.mean())), {}


def test_a_finite_loss_with_a_nonfinite_gradient_skips_the_update():
    """Skip on a NaN gradient alone; then one good update of parameters, EMA (warmed-up
    decay) and counters, each against its formula. A function-scoped twin of the
    trajectory tests above, whose module-scoped fixture mutmut's test selection misses."""
    method, tx = _SqrtLossMethod(), optax.sgd(0.1)
    static = train_step.StepConfig(method, tx, optax.constant_schedule(0.1), ema_decay=0.5)
    state = train_step.init_state(jax.random.key(0), method, tx)
    step = jax.jit(lambda s, b: train_step.train_step(s, b, jax.random.key(1), static))
    labels = jnp.zeros(2, jnp.int32)
    zeros, ones = jnp.zeros((2, 4)), jnp.ones((2, 4))
    skipped, metrics = step(state, {"image": zeros, "label": labels})
    assert float(metrics["loss"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["finite"]) == 0.0 and int(metrics["consecutive_nonfinite"]) == 1
    assert (int(skipped.step), int(skipped.skipped_updates)) == (1, 1)
    np.testing.assert_array_equal(skipped.params["w"], state.params["w"])
    np.testing.assert_array_equal(skipped.ema_params["w"], state.ema_params["w"])
    # Then a batch of ones: the gradient 0.5 / sqrt(w) = 0.5 is applied, and the EMA moves
    # by (1 - d) of the step with the warmed-up decay d = min(0.5, (1 + 1) / (10 + 1)).
    updated, metrics = step(skipped, {"image": ones, "label": labels})
    assert float(metrics["finite"]) == 1.0 and int(metrics["consecutive_nonfinite"]) == 0
    assert (int(updated.step), int(updated.skipped_updates)) == (2, 1)
    np.testing.assert_allclose(updated.params["w"], 1.0 - 0.1 * 0.5, rtol=1e-6)
    decay = 2 / 11
    np.testing.assert_allclose(updated.ema_params["w"], 1.0 - (1 - decay) * 0.05, rtol=1e-6)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.patch_sizes": (1, 3)}, r"model\.patch_sizes: \(1, 3\) do not give equal token"),
        ({"model.patch_sizes": (2,)}, r"model\.patch_sizes: \(2,\) has 1 entries but"),
        (
            {"objective.stage_probs": (0.5, 0.3, 0.2)},
            r"objective.*stage_probs.*3 entries|one entry per scale",
        ),
        ({"objective.stage_probs": (1.0,)}, r"stage_probs.*one entry per scale"),
        ({"objective.stage_probs": (0.9, 0.2)}, r"config\.objective\.stage_probs: must sum to 1"),
        ({"objective.stage_probs": (1.2, -0.2)}, r"stage_probs: must be non-negative"),
        ({"sampling.thresholds": (1.0,)}, r"config\.sampling\.thresholds\[0\] = 1.0 .*\(0, 1\)"),
        ({"sampling.thresholds": (0.0,)}, r"config\.sampling\.thresholds\[0\] = 0.0 .*\(0, 1\)"),
        ({"sampling.thresholds": (0.5, 0.9)}, r"sampling\.thresholds: 2 stage\(s\) need 1 thr"),
        ({"sampling.steps_per_stage": (4,)}, r"sampling\.thresholds: 1 stage\(s\) need 0 thr"),
        ({"batch_size": 12}, r"config\.batch_size: 12 is not divisible by the 8 data-parallel"),
        ({"batch_size": 0}, r"config\.batch_size: must be a positive integer"),
        ({"max_consecutive_nonfinite": 0}, r"max_consecutive_nonfinite: must be a positive"),
        ({"keep_checkpoints": 0}, r"config\.keep_checkpoints: must be a positive integer"),
        ({"mesh": {"data": 3, "fsdp": 1, "model": 1}}, r"has 3 devices but 8 are available"),
        ({"pyramid.kind": "wavelet"}, r"config\.pyramid\.kind: must be one of"),
        ({"sampling.solver": "rk4"}, r"config\.sampling\.solver: must be one of"),
        ({"autoencoder.name": "sdxl-vae"}, r"config\.autoencoder\.name: unknown autoencoder"),
        ({"autoencoder.dtype": "int8"}, r"config\.autoencoder\.dtype: must be float32"),
        ({"data.source": "array_record"}, r"config\.autoencoder\.name: .*name the autoencoder"),
        ({"data.resolutoin": 8}, r"unknown config field data\.resolutoin; did you mean data\.res"),
        ({"model.frames": 4}, r"unknown config field model\.frames; did you mean data\.frames\?"),
        ({"evals.fd_fmnist.metrics": ("fid", "fit")}, r"evals\.fd_fmnist\.metrics: unknown"),
        ({"method": "flow_matching"}, r"config\.method: 'flow_matching' trains one scale"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_devices(train_utils.tiny_settings(overrides), num_devices=8)


def test_read_refuses_wrong_types():
    raw = train_utils.tiny_config().to_dict()
    for section, field, value, message in [
        (None, "batch_size", "8", r"config\.batch_size: must be int, got '8'"),
        (None, "batch_size", True, r"config\.batch_size: must be int, got True"),
        ("model", "patch_sizes", 2, r"config\.model\.patch_sizes: must be a tuple, got 2"),
        ("optimizer", "learning_rate", "fast", r"learning_rate: must be a number, got 'fast'"),
        ("sampling", "guidance_interval", (0.0,), r"guidance_interval: must have 2 entries"),
    ]:
        changed = {**raw, section: {**raw[section], field: value}} if section else {
            **raw, field: value}  # fmt: skip
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.read(changed)
    # Lists (e.g. from JSON) become tuples and ints become floats where declared.
    listed = {**raw, "model": {**raw["model"], "patch_sizes": [1, 2]}}
    listed["optimizer"] = {**raw["optimizer"], "learning_rate": 1}
    settings = config_lib.read(listed)
    assert settings.model.patch_sizes == (1, 2) and settings.optimizer.learning_rate == 1.0
    assert isinstance(settings.optimizer.learning_rate, float)


def test_valid_config_passes():
    config_lib.check_devices(train_utils.tiny_settings(), num_devices=8)
    config_lib.check_devices(config_lib.read(train_utils.demo_config()), num_devices=8)
    config_lib.check_devices(train_utils.tiny_settings({"batch_size": 24}), num_devices=8)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            {"data.source": "imagenet"},
            ValueError,
            r"unknown data\.source 'imagenet'; known sources",
        ),
        (
            {
                "data.source": "fashion_mnist",
                "data.dir": "/nonexistent/fmnist",
                "data.resolution": 32,
            },
            data.DataNotFoundError,
            r"Fashion-MNIST 'train' IDX files not found; tried '?/nonexistent/fmnist",
        ),
        (
            {
                "data.source": "array_record",
                "data.dir": "/nonexistent/latents",
                "data.channels": 4,
                "autoencoder.name": "tiny",
            },
            data.DataNotFoundError,
            r"no metadata\.json in '/nonexistent/latents'",
        ),
        (
            {"data.source": "image_folder", "data.dir": "/nonexistent/images"},
            data.DataNotFoundError,
            r"image folder '/nonexistent/images' does not exist",
        ),
        (
            {"data.source": "image_folder", "data.dir": ""},
            data.DataNotFoundError,
            r"needs --config\.data\.dir",
        ),
    ],
)
def test_data_config_errors_at_build(overrides, error, message):
    with pytest.raises(error, match=message):
        setup_lib.build(train_utils.tiny_settings(overrides))


# ----------------------------------------------------------------------------- sample grids


class _ImageWriterStub:
    def __init__(self):
        self.images = []

    def write_images(self, step, images):
        self.images.append((step, images))


@pytest.mark.parametrize("channels", [16, 4])
def test_no_sample_grids_for_latents(tmp_path, channels):
    """16-channel (FLUX AE) or 4-channel (SD-VAE) latents cannot be drawn as PNGs (16 channels
    used to crash the run at its first sample step): the writer skips them."""
    setup = setup_lib.build(train_utils.tiny_settings({"data.channels": channels}))
    assert setup.example_shape == (8, 8, channels)
    writer = _ImageWriterStub()
    samples = samples_lib.SampleWriter(setup, str(tmp_path), writer)
    samples(1, None)  # returns before sampling: no parameters needed, nothing compiled
    assert writer.images == [] and not (tmp_path / "samples").exists()

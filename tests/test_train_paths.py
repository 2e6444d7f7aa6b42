"""Trainer paths the other trainer tests leave out, each checked against an independent result.

* the trainer's first updates against a hand-built reference: ``jax.value_and_grad`` of the
  method's loss with the step keys ``fold_in(train_key, step)``, then an independently built
  ``optax.chain(clip_by_global_norm, adamw)`` with a hand-written warm-up schedule;
* tensor parallelism: the same steps on a ``{data: 2, fsdp: 2, model: 2}`` mesh (kernels split
  along ``model``) agree with that one-device reference;
* restoring a checkpoint saved from ``{data: 8}`` onto other meshes (FSDP, one device):
  bitwise the saved values, placed with the new shardings;
* ``keep_checkpoints``: a whole ``loop.run`` keeps only the newest step directories.

Compiling a train step of the tiny model takes ~10-20 s on a CPU, so the module compiles
three (the reference, the ``{data: 8}`` step, the tensor-parallel step) and shares them:
``loop.run`` builds the same ``{data: 8}`` program as the ``step8`` fixture and loads it from
the session's persistent compilation cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_utils
from jax.sharding import PartitionSpec as P

from dfm_jax import data, parallel
from dfm_jax.training import checkpoint, loop
from dfm_jax.training import setup as setup_lib

#: weight_decay (demo.py: 0) large enough that the decoupled decay term, lr * wd * p, moves
#: parameters well above the float32 tolerances; grad_clip 1.0 is active (the initial
#: gradient norm of the tiny model is ~5), so the clipping is exercised too.
OVERRIDES = {"optimizer.weight_decay": 0.5, "optimizer.grad_clip": 1.0}

#: Steps compared: step 0 has learning rate 0 (warm-up 2) but fills Adam's moments; steps 1-2
#: move the parameters with learning rates lr / 2 and lr.
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


@pytest.fixture(scope="module")
def config():
    settings = train_utils.tiny_settings(OVERRIDES)
    assert settings.optimizer.warmup_steps == 2 and settings.optimizer.grad_clip == 1.0
    return settings


@pytest.fixture(scope="module")
def setup8(config):
    return train_utils.data_parallel_setup(config)


@pytest.fixture(scope="module")
def step8(setup8):
    return setup_lib.compile_train_step(setup8)


@pytest.fixture(scope="module")
def setup1(config):
    return setup_lib.build(config, mesh=parallel.create_mesh({"data": 1}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def setup_fsdp(config):
    return setup_lib.build(config, mesh=parallel.create_mesh({"data": 2, "fsdp": 4}))


@pytest.fixture(scope="module")
def setup_tp(config):
    """Tensor parallelism with FSDP: heads (2) and MLP units split 2 ways along ``model``."""
    return setup_lib.build(config, mesh=parallel.create_mesh({"data": 2, "fsdp": 2, "model": 2}))


@pytest.fixture(scope="module")
def train_key(config):
    return jax.random.split(jax.random.key(config.seed))[1]  # as loop.run


@pytest.fixture(scope="module")
def host_init(setup8, config):
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    return train_utils.to_host(setup_lib.initial_state(setup8, init_key))


@pytest.fixture(scope="module")
def batches(setup8, config):
    iterator = data.make_train_iterator(
        setup8.source, global_batch_size=config.batch_size, seed=config.seed
    )
    return [next(iterator) for _ in range(STEPS)]


def _run_steps(setup, run_step, host_state, local_batches, key):
    """The trainer's steps from a copy of ``host_state``: host states and metrics."""
    state = jax.device_put(jax.tree.map(np.copy, host_state), setup.state_shardings)
    states, metrics = [], []
    for batch in local_batches:
        global_batch = parallel.make_global_batch(batch, setup.mesh, parallel.BATCH_AXES)
        state, m = run_step(state, global_batch, key)
        states.append(train_utils.to_host(state))
        metrics.append(jax.device_get(m))
    return states, metrics, state


def _hand_learning_rate(opt, step):
    """The documented warm-up: linear from 0 to ``learning_rate`` over ``warmup_steps``."""
    return opt.learning_rate * min(step, opt.warmup_steps) / opt.warmup_steps


@pytest.fixture(scope="module")
def reference(config, setup1, host_init, batches, train_key):
    """The independent trajectory on one device: per step the loss, the gradient (host) and
    the parameters and optimizer state after it.

    Loss and gradient: ``jax.value_and_grad`` of ``method.loss(params, image, label,
    fold_in(train_key, step))``; update: a separately built ``optax.chain(
    clip_by_global_norm(grad_clip), adamw(...))`` whose learning rate is the hand-written
    warm-up (not ``train_step.learning_rate_schedule``). No EMA, no non-finite guard.
    """
    opt = config.optimizer
    method = setup1.method

    def learning_rate(count):
        return opt.learning_rate * jnp.minimum(count, opt.warmup_steps) / opt.warmup_steps

    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(
            learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay
        ),
    )

    @jax.jit
    def step(params, opt_state, image, label, key):
        def loss_fn(p):
            return method.loss(p, image, label, key)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    device = jax.devices()[0]
    params = jax.device_put(jax.tree.map(np.copy, host_init.params), device)
    opt_state = jax.device_put(tx.init(params), device)
    out = []
    with setup1.context():
        for t, batch in enumerate(batches):
            image, label = (jax.device_put(np.copy(batch[k]), device) for k in ("image", "label"))
            params, opt_state, loss, grads = step(
                params, opt_state, image, label, jax.random.fold_in(train_key, t)
            )
            out.append(
                {
                    "loss": float(loss),
                    "grads": train_utils.to_host(grads),
                    "params": train_utils.to_host(params),
                    "opt_state": train_utils.to_host(opt_state),
                }
            )
    return out


def _grad_norm(grads) -> float:
    """The global L2 norm, summed in float64 on the host."""
    return float(
        np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in jax.tree.leaves(grads)))
    )


def _assert_matches_reference(states, metrics, reference, config, what):
    """Trainer states/metrics vs the reference: float32 tolerances (see the test docstrings)."""
    for t, (state, m, ref) in enumerate(zip(states, metrics, reference, strict=True)):
        assert int(state.step) == t + 1
        assert float(m["finite"]) == 1.0
        np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5, err_msg=f"{what} loss {t}")
        np.testing.assert_allclose(
            m["grad_norm"], _grad_norm(ref["grads"]), rtol=1e-5, err_msg=f"{what} grad_norm {t}"
        )
        np.testing.assert_allclose(
            m["learning_rate"], _hand_learning_rate(config.optimizer, t), rtol=1e-6
        )
        train_utils.assert_trees_close(
            state.params, ref["params"], rtol=1e-5, atol=1e-6, what=f"{what} params {t}"
        )
        train_utils.assert_trees_close(
            state.opt_state, ref["opt_state"], rtol=1e-4, atol=1e-9, what=f"{what} opt {t}"
        )


def _kernel(tree):
    """The largest weight matrix, (width, 4 * width), logical (embed, mlp)."""
    return tree["blocks_0"]["mlp"]["fc1"]["kernel"]


def _shard_shapes(array):
    return {s.data.shape for s in array.addressable_shards}


# ----------------------------------------------------------------------------- first updates


def test_first_updates_match_an_independent_computation(
    config, setup8, step8, host_init, batches, train_key, reference
):
    """Three trainer steps on {data: 8} (from the initial state, the run's first batches and
    train key) against the independent one-device reference (``reference``): the reported
    loss, gradient norm and learning rate, the parameters and the AdamW/clip state.

    Tolerances: the trainer splits the batch over 8 devices and all-reduces the gradient, so
    float32 sums differ in the last bits from the one-device reference (observed: parameters
    <= 5e-8, Adam moments <= 2e-8 absolute, loss and gradient norm <= 2e-7 relative): loss
    and gradient norm rtol 1e-5, parameters rtol 1e-5 / atol 1e-6, Adam moments rtol 1e-4 /
    atol 1e-9 (nu ~ g^2 is tiny), learning rate rtol 1e-6 (a float32 of a decimal). The
    parameters move by 5e-4 (step 1) and 1.5e-3 (step 2). Observed on wrong trainers:
    unclipped gradients move mu ~5x, the optimizer's learning rate one step ahead or no
    weight decay move parameters by up to ~8e-5, a step key fold_in(step + 1) the loss ~20%.
    """
    states, metrics, _ = _run_steps(setup8, step8, host_init, batches, train_key)

    # The reference is not vacuous: clipping is active, step 0 has lr 0 and moves nothing,
    # steps 1-2 move the parameters by far more than the tolerance.
    assert all(_grad_norm(r["grads"]) > 1.5 * config.optimizer.grad_clip for r in reference)
    train_utils.assert_trees_equal(reference[0]["params"], host_init.params, "lr-0 step")
    assert train_utils.max_abs_difference(reference[1]["params"], host_init.params) > 1e-4
    _assert_matches_reference(states, metrics, reference, config, "data8")


# ----------------------------------------------------------------------------- tensor parallel


def test_tensor_parallel_steps_match_the_one_device_reference(
    config, setup_tp, host_init, batches, train_key, reference
):
    """Three steps on {data: 2, fsdp: 2, model: 2} agree with the one-device reference, and
    the big kernels (and their Adam moments) are really split along ``model``.

    fc1 (32, 128), logical (embed, mlp) -> P(fsdp, model): shards (16, 64); qkv (32, 3, 2, 16),
    logical (embed, -, heads, kv) -> shards (16, 3, 1, 16); the batch of 8 is split 4 ways
    (data x fsdp) and repeated over ``model``. Tolerances as in the data-parallel test: the
    partitioner reorders the sums of the sharded matmuls and reductions (float32 last bits;
    observed: parameters <= 5e-8, Adam moments <= 2e-8, loss <= 2e-7 relative).
    """
    run_tp = setup_lib.compile_train_step(setup_tp)
    states, metrics, state = _run_steps(setup_tp, run_tp, host_init, batches, train_key)

    width = config.model.width
    for name, tree in [
        ("params", state.params),
        ("ema", state.ema_params),
        ("mu", state.opt_state[1][0].mu),
        ("nu", state.opt_state[1][0].nu),
    ]:
        kernel = _kernel(tree)
        assert kernel.sharding.spec == P("fsdp", "model"), (name, kernel.sharding.spec)
        assert _shard_shapes(kernel) == {(width // 2, 4 * width // 2)}, name
        qkv = tree["blocks_0"]["attn"]["qkv"]["kernel"]
        assert qkv.shape == (width, 3, 2, width // 2)
        assert _shard_shapes(qkv) == {(width // 2, 3, 1, width // 2)}, name
    batch = parallel.make_global_batch(batches[0], setup_tp.mesh, parallel.BATCH_AXES)
    assert _shard_shapes(batch["image"]) == {(2, *batches[0]["image"].shape[1:])}

    _assert_matches_reference(states, metrics, reference, config, "tensor-parallel")


# ----------------------------------------------------------------------------- restore elsewhere


def test_restore_onto_other_meshes(tmp_path, setup8, setup_fsdp, setup1, host_init):
    """A state saved from {data: 8} (8 devices, replicated) restores onto {data: 2, fsdp: 4}
    and onto one device bitwise equal to the saved host copy, each array placed with the
    target's shardings (not the saved ones): the fc1 kernel split 4 ways along fsdp, and
    whole on device 0 alone.

    Every float leaf of the saved state is perturbed with seeded noise (the Adam moments
    of a fresh state are zeros) and the step is 7, so a leaf restored from the wrong place
    cannot compare equal by chance.
    """
    rng = np.random.default_rng(0)
    saved = jax.tree.map(
        lambda x: (
            (x + rng.standard_normal(x.shape).astype(x.dtype))
            if np.issubdtype(x.dtype, np.floating)
            else np.copy(x)
        ),
        host_init,
    )
    saved = saved.replace(step=np.int32(7), skipped_updates=np.int32(2))
    state8 = jax.device_put(jax.tree.map(np.copy, saved), setup8.state_shardings)
    assert _shard_shapes(_kernel(state8.params)) == {_kernel(saved.params).shape}
    writer = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    try:
        assert writer.save(7, state8)
        writer.wait()
    finally:
        writer.close()

    width = _kernel(saved.params).shape[0]
    expected_shards = {
        "fsdp": (setup_fsdp, {(width // 4, 4 * width)}),
        "one device": (setup1, {(width, 4 * width)}),
    }
    reader = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    try:
        for name, (setup, kernel_shards) in expected_shards.items():
            restored, step = reader.restore(setup.abstract_state)
            assert step == 7
            train_utils.assert_trees_equal(train_utils.to_host(restored), saved, name)
            for (path, leaf), sharding in zip(
                jax.tree_util.tree_flatten_with_path(restored)[0],
                jax.tree.leaves(setup.state_shardings),
                strict=True,
            ):
                where = (name, jax.tree_util.keystr(path))
                assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), where
            for tree in (restored.params, restored.ema_params, restored.opt_state[1][0].mu):
                kernel = _kernel(tree)
                assert _shard_shapes(kernel) == kernel_shards, name
                assert kernel.sharding.device_set == set(setup.mesh.devices.flat), name
    finally:
        reader.close()


# ----------------------------------------------------------------------------- retention


class _NoSamples:
    """Stands in for ``SampleWriter``: the run's last step would compile the sampler."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, step, ema_params):
        pass


def test_keep_checkpoints_keeps_the_newest(tmp_path, monkeypatch, config, step8):
    """total_steps 4, checkpoint_every 1, keep_checkpoints 2: exactly steps [3, 4] remain
    (Orbax's default would keep 3, none kept would be [1..4]); the newest holds the returned
    final state bitwise, the older one the state of step 3. ``step8`` is requested so the
    run loads the same {data: 8} program from the compilation cache."""
    del step8
    monkeypatch.setattr(loop, "SampleWriter", _NoSamples)
    settings = train_utils.tiny_settings(
        {
            **OVERRIDES,
            "total_steps": 4,
            "checkpoint_every": 1,
            "keep_checkpoints": 2,
            "sample_every": 1000,
            "log_every": 2,
        }
    )
    workdir = tmp_path / "run"
    final = train_utils.to_host(loop.run(settings, str(workdir)))
    assert int(final.step) == 4
    directory = workdir / "checkpoints"
    assert train_utils.checkpoint_steps(directory) == [3, 4]
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == ["3", "4"]

    setup = setup_lib.build(settings)
    reader = checkpoint.Checkpointer(str(directory), async_save=False)
    try:
        assert reader.all_steps() == [3, 4]
        newest, step = reader.restore(setup.abstract_state)
        assert step == 4
        train_utils.assert_trees_equal(train_utils.to_host(newest), final, "checkpoint 4")
        older, _ = reader.restore(setup.abstract_state, step=3)
        assert int(older.step) == 3
        assert train_utils.trees_differ(train_utils.to_host(older).params, final.params)
    finally:
        reader.close()

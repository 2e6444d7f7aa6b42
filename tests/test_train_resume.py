"""Whole runs in this process (``loop.run``): SIGTERM + exact resume, non-finite stop.

Batches are observed (and poisoned, or used to deliver SIGTERM) by wrapping
``dfm_jax.parallel.make_global_batch``, which the loop calls once per step with the
iterator's next local batch.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest
import train_utils

from dfm_jax import parallel
from dfm_jax.training import checkpoint, loop
from dfm_jax.training import setup as setup_lib


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


_MAKE_GLOBAL_BATCH = parallel.make_global_batch


class BatchTap:
    """Wraps ``parallel.make_global_batch``: records every local batch, optionally acts on it.

    ``on_batch(index, batch)`` (0-based call index) may return a replacement batch. A new
    tap replaces the previous one.
    """

    def __init__(self, monkeypatch, on_batch=None):
        self.batches: list[dict] = []
        self._on_batch = on_batch
        monkeypatch.setattr(parallel, "make_global_batch", self)

    def __call__(self, batch, mesh, axes):
        batch = {name: np.array(value, copy=True) for name, value in batch.items()}
        if self._on_batch is not None:
            batch = self._on_batch(len(self.batches), batch) or batch
        self.batches.append(batch)
        return _MAKE_GLOBAL_BATCH(batch, mesh, axes)


def _restore(workdir, config, step=None):
    setup = setup_lib.build(config)
    manager = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state, _ = manager.restore(setup.abstract_state, step=step)
        return train_utils.to_host(state)
    finally:
        manager.close()


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, monkeypatch):
    """2N steps straight == N steps, SIGTERM, resume to 2N: same batches, identical state."""
    n = 3
    config = train_utils.tiny_settings(
        {"total_steps": 2 * n, "log_every": 2, "checkpoint_every": 100, "sample_every": 100}
    )

    straight_tap = BatchTap(monkeypatch)
    straight = train_utils.to_host(loop.run(config, str(tmp_path / "straight")))
    assert int(straight.step) == 2 * n
    assert len(straight_tap.batches) == 2 * n

    handler_before = signal.getsignal(signal.SIGTERM)

    def preempt_at_step_n(index, batch):
        if index == n - 1:  # the batch of step n: SIGTERM arrives while the step runs
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler) and handler is not handler_before, (
                "loop.run installed no SIGTERM handler; the signal would kill pytest"
            )
            os.kill(os.getpid(), signal.SIGTERM)

    workdir = str(tmp_path / "preempted")
    first_tap = BatchTap(monkeypatch, preempt_at_step_n)
    stopped = train_utils.to_host(loop.run(config, workdir))
    assert int(stopped.step) == n
    assert len(first_tap.batches) == n, "the run did not stop right after the SIGTERM step"
    assert train_utils.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [n]
    assert signal.getsignal(signal.SIGTERM) is handler_before, "SIGTERM handler not restored"
    train_utils.assert_trees_equal(_restore(workdir, config), stopped, "checkpoint at SIGTERM")

    second_tap = BatchTap(monkeypatch)
    resumed = train_utils.to_host(loop.run(config, workdir))
    assert len(second_tap.batches) == n, "the resumed run did not continue from step N"
    assert train_utils.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [n, 2 * n]

    # The same data order: the resumed run continues the iterator, not a fresh one.
    resumed_batches = first_tap.batches + second_tap.batches
    for index, (want, got) in enumerate(zip(straight_tap.batches, resumed_batches)):
        for name in ("image", "label"):
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"batch {index} {name}")
    assert not np.array_equal(straight_tap.batches[0]["label"], straight_tap.batches[n]["label"])

    # Bitwise the same state: parameters, EMA, Adam moments and counters.
    train_utils.assert_trees_equal(resumed, straight, "resumed vs straight")
    train_utils.assert_trees_equal(
        _restore(workdir, config), _restore(str(tmp_path / "straight"), config), "checkpoints"
    )
    assert train_utils.trees_differ(resumed.params, stopped.params)
    assert os.path.isfile(os.path.join(workdir, "samples", f"step_{2 * n:08d}_grid.png"))

    # config.resume: a fresh workdir starts from another run's newest checkpoint, with its
    # optimizer state and step (total_steps = 2N: nothing left to train).
    config = dataclasses.replace(config, resume=str(tmp_path / "straight" / "checkpoints"))
    started = train_utils.to_host(loop.run(config, str(tmp_path / "from_resume")))
    train_utils.assert_trees_equal(started, straight, "state started from config.resume")


@pytest.mark.slow  # test_faults::test_nan_storm_stops_then_the_same_command_finishes
def test_nonfinite_losses_stop_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    """NaN batches from step 5 on: skipped updates, then NonFiniteLossError after 3 in a row."""
    good_steps, limit = 4, 3
    config = train_utils.tiny_settings(
        {
            "total_steps": 20,
            "log_every": 1,
            "checkpoint_every": 2,
            "sample_every": 100,
            "max_consecutive_nonfinite": limit,
        }
    )

    def poison(index, batch):
        if index >= good_steps:
            return {**batch, "image": np.full_like(batch["image"], np.nan)}
        return None

    workdir = str(tmp_path / "run")
    tap = BatchTap(monkeypatch, poison)
    with pytest.raises(loop.NonFiniteLossError) as error:
        loop.run(config, workdir)
    message = str(error.value)
    assert f"{limit} consecutive steps" in message
    assert "max_consecutive_nonfinite" in message and "last checkpoint" in message
    # It stops promptly (the counter is read one step late, so at most one extra step).
    assert good_steps + limit <= len(tap.batches) <= good_steps + limit + 1

    steps = train_utils.checkpoint_steps(os.path.join(workdir, "checkpoints"))
    assert steps and steps[-1] <= good_steps + limit
    last = _restore(workdir, config)
    last_good = _restore(workdir, config, step=good_steps)
    for leaf in jax.tree.leaves(last):
        assert np.all(np.isfinite(leaf))
    for field in ("params", "ema_params", "opt_state"):
        train_utils.assert_trees_equal(
            getattr(last, field), getattr(last_good, field), f"last checkpoint {field}"
        )
    assert int(last.skipped_updates) == int(last.step) - good_steps > 0
    assert int(last_good.skipped_updates) == 0

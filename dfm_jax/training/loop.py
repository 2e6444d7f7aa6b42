"""The training loop: wiring of data, model, sharded state, checkpoints and logging.

``run(config, workdir)`` is the library entry point behind ``python -m
dfm_jax.main``. Start-up order (big_vision style): validate the config, build
the mesh and the data source, build the method objects, then restore the
newest checkpoint in ``workdir``, else ``config.resume``, else initialise
abstractly and materialise the state directly sharded. The loop runs one jitted
step per batch with the state donated, and periodic actions around it:
metrics every ``log_every`` steps, checkpoints every ``checkpoint_every``,
sample grids every ``sample_every`` and at the end. SIGTERM (preemption) makes
the loop save at the next step and return cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from dfm_jax import data, parallel
from dfm_jax.models import dit
from dfm_jax.training import checkpoint, perf
from dfm_jax.training.preemption import PreemptionWatcher
from dfm_jax.training.samples import SampleWriter
from dfm_jax.training.setup import Setup, build, compile_train_step, initial_state
from dfm_jax.training.train_step import TrainState


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def restore_or_initialize(
    setup: Setup, checkpointer: checkpoint.Checkpointer, iterator, init_key: jax.Array
) -> TrainState:
    """Newest checkpoint in the workdir, else ``config.resume``, else a fresh state."""
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(setup.abstract_state, iterator)
        return state
    if setup.config.resume:
        source = checkpoint.Checkpointer(setup.config.resume, async_save=False)
        state, step = source.restore(setup.abstract_state)
        source.close()
        logging.info("Started from %s (step %d); data order starts afresh", source.directory, step)
        return state
    return initial_state(setup, init_key)


@dataclasses.dataclass
class _Throughput:
    """Wall-clock accounting between log points (the first, compiling, step excluded)."""

    flops_per_step: float
    examples_per_step: int
    peak_flops: float | None
    start_time: float = 0.0
    start_step: int = 0

    def reset(self, step: int) -> None:
        self.start_time, self.start_step = time.perf_counter(), step

    def measure(self, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start_time
        steps = step - self.start_step
        if steps <= 0 or elapsed <= 0:
            return {}
        steps_per_second = steps / elapsed
        model_flops = steps_per_second * self.flops_per_step / jax.device_count()
        out = {
            "steps_per_second": steps_per_second,
            "examples_per_second": steps_per_second * self.examples_per_step,
            "model_tflops_per_device": model_flops / 1e12,
        }
        if self.peak_flops:
            out["mfu"] = model_flops / self.peak_flops
        return out


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_line(step: int, total: int, scalars: dict[str, float]) -> str:
    per_scale = " ".join(
        f"s{name[len('loss_scale') :]} {value:.4f}"
        for name, value in sorted(scalars.items())
        if name.startswith("loss_scale")
    )
    line = f"step {step}/{total} | loss {scalars['loss']:.4f} ({per_scale})"
    line += f" | grad {scalars['grad_norm']:.3f} | lr {scalars['learning_rate']:.2e}"
    if "steps_per_second" in scalars:
        eta = (total - step) / scalars["steps_per_second"]
        line += (
            f" | {scalars['steps_per_second']:.2f} steps/s"
            f" | {scalars['examples_per_second']:.1f} ex/s"
            f" | {scalars['model_tflops_per_device']:.3f} TFLOP/s/device"
        )
        if "mfu" in scalars:
            line += f" | MFU {100 * scalars['mfu']:.1f}%"
        line += f" | ETA {_format_eta(eta)}"
    return line


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains until ``config.total_steps`` (or SIGTERM), resuming from ``workdir``.

    Returns the final train state.
    """
    setup = build(config)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    os.makedirs(workdir, exist_ok=True)
    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    iterator = data.make_train_iterator(
        setup.source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        worker_count=config.data.worker_count,
    )
    state = restore_or_initialize(setup, checkpointer, iterator, init_key)
    step = start_step = int(state.step)
    step_fn = compile_train_step(setup)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    samples = SampleWriter(setup, workdir, writer)
    config_json = json.loads(config.to_json_best_effort())
    if step == 0:
        writer.write_hparams(_flatten(config_json))
    flops = perf.TRAIN_FLOPS_PER_FORWARD * dit.forward_flops(setup.model_config, setup.scale_shapes)
    throughput = _Throughput(
        flops_per_step=flops * config.batch_size,
        examples_per_step=config.batch_size,
        peak_flops=perf.published_peak_flops(),
    )
    logging.info(
        "Model: %s, %.2f M parameters, %.3f GFLOP forward per example; mesh %s; start at step %d",
        setup.model_config,
        sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
        flops / perf.TRAIN_FLOPS_PER_FORWARD / 1e9,
        dict(setup.mesh.shape),
        step,
    )
    preemption = PreemptionWatcher()
    pending_metrics: list[dict] = []
    previous_nonfinite = None
    try:
        while step < config.total_steps:
            batch = parallel.make_global_batch(next(iterator), setup.mesh, parallel.BATCH_AXES)
            state, metrics = step_fn(state, batch, train_key)
            step += 1
            pending_metrics.append(metrics)
            # Read the previous step's counter, so the device keeps one step in flight.
            if previous_nonfinite is not None:
                _check_nonfinite(int(previous_nonfinite), config, step - 1)
            previous_nonfinite = metrics["consecutive_nonfinite"]
            if step == start_step + 1:  # exclude compilation from the throughput
                jax.block_until_ready(state)
                throughput.reset(step)
            if step % config.log_every == 0 or step == config.total_steps:
                _check_nonfinite(int(state.consecutive_nonfinite), config, step)
                scalars = _mean_scalars(pending_metrics)
                scalars.update(throughput.measure(step))
                scalars["skipped_updates"] = float(state.skipped_updates)
                writer.write_scalars(step, scalars)
                logging.info("%s", _log_line(step, config.total_steps, scalars))
                pending_metrics.clear()
                throughput.reset(step)
            stop = preemption.requested()
            last = step == config.total_steps
            if stop or last or step % config.checkpoint_every == 0:
                checkpointer.save(step, state, iterator, config_json)
            if last or step % config.sample_every == 0:
                samples(step, state.ema_params)
                throughput.reset(step)
            if stop:
                logging.warning("Stopped by SIGTERM after step %d; checkpoint saved", step)
                break
    finally:
        preemption.close()
        checkpointer.close()
        writer.flush()
    return state


def _check_nonfinite(consecutive: int, config: ml_collections.ConfigDict, step: int) -> None:
    if consecutive >= config.max_consecutive_nonfinite:
        raise NonFiniteLossError(
            f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
            f"gradient (updates skipped); stopping. The last checkpoint holds the last good "
            f"parameters. Lower optimizer.learning_rate, check the data for NaNs, or raise "
            f"max_consecutive_nonfinite (now {config.max_consecutive_nonfinite})."
        )


def _mean_scalars(metrics: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(metrics)
    names = [name for name in fetched[0] if name != "consecutive_nonfinite"]
    return {name: float(np.mean([m[name] for m in fetched])) for name in names}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat

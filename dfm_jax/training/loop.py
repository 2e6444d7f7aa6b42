"""The training loop, the one trainer of every method, model size and dataset.

``run(settings, workdir)`` is the library entry point behind ``python -m dfm_jax.main``.
Its phases (big_vision style):

1. setup: the mesh, data source, method and sharded state layout (``training.setup``);
2. input: the seeded, process-sharded Grain iterator, after the workdir is checked
   writable and locked (``training.workdir_lock``: one trainer per workdir);
3. restore, in this order: the newest readable checkpoint in ``workdir`` (unreadable
   ones are renamed aside, ``Checkpointer.restore_newest``), else ``settings.resume``,
   else a fresh state initialised directly sharded;
4. update: one jitted step per batch with the state donated;
5. periodic actions around it: metrics every ``log_every`` steps (TensorBoard and one
   console line), checkpoints every ``checkpoint_every``, sample grids every
   ``sample_every``, the evaluators of ``settings.evals`` every ``every`` steps, and all
   of them at the end. SIGTERM (preemption) saves at the next step and returns cleanly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.evaluation import evaluators as evaluators_lib
from dfm_jax.training import checkpoint, perf, workdir_lock
from dfm_jax.training.preemption import PreemptionWatcher
from dfm_jax.training.samples import SampleWriter
from dfm_jax.training.setup import Setup, build, compile_train_step, initial_state
from dfm_jax.training.train_step import TrainState


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def restore_or_initialize(
    setup: Setup, checkpointer: checkpoint.Checkpointer, iterator, init_key: jax.Array
) -> TrainState:
    """Newest readable checkpoint in the workdir, else ``settings.resume``, else a fresh state.

    Unreadable checkpoints are renamed aside and the next older one is tried
    (``Checkpointer.restore_newest``); a workdir whose checkpoints are all unreadable
    stops the run rather than starting it afresh.
    """
    if checkpointer.all_steps() or checkpointer.set_aside():
        state, _ = checkpointer.restore_newest(setup.abstract_state, iterator)
        return state
    if setup.settings.resume:
        source = checkpoint.Checkpointer(setup.settings.resume, async_save=False)
        try:
            state, step = source.restore_newest(setup.abstract_state, rename=False)
        finally:
            source.close()
        logging.info("Started from %s (step %d); data order starts afresh", source.directory, step)
        return state
    return initial_state(setup, init_key)


class Progress(periodic_actions.ReportProgress):
    """clu's ``ReportProgress`` plus the training throughput of the console line.

    clu sets the work-unit notes, writes ``steps_per_sec`` (wall clock) and ``uptime``
    to TensorBoard and accounts the time spent in ``timed(name)`` blocks. Each report
    also measures, over the steps since the previous one and without the timed blocks
    (samples, evaluation, checkpoint saves): steps/s, examples/s, model TFLOP/s per
    device, MFU against the data-sheet peak where one is known, and the ETA (in
    ``latest``, written to TensorBoard too). The first call sets the baseline, so call
    it first after the compiling step.
    """

    def __init__(self, *, total_steps: int, every_steps: int, writer, flops_per_step: float,
                 examples_per_step: int):  # fmt: skip
        super().__init__(
            num_train_steps=total_steps, writer=writer, every_steps=every_steps, every_secs=None
        )
        self.flops_per_step, self.examples_per_step = flops_per_step, examples_per_step
        self.peak_flops = perf.published_peak_flops()
        self.latest: dict[str, float] = {}
        self._timed_before = 0.0

    def timed(self, name: str):
        """Times a host-blocking part of the loop (left out of the throughput)."""
        return super().timed(name, wait_jax_async_dispatch=False)

    def _apply(self, step: int, t: float) -> None:
        timed = sum(self._time_per_part.values())
        seconds = (t - self._previous_time) - (timed - self._timed_before)
        steps = step - self._previous_step
        self._timed_before = timed
        super()._apply(step, t)
        if steps <= 0 or seconds <= 0:
            return
        steps_per_second = steps / seconds
        flops = steps_per_second * self.flops_per_step / jax.device_count()
        self.latest = {
            "train_steps_per_second": steps_per_second,
            "examples_per_second": steps_per_second * self.examples_per_step,
            "model_tflops_per_device": flops / 1e12,
            "eta_seconds": (self._num_train_steps - step) / steps_per_second,
        }
        if self.peak_flops:
            self.latest["mfu"] = flops / self.peak_flops
        if self._writer is not None:
            self._writer.write_scalars(step, self.latest)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """The console line of a log step: losses (per scale), gradient, lr, throughput."""
    per_scale = " ".join(
        f"s{name[len('loss_scale') :]} {value:.4f}"
        for name, value in sorted(scalars.items())
        if name.startswith("loss_scale")
    )
    line = f"step {step}/{total} | loss {scalars['loss']:.4f}"
    line += f" ({per_scale})" if per_scale else ""
    line += f" | grad {scalars['grad_norm']:.3f} | lr {scalars['learning_rate']:.2e}"
    if "train_steps_per_second" in scalars:
        line += (
            f" | {scalars['train_steps_per_second']:.2f} steps/s"
            f" | {scalars['examples_per_second']:.1f} ex/s"
            f" | {scalars['model_tflops_per_device']:.3f} TFLOP/s/device"
        )
        if "mfu" in scalars:
            line += f" | MFU {100 * scalars['mfu']:.1f}%"
        line += f" | ETA {_format_eta(scalars['eta_seconds'])}"
    return line


class StepMetrics:
    """Per-step metrics kept on the devices until a log step, and the non-finite guard.

    The guard reads the previous step's counter, so the devices keep one step in flight.
    """

    def __init__(self, max_consecutive_nonfinite: int):
        self.limit = max_consecutive_nonfinite
        self.pending: list[dict] = []
        self._previous = None

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)
        if self._previous is not None:
            self.check(int(self._previous), step - 1)
        self._previous = metrics["consecutive_nonfinite"]

    def check(self, consecutive: int, step: int) -> None:
        if consecutive >= self.limit:
            raise NonFiniteLossError(
                f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
                f"gradient (updates skipped); stopping. The last checkpoint holds the last "
                f"good parameters. Lower optimizer.learning_rate, check the data for NaNs, or "
                f"raise max_consecutive_nonfinite (now {self.limit})."
            )

    def mean(self) -> dict[str, float]:
        """The mean of every pending metric (then cleared)."""
        fetched = jax.device_get(self.pending)
        self.pending.clear()
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


def _header(setup: Setup, state: TrainState, workdir: str, flops: float) -> None:
    model = setup.model_config
    logging.info(
        "%s | DiT depth %d, width %d, %d heads, patches %s, %s positions, %s | %.2f M "
        "parameters, %.3f GFLOP forward per example | mesh %s | batch %d | workdir %s | "
        "start at step %d of %d",
        setup.method.name,
        model.depth,
        model.width,
        model.num_heads,
        model.patch_sizes,
        model.positions,
        model.dtype,
        sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
        flops / 1e9,
        dict(setup.mesh.shape),
        setup.settings.batch_size,
        workdir,
        int(state.step),
        setup.settings.total_steps,
    )


def run(settings: config_lib.Settings, workdir: str) -> TrainState:
    """Trains until ``settings.total_steps`` (or SIGTERM), resuming from ``workdir``.

    Returns the final train state.
    """
    setup = build(settings)
    init_key, train_key = jax.random.split(jax.random.key(settings.seed))
    if jax.process_index() == 0:
        workdir_lock.check_writable(workdir)
    lock = workdir_lock.WorkdirLock(workdir)
    lock.acquire()  # one trainer per workdir
    try:
        return _run(setup, workdir, init_key, train_key)
    finally:
        lock.release()


def _run(setup: Setup, workdir: str, init_key: jax.Array, train_key: jax.Array) -> TrainState:
    settings = setup.settings
    iterator = data.make_train_iterator(
        setup.source,
        global_batch_size=settings.batch_size,
        seed=settings.seed,
        worker_count=settings.data.worker_count,
    )
    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=settings.keep_checkpoints
    )
    state = restore_or_initialize(setup, checkpointer, iterator, init_key)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if int(state.step) == 0:
        writer.write_hparams(_flatten(settings.to_dict()))
    flops = setup.method.forward_flops()
    _header(setup, state, workdir, flops)
    loop = _Loop(setup, workdir, writer, checkpointer, iterator, train_key, flops)
    try:
        state = loop.train(state)
        checkpointer.wait()  # a failed last save raises here (CheckpointSaveError)
        return state
    finally:
        try:
            checkpointer.close()
        finally:
            writer.flush()


class _Loop:
    """The steps and the periodic actions around them (``run`` builds one)."""

    def __init__(self, setup, workdir, writer, checkpointer, iterator, train_key, flops):
        settings = setup.settings
        self.setup, self.settings, self.writer = setup, settings, writer
        self.checkpointer, self.iterator, self.train_key = checkpointer, iterator, train_key
        self.step_fn = compile_train_step(setup)
        self.samples = SampleWriter(setup, workdir, writer)
        self.evaluators = evaluators_lib.TrainingEvaluators(setup, workdir, writer)
        self.metrics = StepMetrics(settings.max_consecutive_nonfinite)
        self.progress = Progress(
            total_steps=settings.total_steps,
            every_steps=settings.log_every,
            writer=writer,
            flops_per_step=perf.TRAIN_FLOPS_PER_FORWARD * flops * settings.batch_size,
            examples_per_step=settings.batch_size,
        )
        self.settings_json = settings.to_dict()

    def train(self, state: TrainState) -> TrainState:
        step = start = int(state.step)
        total = self.settings.total_steps
        with PreemptionWatcher() as preemption:
            while step < total:
                batch = parallel.make_global_batch(
                    next(self.iterator), self.setup.mesh, parallel.BATCH_AXES
                )
                state, metrics = self.step_fn(state, batch, self.train_key)
                step += 1
                self.metrics.add(step, metrics)
                if step == start + 1:  # the compiling step stays out of the throughput
                    jax.block_until_ready(state)
                self.progress(step)
                stop = preemption.requested()
                self._periodic(step, state, stop=stop)
                if stop:
                    logging.warning("Stopped by SIGTERM after step %d; checkpoint saved", step)
                    break
        return state

    def _periodic(self, step: int, state: TrainState, *, stop: bool) -> None:
        settings, last = self.settings, step == self.settings.total_steps
        if step % settings.log_every == 0 or last:
            self.metrics.check(int(state.consecutive_nonfinite), step)
            scalars = {**self.metrics.mean(), **self.progress.latest}
            scalars["skipped_updates"] = float(state.skipped_updates)
            self.writer.write_scalars(step, scalars)
            logging.info("%s", log_line(step, settings.total_steps, scalars))
        if stop or last or step % settings.checkpoint_every == 0:
            with self.progress.timed("checkpoint"):
                self.checkpointer.save(step, state, self.iterator, self.settings_json)
        if last or step % settings.sample_every == 0:
            with self.progress.timed("samples"):
                self.samples(step, state.ema_params)
        if self.evaluators.due(step):
            with self.progress.timed("evaluation"):
                self.evaluators(step, state.ema_params)

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
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from dfm_jax import autoencoding, checkpoint, configlib, data, generate, parallel, perf, viz
from dfm_jax.models import dit
from dfm_jax.train_step import (
    StepConfig,
    TrainState,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    train_step,
)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class Setup:
    """Everything built from the config before the first step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    source: Any
    example_shape: tuple[int, ...]
    num_classes: int
    model: nn.Module
    model_config: dit.DiTConfig
    step_config: StepConfig
    state_shardings: Any
    abstract_state: Any
    dummy_inputs: tuple
    scale_shapes: list


def build(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh | None = None,
    *,
    read_data: bool = True,
) -> Setup:
    """Validates the config and builds the data source, model and state layout.

    ``mesh`` (e.g. over a subset of the devices) replaces the one ``config.mesh`` describes.
    ``read_data=False`` takes the example shape and class count from ``config.data``
    (``data.data_spec``) instead of opening the dataset (evaluating imported weights).
    """
    if mesh is None:
        configlib.validate(config, num_devices=jax.device_count())
        mesh = parallel.create_mesh(dict(config.mesh))
    else:
        configlib.validate(config)
        configlib.check_batch_size(config, parallel.data_parallel_size(mesh), dict(mesh.shape))
    source = data.make_source(config.data) if read_data else data.data_spec(config.data)
    autoencoding.check_matches_dataset(config, source)
    example_shape = tuple(source.example_shape)
    num_classes = int(source.num_classes)
    stds = configlib.data_scale_stds(config, source)
    decomposition = configlib.build_pyramid(config, stds)
    model_config = configlib.build_model_config(
        config, example_shape[-1], num_classes, configlib.preconditioning_stds(config, stds)
    )
    model = dit.DiT(model_config)
    tx = make_optimizer(config.optimizer)
    step_config = StepConfig(
        model=model,
        decomposition=decomposition,
        objective=configlib.build_objective(config),
        tx=tx,
        learning_rate=learning_rate_schedule(config.optimizer),
        ema_decay=float(config.optimizer.ema_decay),
        ema_warmup=bool(config.optimizer.ema_warmup),
        num_classes=num_classes,
    )
    scale_shapes = [shape[1:] for shape in decomposition.scale_shapes((1, *example_shape))]
    dummy_inputs = dit.dummy_inputs(model_config, scale_shapes, batch_size=1)
    boxed = jax.eval_shape(
        lambda k: init_state(k, model, _zeros(dummy_inputs), tx), jax.random.key(0)
    )
    state_shardings = parallel.logical_shardings(boxed, mesh, config.sharding_rules)
    return Setup(
        config=config,
        mesh=mesh,
        source=source,
        example_shape=example_shape,
        num_classes=num_classes,
        model=model,
        model_config=model_config,
        step_config=step_config,
        state_shardings=state_shardings,
        abstract_state=checkpoint.abstract_with_shardings(nn.unbox(boxed), state_shardings),
        dummy_inputs=dummy_inputs,
        scale_shapes=scale_shapes,
    )


def _rules(setup: Setup):
    return tuple(tuple(rule) for rule in setup.config.sharding_rules)


def _zeros(abstract_tree):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_tree)


def initial_state(setup: Setup, key: jax.Array) -> TrainState:
    """A fresh state, materialised directly with its shardings (no host holds it whole)."""
    static = setup.step_config

    def init(k):
        return nn.unbox(init_state(k, static.model, _zeros(setup.dummy_inputs), static.tx))

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(_rules(setup)):
        return jax.jit(init, out_shardings=setup.state_shardings)(key)


def compile_train_step(setup: Setup):
    """The jitted step ``(state, batch, key) -> (state, metrics)`` with the state donated."""
    batch_sharding = data.batch_sharding(setup.mesh, parallel.BATCH_AXES)
    replicated = parallel.replicated(setup.mesh)
    step = jax.jit(
        functools.partial(train_step, static=setup.step_config),
        in_shardings=(setup.state_shardings, batch_sharding, replicated),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )
    return MeshBound(step, setup.mesh, _rules(setup))


class MeshBound:
    """A jitted function traced and run under a mesh and logical-axis rules.

    Calling it runs the function; ``lower(...)`` lowers it in the same context
    (for cost and memory analysis).
    """

    def __init__(self, jitted, mesh: jax.sharding.Mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


class PreemptionWatcher:
    """Turns SIGTERM into a flag that the loop checks between steps.

    With several processes the flag is combined across all of them, so every
    process saves the same step and leaves together.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step and exiting")
        self._event.set()

    def requested(self) -> bool:
        flag = self._event.is_set()
        if jax.process_count() > 1:
            flag = bool(multihost_utils.process_allgather(np.int32(flag)).max())
        return flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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


class SampleWriter:
    """Class-conditional sample grids and progressive preview strips from EMA parameters."""

    def __init__(self, setup: Setup, workdir: str, writer):
        sampling_config = setup.config.sampling
        self.setup, self.writer = setup, writer
        self.directory = os.path.join(workdir, "samples")
        self.rows = int(sampling_config.grid_classes)
        self.per_row = int(sampling_config.samples_per_class)
        self.preview_examples = int(sampling_config.preview_examples)
        self.labels = generate.grid_labels(setup.num_classes, self.rows, self.per_row)
        self.generate = generate.make_generate_fn(
            setup.model,
            setup.step_config.decomposition,
            setup.example_shape,
            sampling_config,
            null_label=setup.num_classes,
            return_previews=True,
        )
        self.key = jax.random.fold_in(jax.random.key(setup.config.seed), 2**31 - 1)
        # Latents are drawn through the autoencoder's decoder; 1- or 3-channel pixel images
        # as they are. Videos need a player: dfm_jax.eval evaluates those.
        self.codec = autoencoding.load_codec(setup.config, setup.mesh, required=False)
        shape = setup.example_shape
        self.enabled = len(shape) == 3 and (self.codec is not None or shape[-1] in (1, 3))
        if not self.enabled:
            logging.info(
                "No sample grids for examples of shape %s (1- or 3-channel images, or latents "
                "with config.autoencoder set, are drawn); evaluate with dfm_jax.eval",
                shape,
            )

    def __call__(self, step: int, ema_params) -> None:
        if not self.enabled:
            return
        with jax.set_mesh(self.setup.mesh), nn.logical_axis_rules(_rules(self.setup)):
            images, previews = self.generate(ema_params, self.key, self.labels)
            if self.codec is not None:
                images = self.codec.decode(images)
                previews = [self.codec.decode(p) for p in previews]
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        previews = [np.asarray(multihost_utils.process_allgather(p, tiled=True)) for p in previews]
        grid = viz.image_grid(images, columns=self.per_row)
        examples = np.arange(0, len(images), self.per_row)[: self.preview_examples]
        strip = viz.preview_strip([p[examples] for p in previews])
        if jax.process_index() == 0:
            viz.save_png(os.path.join(self.directory, f"step_{step:08d}_grid.png"), grid)
            viz.save_png(os.path.join(self.directory, f"step_{step:08d}_previews.png"), strip)
        self.writer.write_images(step, {"samples": grid[None], "previews": strip[None]})
        logging.info("Wrote sample grid and previews of step %d to %s", step, self.directory)


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
            batch = data.make_global_batch(next(iterator), setup.mesh, parallel.BATCH_AXES)
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

"""From settings to everything a run needs before its first step; shared by train, eval, bench.

``build(settings)`` builds, in order: the mesh (``settings.mesh``, or one given), the
data source (or only its shape, ``read_data=False``), the decomposition (standardised
by the data's per-scale stds when asked), the DFM-DiT, the training method
(``dfm_jax.method.methods``), the optimizer, and the abstract train state with its
shardings. Nothing is allocated on the devices: ``initial_state`` materialises a fresh
state directly sharded, and ``compile_train_step`` jits the pure step with the state
donated. Evaluation and the benchmark build what they need here; they never import the
training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.method import methods, pyramid
from dfm_jax.models import dit
from dfm_jax.preparation import stats
from dfm_jax.training import checkpoint, decoding
from dfm_jax.training.train_step import (
    StepConfig,
    TrainState,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    train_step,
)


@dataclasses.dataclass
class Setup:
    """Everything built from the settings before the first step.

    Attributes:
      settings: the run's validated settings.
      mesh: the device mesh.
      source: the data source (or a ``data.DataSpec`` when built without data).
      method: the training method (model, decomposition, objective, sampler).
      model_config: the DiT architecture.
      step_config: the static parts of the train step.
      state_shardings: ``NamedSharding`` per leaf of the train state.
      abstract_state: the state's ``ShapeDtypeStruct`` leaves carrying those shardings
        (restore targets).
    """

    settings: config_lib.Settings
    mesh: jax.sharding.Mesh
    source: Any
    method: methods.Method
    model_config: dit.DiTConfig
    step_config: StepConfig
    state_shardings: Any
    abstract_state: Any

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.method.example_shape

    @property
    def num_classes(self) -> int:
        return self.method.num_classes

    @property
    def rules(self) -> tuple[tuple[str, Any], ...]:
        return tuple(tuple(rule) for rule in self.settings.sharding_rules)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and logical-axis rules every program of this run is traced under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def bind(self, jitted: Callable) -> MeshBound:
        """``jitted``, traced and run under this run's mesh and rules."""
        return MeshBound(jitted, self)


class MeshBound:
    """A jitted function traced and run under a setup's mesh and logical-axis rules.

    Calling it runs the function; ``lower(...)`` lowers it in the same context (for
    cost and memory analysis).
    """

    def __init__(self, jitted: Callable, setup: Setup):
        self.jitted, self.setup = jitted, setup

    def __call__(self, *args):
        with self.setup.context():
            return self.jitted(*args)

    def lower(self, *args):
        with self.setup.context():
            return self.jitted.lower(*args)


#: Examples the per-scale stds of a dataset without stored ones are measured on.
MEASURED_STD_EXAMPLES = 256


def data_stds(
    settings: config_lib.PyramidSettings, source: Any, *, needed: bool = False
) -> tuple[float, ...] | None:
    """Per-scale data stds: ``settings.stds`` if set, else the dataset's metadata.

    A dataset that stores none (pixel sources) gets them measured when ``needed``
    (standardisation or preconditioning): on ``MEASURED_STD_EXAMPLES`` examples at
    seeded indices, the same in every process and run. Else None.
    """
    if settings.stds is not None:
        return settings.stds
    stored = source.scale_stds(settings.name)
    if stored is not None or not needed or not hasattr(source, "example"):
        return stored
    decomposition = pyramid.make(settings.kind, settings.ratios, temporal=settings.temporal)
    indices = stats.sample_indices(len(source), MEASURED_STD_EXAMPLES, seed=0)
    measured = stats.ScaleStats({settings.name: decomposition})
    for start in range(0, len(indices), 64):
        batch = [source.example(i)[data.IMAGE_KEY] for i in indices[start : start + 64]]
        measured.add(np.stack(batch))
    stds = tuple(float(s) for s in measured.stds()[settings.name])
    logging.info(
        "Per-scale stds of %s measured on %d examples of %s (it stores none): (%s); "
        "config.pyramid.stds fixes them",
        settings.name,
        len(indices),
        type(source).__name__,
        ", ".join(f"{s:.4f}" for s in stds),
    )
    return stds


def build_decomposition(
    settings: config_lib.PyramidSettings, stds: tuple[float, ...] | None
) -> pyramid.Decomposition:
    """The decomposition, divided by ``stds`` (the data's) when ``settings.standardize``."""
    if settings.standardize and stds is None:
        raise config_lib.ConfigError(
            "config.pyramid.stds: standardize=True needs per-scale stds: set "
            "config.pyramid.stds or use a prepared dataset whose metadata records them for "
            f"{settings.name!r}"
        )
    return pyramid.make(
        settings.kind,
        settings.ratios,
        stds if settings.standardize else None,
        temporal=settings.temporal,
    )


def model_stds(
    settings: config_lib.Settings, stds: tuple[float, ...] | None
) -> tuple[float, ...] | None:
    """sigma_s as the model sees the scales, for preconditioning: 1 when standardised."""
    if not settings.model.preconditioning:
        return None
    if settings.pyramid.standardize:
        return (1.0,) * settings.num_scales
    if stds is None:
        raise config_lib.ConfigError(
            "config.model.preconditioning needs per-scale data stds: set config.pyramid.stds "
            "or use a prepared dataset whose metadata records stds for "
            f"{settings.pyramid.name!r}"
        )
    return stds


def build_method(settings: config_lib.Settings, source: Any) -> methods.Method:
    """The training method of ``settings.method`` for data shaped like ``source``'s."""
    example_shape = tuple(source.example_shape)
    num_classes = int(source.num_classes)
    needed = bool(settings.pyramid.standardize or settings.model.preconditioning)
    stds = data_stds(settings.pyramid, source, needed=needed)
    architecture = settings.model.architecture(
        in_channels=example_shape[-1],
        num_classes=num_classes,
        scale_stds=model_stds(settings, stds),
        temporal_patch_sizes=settings.pyramid.temporal_patch_sizes,
    )
    if settings.method == "pyramidal":
        return methods.METHODS["pyramidal"](
            model=dit.DiT(architecture),
            schedule=settings.pyramidal.schedule(settings.num_scales),
            example_shape=example_shape,
            num_classes=num_classes,
            label_dropout=settings.objective.label_dropout,
        )
    if settings.method == "cascaded":
        return build_cascaded(settings, example_shape, num_classes)
    return methods.METHODS[settings.method](
        model=dit.DiT(architecture),
        decomposition=build_decomposition(settings.pyramid, stds),
        objective=settings.objective,
        example_shape=example_shape,
        num_classes=num_classes,
    )


def build_cascaded(
    settings: config_lib.Settings, example_shape: tuple[int, ...], num_classes: int
) -> methods.Method:
    """The Cascaded baseline: two DiTs of ``settings.model``'s size, one per stage."""
    p1, p2 = settings.model.patch_sizes

    def model(patch_sizes):
        section = dataclasses.replace(settings.model, patch_sizes=patch_sizes)
        config = section.architecture(
            in_channels=example_shape[-1], num_classes=num_classes, scale_stds=None
        )
        return dit.DiT(config)

    fields = settings.cascaded
    return methods.METHODS["cascaded"](
        stage1=model((p1,)),
        stage2=model((p2, p2)),
        ratio=settings.pyramid.ratios[0],
        objective=settings.objective,
        example_shape=example_shape,
        num_classes=num_classes,
        stage1_fraction=fields.stage1_fraction,
        condition_location=fields.condition_location,
        condition_scale=fields.condition_scale,
        inference_noise=fields.inference_noise,
        batch_size=settings.batch_size,
    )


def build(
    settings: config_lib.Settings,
    mesh: jax.sharding.Mesh | None = None,
    *,
    read_data: bool = True,
) -> Setup:
    """The mesh, data source, method, optimizer and sharded state layout of a run.

    ``mesh`` (e.g. over a subset of the devices) replaces the one ``settings.mesh``
    describes. ``read_data=False`` takes the example shape and class count from
    ``settings.data`` (``data.data_spec``) instead of opening the dataset (evaluating
    imported weights).
    """
    if mesh is None:
        config_lib.check_devices(settings, jax.device_count())
        mesh = parallel.create_mesh(settings.mesh.as_dict())
    else:
        config_lib.check_batch_size(settings.batch_size, parallel.data_parallel_size(mesh))
    source = data.make_source(settings.data) if read_data else data.data_spec(settings.data)
    decoding.check_matches_dataset(settings.autoencoder, source)
    method = build_method(settings, source)
    tx = make_optimizer(settings.optimizer)
    step_config = StepConfig(
        method=method,
        tx=tx,
        learning_rate=learning_rate_schedule(settings.optimizer),
        ema_decay=settings.optimizer.ema_decay,
        ema_warmup=settings.optimizer.ema_warmup,
    )
    boxed = jax.eval_shape(lambda k: init_state(k, method, tx), jax.random.key(0))
    state_shardings = parallel.logical_shardings(boxed, mesh, settings.sharding_rules)
    return Setup(
        settings=settings,
        mesh=mesh,
        source=source,
        method=method,
        model_config=method.model.config,
        step_config=step_config,
        state_shardings=state_shardings,
        abstract_state=checkpoint.abstract_with_shardings(nn.unbox(boxed), state_shardings),
    )


def initial_state(setup: Setup, key: jax.Array) -> TrainState:
    """A fresh state, materialised directly with its shardings (no host holds it whole)."""
    static = setup.step_config

    def init(k):
        return nn.unbox(init_state(k, static.method, static.tx))

    with setup.context():
        return jax.jit(init, out_shardings=setup.state_shardings)(key)


def compile_train_step(setup: Setup) -> MeshBound:
    """The jitted step ``(state, batch, key) -> (state, metrics)`` with the state donated."""
    batch_sharding = parallel.batch_sharding(setup.mesh, parallel.BATCH_AXES)
    replicated = parallel.replicated(setup.mesh)
    step = jax.jit(
        functools.partial(train_step, static=setup.step_config),
        in_shardings=(setup.state_shardings, batch_sharding, replicated),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )
    return setup.bind(step)

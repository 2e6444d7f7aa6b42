"""Everything built from the config before the first step, shared by training, eval and bench.

``build(config)`` validates the config and builds the mesh, the data source (or only its
shape), the decomposition, the model, the optimizer and the abstract, sharded state
layout; ``initial_state`` materialises a fresh state directly sharded and
``compile_train_step`` jits the pure step with the state donated. Nothing here runs a
training loop: evaluation and the benchmark build what they need from this module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.models import dit
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
        config_lib.validate(config, num_devices=jax.device_count())
        mesh = parallel.create_mesh(dict(config.mesh))
    else:
        config_lib.validate(config)
        config_lib.check_batch_size(config, parallel.data_parallel_size(mesh), dict(mesh.shape))
    source = data.make_source(config.data) if read_data else data.data_spec(config.data)
    decoding.check_matches_dataset(config, source)
    example_shape = tuple(source.example_shape)
    num_classes = int(source.num_classes)
    stds = config_lib.data_scale_stds(config, source)
    decomposition = config_lib.build_pyramid(config, stds)
    model_config = config_lib.build_model_config(
        config, example_shape[-1], num_classes, config_lib.preconditioning_stds(config, stds)
    )
    model = dit.DiT(model_config)
    tx = make_optimizer(config.optimizer)
    step_config = StepConfig(
        model=model,
        decomposition=decomposition,
        objective=config_lib.build_objective(config),
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
    batch_sharding = parallel.batch_sharding(setup.mesh, parallel.BATCH_AXES)
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

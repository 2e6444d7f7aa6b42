"""Train state, optimizer and the pure train step of any training method.

Everything here is a pure function of its inputs: ``setup.compile_train_step`` jits
``train_step`` with shardings and donates the state. The method
(``dfm_jax.method.methods``) turns a batch into a loss; this module differentiates it,
clips, applies AdamW and the EMA, and skips non-finite updates. Randomness comes from
``fold_in(base_key, state.step)``, so a resumed run repeats an uninterrupted one
exactly.

A batch is ``{"image": (B, H, W, C) or (B, T, H, W, C) float, "label": (B,) int32}``
(``"image"`` holds pixels in [-1, 1] or autoencoder latents).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dfm_jax.method.methods import Method

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (one pytree).

    Attributes:
      step: int32 scalar, number of steps taken (skipped updates included).
      params: model parameters.
      ema_params: exponential moving average of ``params``.
      opt_state: optimizer state.
      consecutive_nonfinite: int32, non-finite steps in a row (0 after a good step).
      skipped_updates: int32, total steps whose update was skipped.
    """

    step: Array
    params: Any
    ema_params: Any
    opt_state: Any
    consecutive_nonfinite: Array
    skipped_updates: Array


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then constant.

    ``config`` is a ``dfm_jax.config.OptimizerSettings``.
    """
    if config.warmup_steps <= 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
            optax.constant_schedule(config.learning_rate),
        ],
        boundaries=[config.warmup_steps],
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (paper: betas (0.9, 0.99), wd 0.01, clip 1.0).

    ``config`` is a ``dfm_jax.config.OptimizerSettings``. Weight decay applies to every
    parameter, as in the paper's setup.
    """
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def init_state(key: Array, method: Method, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state. Leaves stay boxed (``nn.Partitioned``) for sharding lookup.

    Call under ``jax.eval_shape`` to get the abstract state and its logical
    partition specs, and under ``jax.jit(..., out_shardings=...)`` (after
    ``nn.unbox``) to materialise it directly sharded.
    """
    params = method.init(key)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        ema_params=params,
        opt_state=tx.init(params),
        consecutive_nonfinite=zero,
        skipped_updates=zero,
    )


def ema_decay_at(step: Array, decay: float, warmup: bool) -> Array:
    """EMA decay at a step: ``min(decay, (1 + step) / (10 + step))`` with warm-up.

    The warm-up (as in TensorFlow's ``ExponentialMovingAverage(num_updates=)``)
    keeps early averages from being dominated by the initial parameters, whose
    zero output layers would otherwise leave the EMA model nearly silent for
    the first ~1/(1 - decay) steps. It changes nothing after ~10/(1 - decay)
    steps, a small part of a paper-length run.
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static parts of the train step (closed over by ``jax.jit``)."""

    method: Method
    tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    ema_decay: float
    ema_warmup: bool = True


def train_step(
    state: TrainState, batch: dict[str, Array], base_key: Array, static: StepConfig
) -> tuple[TrainState, dict[str, Array]]:
    """One update: the method's loss and gradient, clipped AdamW, EMA.

    A step whose loss or gradient norm is not finite leaves parameters, optimizer
    state and EMA unchanged; ``consecutive_nonfinite`` and ``skipped_updates``
    count such steps.

    Returns:
      The new state and float32 metrics: ``loss``, the method's own metrics (DFM:
      ``loss_scale{s}``, ``active_scale{s}``), ``grad_norm``, ``learning_rate``,
      ``finite``, and ``consecutive_nonfinite`` (int32).
    """
    key = jax.random.fold_in(base_key, state.step)

    def compute_loss(params):
        return static.method.loss(params, batch["image"], batch["label"], key)

    (loss, method_metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(old):
        params, ema_params, opt_state = old
        updates, new_opt_state = static.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        decay = ema_decay_at(state.step, static.ema_decay, static.ema_warmup)
        new_ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, new_params)
        return new_params, new_ema, new_opt_state

    # One branch runs: a skipped step's state is the old one, bit for bit, and the
    # update writes in place (a per-leaf jnp.where kept a copy of every old leaf).
    old = (state.params, state.ema_params, state.opt_state)
    params, ema_params, opt_state = jax.lax.cond(finite, update, lambda old: old, old)
    nonfinite = (~finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        consecutive_nonfinite=(state.consecutive_nonfinite + 1) * nonfinite,
        skipped_updates=state.skipped_updates + nonfinite,
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(static.learning_rate(state.step), jnp.float32),
        "finite": finite.astype(jnp.float32),
        "consecutive_nonfinite": new_state.consecutive_nonfinite,
        **method_metrics,
    }
    return new_state, metrics

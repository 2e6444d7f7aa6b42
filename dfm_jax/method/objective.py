"""The DFM training objective (DFM spec section 2, paper Algorithm 1).

Paper time convention throughout: ``x_t = t * x + (1 - t) * noise``, ``t = 0``
is pure noise, ``t = 1`` is data, and the velocity target is ``x - noise``.

For every example with S scales ``X_1 .. X_S`` (coarsest first):

1. draw the stage ``Q`` in ``1..S`` (the number of scales being generated)
   from ``Categorical(stage_probs)``;
2. ``t_Q ~ LogitNormal(current_location, current_scale)``;
3. ``t_s ~ LogitNormal(earlier_location, earlier_scale)`` for ``s < Q``;
4. ``t_s = 0`` and mask ``M_s = 0`` for ``s > Q`` (``M_s = 1`` for ``s <= Q``);
5. ``x_s = t_s X_s + (1 - t_s) eps_s`` and ``v_s = X_s - eps_s`` with
   independent noise per scale;
6. (in the model) masked scales' inputs are zeroed;
7. loss ``sum_s M_s * mean((G_s - v_s)^2)``, averaged over the batch;
8. class labels are replaced by the null class with probability
   ``label_dropout`` for classifier-free guidance.

Plain Flow Matching is the special case S = 1, ``stage_probs = (1.0,)``.

``Q`` is drawn per example by default (``stage_sampling="per_example"``); the
authors' code draws one ``Q`` per device batch (``"per_batch"``, here one per
global batch). Both have the same expectation; per example gives a
lower-variance gradient and makes the loss independent of how the batch is
split over devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

STAGE_SAMPLING_MODES = ("per_example", "per_batch")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the DFM objective.

    Attributes:
      stage_probs: ``p_q``, the probability of each stage Q = 1..S; its length is
        the number of scales. Paper: ``(0.9, 0.1)`` for two scales; Flow
        Matching: ``(1.0,)``.
      current_location, current_scale: LogitNormal parameters of ``t_Q``, the
        time of the stage being generated (paper: 0 and 1).
      earlier_location, earlier_scale: LogitNormal parameters of ``t_s`` for the
        earlier stages ``s < Q`` (paper: 1.5 and 1; the authors' code uses 2.0).
      stage_sampling: ``"per_example"`` or ``"per_batch"``, see module doc.
      label_dropout: probability of replacing a class label by the null class.
    """

    stage_probs: tuple[float, ...] = (0.9, 0.1)
    current_location: float = 0.0
    current_scale: float = 1.0
    earlier_location: float = 1.5
    earlier_scale: float = 1.0
    stage_sampling: str = "per_example"
    label_dropout: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "stage_probs", tuple(float(p) for p in self.stage_probs))
        self.validate()

    @property
    def num_scales(self) -> int:
        return len(self.stage_probs)

    def validate(self, num_scales: int | None = None) -> None:
        """Raises ``ValueError`` naming the problem; ``num_scales`` checks p_q's length."""
        probs = self.stage_probs
        if not probs:
            raise ValueError(
                "stage_probs is empty; give one probability per scale, e.g. (0.9, 0.1)"
            )
        if num_scales is not None and len(probs) != num_scales:
            raise ValueError(
                f"stage_probs {probs} has {len(probs)} entries but the pyramid has "
                f"{num_scales} scales; give one probability per scale"
            )
        if any(p < 0 or not math.isfinite(p) for p in probs):
            raise ValueError(f"stage_probs must be non-negative, got {probs}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"stage_probs must sum to 1, got {probs} (sum {sum(probs):.6g})")
        for name in ("current_scale", "earlier_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stage_sampling not in STAGE_SAMPLING_MODES:
            raise ValueError(
                f"stage_sampling must be one of {STAGE_SAMPLING_MODES}, got {self.stage_sampling!r}"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


class TrainingInputs(NamedTuple):
    """One batch of DFM training inputs.

    Attributes:
      noisy: per-scale noisy inputs ``x_s``, shapes as the scales.
      targets: per-scale velocity targets ``v_s = X_s - eps_s``.
      t: ``(B, S)`` float32 per-scale times (0 for masked scales).
      mask: ``(B, S)`` float32, 1 for active scales ``s <= Q``.
      stage: ``(B,)`` int32, the stage Q in ``1..S``.
    """

    noisy: tuple[Array, ...]
    targets: tuple[Array, ...]
    t: Array
    mask: Array
    stage: Array


def logit_normal(key: Array, shape: Sequence[int], location: float, scale: float) -> Array:
    """``sigmoid(location + scale * N(0, 1))`` samples, float32."""
    return jax.nn.sigmoid(location + scale * jax.random.normal(key, shape, jnp.float32))


def sample_stages(key: Array, batch_size: int, config: ObjectiveConfig) -> Array:
    """Draws the stage Q in ``1..S`` for each example, ``(batch_size,)`` int32."""
    logits = jnp.log(jnp.asarray(config.stage_probs, jnp.float32))
    num_draws = batch_size if config.stage_sampling == "per_example" else 1
    stage = jax.random.categorical(key, logits, shape=(num_draws,)) + 1
    return jnp.broadcast_to(stage, (batch_size,)).astype(jnp.int32)


def sample_times(key: Array, stage: Array, config: ObjectiveConfig) -> tuple[Array, Array]:
    """Per-scale times and masks for given stages (steps 2-4 of the objective).

    Args:
      key: PRNG key.
      stage: ``(B,)`` int, Q in ``1..S``.
      config: objective hyperparameters; S = ``config.num_scales``.

    Returns:
      ``t`` and ``mask``, both ``(B, S)`` float32: ``t[:, Q-1]`` from the current
      stage's LogitNormal, ``t[:, s]`` for ``s < Q-1`` from the earlier stages'
      one, and 0 for the masked scales beyond Q.
    """
    num_scales = config.num_scales
    shape = (stage.shape[0], num_scales)
    key_current, key_earlier = jax.random.split(key)
    t_current = logit_normal(key_current, shape, config.current_location, config.current_scale)
    t_earlier = logit_normal(key_earlier, shape, config.earlier_location, config.earlier_scale)
    scale_number = jnp.arange(1, num_scales + 1)[None, :]
    stage = stage[:, None]
    t = jnp.where(scale_number < stage, t_earlier, jnp.where(scale_number == stage, t_current, 0.0))
    mask = (scale_number <= stage).astype(jnp.float32)
    return t, mask


def _per_example(t_s: Array, like: Array) -> Array:
    """Reshapes ``(B,)`` times to broadcast against a ``(B, ...)`` scale."""
    return t_s.reshape(t_s.shape + (1,) * (like.ndim - 1)).astype(like.dtype)


def interpolate(data: Array, noise: Array, t_s: Array) -> Array:
    """``t * data + (1 - t) * noise`` with per-example ``t_s`` of shape ``(B,)``."""
    t_s = _per_example(t_s, data)
    return t_s * data + (1 - t_s) * noise


def predicted_data(x_t: Array, velocity: Array, t_s: Array) -> Array:
    """The clean sample implied by a velocity: ``x_t + (1 - t) * v``; ``t_s`` is ``(B,)``."""
    return x_t + (1 - _per_example(t_s, x_t)) * velocity


def make_training_inputs(
    key: Array, scales: Sequence[Array], config: ObjectiveConfig
) -> TrainingInputs:
    """Stages, times, masks, noisy inputs and targets for one batch (steps 1-5).

    Args:
      key: PRNG key (fold in the step number upstream).
      scales: S arrays ``(B, ...)``, coarsest first (output of a decomposition).
      config: objective hyperparameters; ``len(config.stage_probs)`` must be S.

    Returns:
      ``TrainingInputs``; noise is independent per scale.
    """
    config.validate(num_scales=len(scales))
    key_stage, key_time, key_noise = jax.random.split(key, 3)
    batch_size = scales[0].shape[0]
    stage = sample_stages(key_stage, batch_size, config)
    t, mask = sample_times(key_time, stage, config)
    noise_keys = jax.random.split(key_noise, len(scales))
    noisy, targets = [], []
    for s, (data, noise_key) in enumerate(zip(scales, noise_keys, strict=True)):
        noise = jax.random.normal(noise_key, data.shape, data.dtype)
        noisy.append(interpolate(data, noise, t[:, s]))
        targets.append(data - noise)
    return TrainingInputs(tuple(noisy), tuple(targets), t, mask, stage)


def drop_labels(key: Array, labels: Array, probability: float, null_label: int) -> Array:
    """Replaces each label by ``null_label`` with the given probability (step 8)."""
    if probability == 0.0:
        return labels
    drop = jax.random.bernoulli(key, probability, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


class LossOutput(NamedTuple):
    """The objective's value and its parts.

    Attributes:
      loss: scalar, ``mean_b sum_s M_bs * mse_bs`` (float32).
      per_scale: ``(S,)`` mean squared error of each scale over the examples in
        which it is active (0 where no example has it active), for logging.
      active_fraction: ``(S,)`` fraction of examples in which each scale is active.
    """

    loss: Array
    per_scale: Array
    active_fraction: Array


def loss_fn(predictions: Sequence[Array], targets: Sequence[Array], mask: Array) -> LossOutput:
    """Masked DFM loss (step 7): unweighted sum over active scales of the per-scale MSE.

    A masked scale's prediction does not influence the loss or its gradient in
    any way (it is selected out with ``where``, so even non-finite values there
    are ignored).

    Args:
      predictions, targets: S arrays ``(B, ...)`` each.
      mask: ``(B, S)``, 1 for active scales.

    Returns:
      ``LossOutput`` in float32.
    """
    if len(predictions) != len(targets) or len(targets) != mask.shape[-1]:
        raise ValueError(
            f"got {len(predictions)} predictions, {len(targets)} targets and a mask for "
            f"{mask.shape[-1]} scales; they must agree"
        )
    active = mask > 0
    per_example = []
    for s, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
        mse = error.reshape(error.shape[0], -1).mean(axis=1)
        per_example.append(jnp.where(active[:, s], mse, 0.0))
    per_example = jnp.stack(per_example, axis=1)  # (B, S)
    active_count = active.sum(axis=0)
    per_scale = per_example.sum(axis=0) / jnp.maximum(active_count, 1)
    return LossOutput(
        loss=per_example.sum(axis=1).mean(),
        per_scale=per_scale,
        active_fraction=active_count / mask.shape[0],
    )

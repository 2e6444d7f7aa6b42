"""Cascaded generation (the paper's baseline, DFM spec sections 5 and 7): two separate models.

Time convention (this project's): ``t = 0`` is noise, ``t = 1`` is data, ``x_t = t x +
(1 - t) eps``, velocity ``x - eps``.

* Stage 1: a single-scale DiT (patch ``p_1``) trained with Flow Matching on the low-resolution
  image ``x_low = down(x, r)`` (bilinear, no antialias: the DFM pyramid's coarse scale).
* Stage 2: a DiT at the full resolution trained with Flow Matching on ``x``, conditioned on
  the noise-augmented, upsampled low-resolution image ``c = up(t_c x_low + (1 - t_c) eps_c)``
  (bilinear). The conditioning enters through its own patch embedder and timestep embedder:
  stage 2 is the project's DiT with two input slots of patch ``p_2`` at the full resolution,
  slot 0 the conditioning (time ``t_c``), slot 1 the noisy image (time ``t``), and only slot
  1's head is read. NOTE: the DiT SUMS the two slots' token embeddings (as DFM sums its
  scales), where the paper's baseline concatenates the two token sequences; summing keeps the
  token count (and the FLOPs) of one sequence. This is a deviation, stated here.
* Conditioning noise augmentation: ``t_c ~ LogitNormal(condition_location, condition_scale)``
  in training (paper: 1.5, 1, i.e. mostly clean) and ``t_c = 1 - inference_noise`` at
  inference (paper: noise level 0.025).
* Flow Matching times: ``t ~ LogitNormal(objective.current_location, current_scale)`` (0, 1)
  for both stages; labels dropped with ``objective.label_dropout`` (the same draw for both).

Equal compute: one run trains both models (one parameter tree ``{"stage1", "stage2"}``, one
optimizer state, one checkpoint). Each batch is split: its first ``n_1 = round(B *
stage1_fraction)`` examples train stage 1, the rest stage 2; the loss is the mean over all B
examples of their stage's MSE, so the split sets how the gradient signal (and the FLOPs)
are shared. ``forward_flops`` is the expected FLOPs per training example,
``f flops_1 + (1 - f) flops_2`` with ``f = n_1 / B`` for the configured batch.

Sampling: stage 1 then stage 2 with ``sampling.sample`` (single-scale Euler / Heun),
``steps_per_stage = (T_1, T_2)`` (paper 20 + 20), classifier-free guidance in each stage
(the conditioning image is shared by the conditional and unconditional halves). The
sampler's thresholds are not used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dfm_jax.method import objective, pyramid, sampling
from dfm_jax.method.schedule import SamplerSettings
from dfm_jax.models import dit

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Cascaded:
    """Cascaded generation behind the ``methods.Method`` interface (registered there).

    Attributes:
      stage1: single-scale DiT for the low resolution ``(H / ratio, W / ratio)``.
      stage2: two-slot DiT (``patch_sizes == (p, p)``) for the full resolution.
      ratio: resolution ratio between the stages (2 or 4).
      objective: Flow Matching times and label dropout (``current_*``, ``label_dropout``).
      example_shape: one full-resolution example ``(H, W, C)``.
      num_classes: class count; label ``num_classes`` is the null class.
      stage1_fraction: the fraction of every batch trained on stage 1.
      condition_location, condition_scale: LogitNormal of the training ``t_c``.
      inference_noise: ``1 - t_c`` at inference.
      batch_size: the training batch (only for ``forward_flops``' rounding of the split).
    """

    name = "cascaded"
    stage1: dit.DiT
    stage2: dit.DiT
    ratio: int
    objective: objective.ObjectiveConfig
    example_shape: tuple[int, ...]
    num_classes: int
    stage1_fraction: float = 0.5
    condition_location: float = 1.5
    condition_scale: float = 1.0
    inference_noise: float = 0.025
    batch_size: int = 256

    def __post_init__(self):
        patches = self.stage2.config.patch_sizes
        if self.stage1.config.num_scales != 1 or len(patches) != 2 or patches[0] != patches[1]:
            raise ValueError(
                f"Cascaded needs a single-scale stage-1 DiT and a two-slot stage-2 DiT with one "
                f"patch size, got {self.stage1.config.patch_sizes} and {patches}"
            )
        if not 0.0 < self.stage1_fraction < 1.0:
            raise ValueError(f"stage1_fraction must be in (0, 1), got {self.stage1_fraction}")
        if not 0.0 <= self.inference_noise < 1.0:
            raise ValueError(f"inference_noise must be in [0, 1), got {self.inference_noise}")
        dit.token_grid(self.stage1.config, [self.low_shape])
        dit.token_grid(self.stage2.config, [self.example_shape] * 2)

    @property
    def model(self) -> dit.DiT:
        """The stage-2 (full-resolution) model, for the trainer's header line."""
        return self.stage2

    @property
    def low_shape(self) -> tuple[int, ...]:
        *lead, h, w, c = self.example_shape
        if h % self.ratio or w % self.ratio:
            raise ValueError(f"example {self.example_shape} not divisible by ratio {self.ratio}")
        return (*lead, h // self.ratio, w // self.ratio, c)

    @property
    def scale_shapes(self) -> list[tuple[int, ...]]:
        return [self.low_shape, tuple(self.example_shape)]

    def _down(self, x: Array) -> Array:
        return pyramid.resize_bilinear(x, x.shape[-3] // self.ratio, x.shape[-2] // self.ratio)

    def _up(self, x: Array) -> Array:
        return pyramid.resize_bilinear(x, x.shape[-3] * self.ratio, x.shape[-2] * self.ratio)

    def init(self, key: Array):
        def one(model, shapes, k):
            inputs = dit.dummy_inputs(model.config, shapes, batch_size=1)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), inputs)
            return model.init(k, *zeros)["params"]

        k1, k2 = jax.random.split(key)
        return {
            "stage1": one(self.stage1, [self.low_shape], k1),
            "stage2": one(self.stage2, [self.example_shape] * 2, k2),
        }

    def stage1_velocity(self, params):
        """``sampling`` velocity function of stage 1 at ``params["stage1"]``."""

        def velocity(scales, t, mask, labels):
            return self.stage1.apply({"params": params["stage1"]}, scales, t, mask, labels)

        return velocity

    def stage2_velocity(self, params, condition: Array, t_condition: float | Array):
        """``sampling`` velocity function of stage 2 given the (noised, upsampled) condition."""

        def velocity(scales, t, mask, labels):
            (x,) = scales
            cond = condition
            if x.shape[0] != cond.shape[0]:  # the guided [cond; uncond] batch
                cond = jnp.concatenate([cond] * (x.shape[0] // cond.shape[0]))
            t_c = jnp.broadcast_to(jnp.asarray(t_condition, jnp.float32), (x.shape[0],))
            out = self.stage2.apply(
                {"params": params["stage2"]},
                (cond, x),
                jnp.stack([t_c, t[:, 0]], axis=1),
                jnp.ones((x.shape[0], 2), jnp.float32),
                labels,
            )
            return (out[1],)

        return velocity

    def _condition(self, low: Array, key: Array, t_c: Array) -> Array:
        """``up(t_c low + (1 - t_c) eps)`` with per-example ``t_c`` (B,)."""
        noise = jax.random.normal(key, low.shape, jnp.float32)
        return self._up(objective.interpolate(low, noise, t_c))

    def split(self, batch: int) -> int:
        """``n_1``: the examples of a batch of ``batch`` trained on stage 1."""
        n1 = round(batch * self.stage1_fraction)
        if not 0 < n1 < batch:
            raise ValueError(
                f"a batch of {batch} with stage1_fraction {self.stage1_fraction} leaves a stage "
                "without examples"
            )
        return n1

    def loss(self, params, images: Array, labels: Array, key: Array):
        """Stage 1 on the first ``n_1`` examples, stage 2 on the rest (module docstring).

        Metrics: ``loss_stage1``, ``loss_stage2`` (each stage's mean MSE).
        """
        batch, n1 = images.shape[0], self.split(images.shape[0])
        keys = jax.random.split(key, 6)
        obj = self.objective
        images = images.astype(jnp.float32)
        labels = objective.drop_labels(keys[0], labels, obj.label_dropout, self.num_classes)
        t = objective.logit_normal(keys[1], (batch,), obj.current_location, obj.current_scale)
        low = self._down(images[:n1])
        noise1 = jax.random.normal(keys[2], low.shape, jnp.float32)
        pred1 = self.stage1_velocity(params)(
            (objective.interpolate(low, noise1, t[:n1]),),
            t[:n1, None],
            jnp.ones((n1, 1)),
            labels[:n1],
        )[0]
        err1 = jnp.square(pred1 - (low - noise1)).reshape(n1, -1).mean(axis=1)
        high = images[n1:]
        t_c = objective.logit_normal(
            keys[3], (batch - n1,), self.condition_location, self.condition_scale
        )
        condition = self._condition(self._down(high), keys[4], t_c)
        noise2 = jax.random.normal(keys[5], high.shape, jnp.float32)
        x2 = objective.interpolate(high, noise2, t[n1:])
        pred2 = self.stage2_velocity(params, condition, t_c)(
            (x2,), t[n1:, None], None, labels[n1:]
        )[0]
        err2 = jnp.square(pred2 - (high - noise2)).reshape(batch - n1, -1).mean(axis=1)
        loss = jnp.concatenate([err1, err2]).mean()
        return loss, {"loss_stage1": err1.mean(), "loss_stage2": err2.mean()}

    def generate(
        self, params, key: Array, labels: Array, sampler: SamplerSettings, *, previews: bool = False
    ):
        """Stage 1 (``T_1`` steps) then stage 2 (``T_2``); previews: [stage 1 sample, final]."""
        sampler.check_num_scales(2, what="the cascaded model")
        batch = labels.shape[0]
        first, second = (
            SamplerSettings(
                (steps,), (), sampler.solver, sampler.cfg_scale, sampler.guidance_interval
            )
            for steps in sampler.steps_per_stage
        )
        k1, k2, k3 = jax.random.split(key, 3)
        noise1 = jax.random.normal(k1, (batch, *self.low_shape), jnp.float32)
        (low,) = sampling.sample(
            self.stage1_velocity(params), [noise1], labels, first, null_label=self.num_classes
        )
        t_c = 1.0 - self.inference_noise
        condition = self._condition(low, k2, jnp.full((batch,), t_c, jnp.float32))
        noise2 = jax.random.normal(k3, (batch, *self.example_shape), jnp.float32)
        (images,) = sampling.sample(
            self.stage2_velocity(params, condition, t_c),
            [noise2],
            labels,
            second,
            null_label=self.num_classes,
        )
        return (images, [low, images]) if previews else images

    def forward_flops(self) -> int:
        """Expected forward FLOPs per training example under the configured batch split."""
        n1 = self.split(self.batch_size)
        f1 = dit.forward_flops(self.stage1.config, [self.low_shape])
        f2 = dit.forward_flops(self.stage2.config, [self.example_shape] * 2)
        return (n1 * f1 + (self.batch_size - n1) * f2) // self.batch_size

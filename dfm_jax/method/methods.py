"""Training methods: how a batch becomes a loss, and noise becomes samples.

A ``Method`` is the one interface that the trainer, the sample writer, evaluation and
the benchmark use, so a new method (e.g. Cascaded or Pyramidal Flow) plugs in without
touching any of them. Everything is a pure function of its arguments (parameters are
passed in, never closed over), meant to be called inside ``jax.jit``:

* ``init(key) -> params``: the network parameters, boxed with their logical axis names
  (``nn.LogicallyPartitioned``) so the trainer can look up their shardings;
* ``loss(params, images, labels, key) -> (loss, metrics)``: one batch of training;
  ``images`` ``(B, H, W, C)`` or ``(B, T, H, W, C)`` (pixels in [-1, 1] or latents),
  ``labels`` ``(B,)`` int32; ``loss`` a float32 scalar, ``metrics`` float32 scalars;
* ``generate(params, key, labels, sampler, previews=False)``: samples ``(B, *example_shape)``
  from noise; with ``previews`` also the progressive previews, coarsest first, the last
  being the final sample;
* ``forward_flops()``: analytic FLOPs of one network forward pass per example (the
  trainer's MFU line and the benchmark; training costs ``3 x`` this).

Implementations: ``DecomposableFlowMatching`` (the paper; ``dfm_jax.method.objective`` and
``dfm_jax.method.sampling``) and ``FlowMatching``, its one-scale special case (S = 1,
``p_q = (1,)``), which is the paper's Flow Matching baseline exactly. The Pyramidal Flow
baseline is ``dfm_jax.method.pyramidal.PyramidalFlow`` and the Cascaded one
``dfm_jax.method.cascaded.Cascaded`` (both registered below).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dfm_jax.method import cascaded, objective, pyramidal, sampling
from dfm_jax.method.pyramid import Decomposition
from dfm_jax.models import dit

Array = jax.Array


class Method(abc.ABC):
    """The training-method interface (see the module docstring)."""

    name: ClassVar[str]
    example_shape: tuple[int, ...]
    num_classes: int

    @abc.abstractmethod
    def init(self, key: Array) -> Any:
        """Boxed network parameters (call under ``jax.eval_shape`` for the layout)."""

    @abc.abstractmethod
    def loss(
        self, params: Any, images: Array, labels: Array, key: Array
    ) -> tuple[Array, dict[str, Array]]:
        """The training loss of one batch and float32 metrics to log."""

    @abc.abstractmethod
    def generate(
        self,
        params: Any,
        key: Array,
        labels: Array,
        sampler: sampling.SamplerSettings,
        *,
        previews: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        """Class-conditional samples ``(B, *example_shape)`` [and the previews]."""

    @abc.abstractmethod
    def forward_flops(self) -> int:
        """FLOPs of one forward pass of the network for one example."""


@dataclasses.dataclass(frozen=True)
class DecomposableFlowMatching(Method):
    """DFM (paper Algorithm 1 and section 3.3): per-scale times, masks and samplers.

    Attributes:
      model: the DFM-DiT (``dfm_jax.models.dit.DiT``); its ``patch_sizes`` give one
        patch size per scale of ``decomposition``.
      decomposition: the pyramid (optionally standardised) the model works on.
      objective: p_q, the LogitNormal time distributions and the label dropout.
      example_shape: one example, ``(H, W, C)`` or ``(T, H, W, C)``.
      num_classes: class count; label ``num_classes`` is the null class.
    """

    name: ClassVar[str] = "dfm"
    model: dit.DiT
    decomposition: Decomposition
    objective: objective.ObjectiveConfig
    example_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self):
        self.objective.validate(num_scales=self.decomposition.num_scales)

    @property
    def scale_shapes(self) -> list[tuple[int, ...]]:
        """Per-example shapes of the scales, coarsest first."""
        return [s[1:] for s in self.decomposition.scale_shapes((1, *self.example_shape))]

    def network(self, params: Any) -> Callable[..., tuple[Array, ...]]:
        """The velocity network ``(scales, t, mask, labels) -> velocities`` at ``params``."""

        def velocity(scales, t, mask, labels):
            return self.model.apply({"params": params}, scales, t, mask, labels)

        return velocity

    def init(self, key: Array) -> Any:
        inputs = dit.dummy_inputs(self.model.config, self.scale_shapes, batch_size=1)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), inputs)
        return self.model.init(key, *zeros)["params"]

    def loss(
        self, params: Any, images: Array, labels: Array, key: Array
    ) -> tuple[Array, dict[str, Array]]:
        """Decompose, draw stages/times/noise (steps 1-5), drop labels (step 8), masked loss.

        Metrics: ``loss_scale{s}`` (mean over the examples where scale s is active) and
        ``active_scale{s}`` (the fraction of examples with scale s active), s = 1..S.
        """
        key_inputs, key_labels = jax.random.split(key)
        scales = self.decomposition.decompose(images.astype(jnp.float32))
        inputs = objective.make_training_inputs(key_inputs, scales, self.objective)
        labels = objective.drop_labels(
            key_labels, labels, self.objective.label_dropout, self.num_classes
        )
        predictions = self.network(params)(inputs.noisy, inputs.t, inputs.mask, labels)
        output = objective.loss_fn(predictions, inputs.targets, inputs.mask)
        metrics = {}
        for s in range(len(scales)):
            metrics[f"loss_scale{s + 1}"] = output.per_scale[s]
            metrics[f"active_scale{s + 1}"] = output.active_fraction[s]
        return output.loss, metrics

    def generate(
        self,
        params: Any,
        key: Array,
        labels: Array,
        sampler: sampling.SamplerSettings,
        *,
        previews: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        """Staged sampling from per-scale noise (``fold_in(key, s)`` for scale s).

        With ``previews``, ``previews[k - 1]`` (k < S) is the recomposed prediction of
        stages 1..k when stage k reached its threshold, at scale k's resolution, and the
        last entry the final sample.
        """
        sampler.check_num_scales(self.decomposition.num_scales)
        shapes = self.decomposition.scale_shapes((labels.shape[0], *self.example_shape))
        noise = sampling.initial_noise(key, shapes)
        result = sampling.sample(
            self.network(params),
            noise,
            labels,
            sampler,
            null_label=self.num_classes,
            return_previews=previews,
        )
        if not previews:
            return self.decomposition.recompose(list(result))
        final, predicted = result
        images = self.decomposition.recompose(list(final))
        strips = [self.decomposition.preview(list(p), k) for k, p in enumerate(predicted, 1)]
        return images, [*strips, images]

    def forward_flops(self) -> int:
        return dit.forward_flops(self.model.config, self.scale_shapes)


@dataclasses.dataclass(frozen=True)
class FlowMatching(DecomposableFlowMatching):
    """Flow Matching (the paper's baseline): DFM with one scale and ``p_q = (1,)``.

    ``x_t = t x + (1 - t) eps`` with ``t ~ LogitNormal(current_location, current_scale)``,
    target ``x - eps``, one-stage Euler/Heun sampling; the same code path as DFM, so the
    two differ only in the decomposition and the objective's stage distribution.
    """

    name: ClassVar[str] = "flow_matching"

    def __post_init__(self):
        if self.decomposition.num_scales != 1 or self.objective.stage_probs != (1.0,):
            raise ValueError(
                "Flow Matching has one scale and stage_probs (1.0,), got "
                f"{self.decomposition.num_scales} scales and {self.objective.stage_probs}"
            )
        super().__post_init__()


# The paper's baselines implement the interface in their own modules (which do not import
# this one); registered as virtual subclasses so ``isinstance(m, Method)`` holds.
Method.register(pyramidal.PyramidalFlow)
Method.register(cascaded.Cascaded)

#: Method name (``config.method``) -> class.
METHODS: dict[str, type] = {
    DecomposableFlowMatching.name: DecomposableFlowMatching,
    FlowMatching.name: FlowMatching,
    pyramidal.PyramidalFlow.name: pyramidal.PyramidalFlow,
    cascaded.Cascaded.name: cascaded.Cascaded,
}

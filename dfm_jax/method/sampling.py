"""Sampling for Decomposable Flow Matching (DFM spec section 4).

Time convention (paper, used throughout): ``x_t = t * x_data + (1 - t) * noise``;
``t = 0`` is noise, ``t = 1`` is data, the velocity is ``v = x_data - noise`` and
sampling integrates every scale's t upward from 0 to 1.

A sample is a tuple of S scales, coarsest first, ``scales[s]`` of shape
``(B, H_s, W_s, C)`` (images) or ``(B, T, H_s, W_s, C)`` (videos). Generation runs
in S phases. Phase k (steps ``N_(k-1) .. N_k`` with ``N_k = T_1 + ... + T_k``)
moves stage k from 0 to its threshold ``tau_k`` (``tau_S = 1``) while every
earlier stage continues towards 1 and every later stage waits at ``t = 0``,
masked. The parts:

* ``schedule``: ``SamplerSettings`` (validated static settings), ``stage_schedule``
  (float64 times of every scale at every step) and the per-step plan;
* ``solvers``: the table ``SOLVERS`` of step functions (Euler, Heun);
* ``guidance``: the (classifier-free guided) velocity evaluation;
* this module: noise, input checks and ``sample``, one ``lax.scan`` over the plan.

The network is seen as a velocity function::

    velocity_fn(scales, t, mask, labels) -> tuple of per-scale velocities
      scales: tuple of S arrays as above (the current state, float32)
      t:      (B, S) float32, every scale's time
      mask:   (B, S) float32 in {0, 1}; 0 for scales not generated yet
      labels: (B,) int32 in [0, num_classes]; num_classes is the null class

``sample`` is pure and meant to be called inside ``jax.jit``; pass the network
parameters as a traced argument of the jitted function and close over them in
``velocity_fn``::

    settings = SamplerSettings(steps_per_stage=(30, 10), thresholds=(0.9,), cfg_scale=1.5)

    @jax.jit
    def generate(params, noise, labels):
        def velocity_fn(scales, t, mask, y):
            return model.apply({"params": params}, scales, t, mask, y)
        return sample(velocity_fn, noise, labels, settings, null_label=1000)

Closing over concrete parameters outside ``jit`` would bake them into the
program as constants. The trajectory is one ``lax.scan`` over the N steps, so the
network is traced a constant number of times (once per solver evaluation), whatever N.

Solvers (``solvers``): Euler, N evaluations; Heun (the explicit trapezoid), 2N - 1
evaluations, its last step (where every scale reaches t = 1) an Euler step. The state
is float32 (the official code integrates in float64; the step sizes here are computed
in float64 and rounded once, and the tests show float32 is accurate to well below the
discretisation error).

Classifier-free guidance (``cfg_scale != 1``, ``guidance``): one network call on
``[x; x]`` with labels ``[labels; null_label]``, and per scale
``v = v_u + cfg_scale * (v_c - v_u)`` where that scale's ``t_s`` lies in
``guidance_interval`` (inclusive, paper convention), ``v_c`` elsewhere. An evaluation
doubles the batch only if some updated scale is guided; ``cfg_scale == 1`` never does.

Previews (``return_previews=True``): when stage k reaches ``tau_k`` (boundary
``n = N_k``, k < S) the predicted clean scales ``x_hat_s = x_s + (1 - t_s) v_s``,
s <= k, are recorded, not recomposed (the caller recomposes them, e.g.
``pyramid.preview(list(previews[k - 1]), k)``). The velocity is the one evaluated at
the first step of phase k + 1, at exactly that state and those times (guided if that
evaluation is), so previews cost no extra network evaluation; in it stage k + 1 is
already unmasked but at t = 0, pure noise, which carries no information about the
earlier scales (for the exact velocity field the predictions are identical to a
masked evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.method import guidance, solvers
from dfm_jax.method.guidance import VelocityFn
from dfm_jax.method.schedule import (
    SamplerSettings,
    StepPlan,
    num_function_evaluations,
    stage_schedule,
    step_plan,
)

__all__ = [
    "SOLVERS",
    "SamplerSettings",
    "initial_noise",
    "num_function_evaluations",
    "sample",
    "stage_schedule",
]

Array = jax.Array
State = tuple[Array, ...]
Previews = list[tuple[Array, ...]]

#: The solver names (keys of ``solvers.SOLVERS``).
SOLVERS = solvers.SOLVER_NAMES


def initial_noise(
    key: Array, shapes: Sequence[Sequence[int]], dtype: jnp.dtype = jnp.float32
) -> list[Array]:
    """Independent standard Gaussian noise for every scale.

    ``shapes`` is e.g. ``pyramid.scale_shapes((B, H, W, C))``; scale s gets its
    own key ``fold_in(key, s)``, so the noise of a scale does not depend on how
    many scales follow it.
    """
    return [
        jax.random.normal(jax.random.fold_in(key, s), tuple(shape), dtype)
        for s, shape in enumerate(shapes)
    ]


def _check_noise(noise: Sequence[Array], settings: SamplerSettings) -> list[Array]:
    if isinstance(noise, jax.Array | np.ndarray) or not isinstance(noise, Sequence):
        raise ValueError(
            "noise must be a list or tuple with one array per scale (coarsest first), "
            f"got {type(noise).__name__}"
        )
    settings.check_num_scales(len(noise), what="noise")
    shapes = [tuple(np.shape(e)) for e in noise]
    for s, shape in enumerate(shapes):
        if len(shape) not in (4, 5):
            raise ValueError(
                f"noise[{s}] has shape {shape}; expected (B, H, W, C) or (B, T, H, W, C)"
            )
        if shape[0] != shapes[0][0]:
            raise ValueError(f"noise scales have different batch sizes: {shapes}")
    return list(noise)


def _check_labels(labels: Array, batch: int) -> Array:
    if np.ndim(labels) != 1 or np.shape(labels)[0] != batch:
        raise ValueError(
            f"labels must have shape ({batch},) to match the noise batch, got {np.shape(labels)}"
        )
    return jnp.asarray(labels, jnp.int32)


def _scan_body(
    step: solvers.Step,
    evaluate: guidance.Evaluator,
    evaluate_next: guidance.Evaluator,
    return_previews: bool,
):
    """``body((x, xhat), inputs) -> ((x_new, xhat_new), None)`` for one step of the plan.

    ``xhat[k - 1]`` holds the predicted clean scales ``x_s + (1 - t_s) v_s``,
    s <= k, written at the step whose ``inputs["preview"][k - 1]`` is set.
    """

    def body(carry, inp):
        x, xhat = carry

        def bound(state, corrector):
            if corrector:
                row = (inp["t_next"], inp["mask"], inp["guide_next"], inp["need_next"])
                return evaluate_next(state, *row)
            return evaluate(state, inp["t"], inp["mask"], inp["guide"], inp["need"])

        x_new, v = step(bound, x, inp)
        if return_previews:
            xhat = tuple(
                tuple(
                    jnp.where(inp["preview"][k], x[s] + inp["one_minus_t"][s] * v[s], old)
                    for s, old in enumerate(stage)
                )
                for k, stage in enumerate(xhat)
            )
        return (x_new, xhat), None

    return body


def _run(
    plan: StepPlan,
    step: solvers.Step,
    evaluators: tuple[guidance.Evaluator, guidance.Evaluator],
    noise: list[Array],
    return_previews: bool,
) -> tuple[State, tuple[State, ...]]:
    """The single ``lax.scan`` over the plan's N steps: final state and previews."""
    x0 = tuple(jnp.asarray(e, jnp.float32) for e in noise)
    xhat0 = ()
    if return_previews:
        shapes = [tuple(np.shape(e)) for e in noise]
        xhat0 = tuple(
            tuple(jnp.zeros(shapes[s], jnp.float32) for s in range(k))
            for k in range(1, plan.num_stages)
        )
    xs = jax.tree.map(jnp.asarray, plan.scan_inputs())
    body = _scan_body(step, *evaluators, return_previews)
    (x_final, xhat), _ = jax.lax.scan(body, (x0, xhat0), xs)
    return x_final, xhat


def sample(
    velocity_fn: VelocityFn,
    noise: Sequence[Array],
    labels: Array,
    settings: SamplerSettings,
    *,
    null_label: int | None = None,
    return_previews: bool = False,
) -> State | tuple[State, Previews]:
    """Generates samples with the multi-stage DFM schedule (``stage_schedule``).

    Each step n moves the scales of stages 1 .. p (phase p) from ``t(n)`` to
    ``t(n + 1)`` with ``settings.solver``; later stages keep their noise, masked at
    ``t = 0``, until their phase starts. Guidance, previews and precision: see the
    module docstring. ``settings`` was validated on construction; noise, labels and
    ``null_label`` are checked with ``ValueError`` before anything is traced.

    Args:
      velocity_fn: ``(scales, t (B', S), mask (B', S), labels (B',)) -> velocities``
        (a sequence of S arrays shaped like ``scales``); ``B'`` is B or 2B.
      noise: S arrays, scale s of shape ``(B, H_s, W_s, C)`` or
        ``(B, T, H_s, W_s, C)``, standard Gaussian (see ``initial_noise``).
      labels: ``(B,)`` int class labels.
      settings: steps per stage, thresholds, solver, cfg scale, guidance interval.
      null_label: the null class id (``num_classes``); required iff
        ``settings.cfg_scale != 1``.
      return_previews: also return the predicted clean scales at every threshold.

    Returns:
      The final scales, a tuple of S float32 arrays shaped like ``noise``; with
      ``return_previews`` the pair ``(scales, previews)`` where ``previews`` is a
      list of S - 1 tuples, ``previews[k - 1]`` the k predicted clean scales
      ``(x_hat_1, ..., x_hat_k)`` (shaped like ``noise[:k]``) when stage k
      reached ``tau_k``.
    """
    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    noise = _check_noise(noise, settings)
    labels = _check_labels(labels, np.shape(noise[0])[0])
    if settings.cfg_scale != 1.0 and null_label is None:
        raise ValueError(
            f"cfg_scale = {settings.cfg_scale} needs null_label (the null class id, num_classes)"
        )
    plan = step_plan(settings)
    evaluators = guidance.make_evaluators(
        velocity_fn,
        labels,
        (plan.need_cur, plan.need_next[plan.correct]),
        cfg_scale=settings.cfg_scale,
        null_label=null_label,
        batching=settings.guidance_batching,
    )
    # Heun without any corrected step (N = 1) is Euler; skip tracing the corrector.
    step = solvers.SOLVERS[settings.solver if plan.correct.any() else "euler"]
    x_final, xhat = _run(plan, step, evaluators, noise, return_previews)
    if not return_previews:
        return x_final
    return x_final, [tuple(stage) for stage in xhat]

"""Sampling for Decomposable Flow Matching (DFM spec section 4).

Time convention (paper, used throughout): ``x_t = t * x_data + (1 - t) * noise``;
``t = 0`` is noise, ``t = 1`` is data, the velocity is ``v = x_data - noise`` and
sampling integrates every scale's t upward from 0 to 1.

A sample is a tuple of S scales, coarsest first, ``scales[s]`` of shape
``(B, H_s, W_s, C)`` (images) or ``(B, T, H_s, W_s, C)`` (videos). Generation runs
in S phases. Phase k (steps ``N_(k-1) .. N_k`` with ``N_k = T_1 + ... + T_k``)
moves stage k from 0 to its threshold ``tau_k`` (``tau_S = 1``) while every
earlier stage continues towards 1 and every later stage waits at ``t = 0``,
masked. ``stage_schedule`` tabulates all of this once, in float64 numpy, because
it is static.

The network is seen as a velocity function::

    velocity_fn(scales, t, mask, labels) -> tuple of per-scale velocities
      scales: tuple of S arrays as above (the current state, float32)
      t:      (B, S) float32, every scale's time
      mask:   (B, S) float32 in {0, 1}; 0 for scales not generated yet
      labels: (B,) int32 in [0, num_classes]; num_classes is the null class

``sample`` runs the whole trajectory (Euler or Heun, optional classifier-free
guidance, optional progressive previews) as one ``lax.scan`` over all N steps,
so that the network is traced a constant number of times, whatever N is. It is
pure and meant to be called inside ``jax.jit``; pass the network parameters as
a traced argument of the jitted function and close over them in
``velocity_fn``::

    @jax.jit
    def generate(params, noise, labels):
        def velocity_fn(scales, t, mask, y):
            return model.apply({"params": params}, scales, t, mask, y)
        return sample(velocity_fn, noise, labels, steps_per_stage=(30, 10),
                      thresholds=(0.9,), cfg_scale=1.5, null_label=1000)

Closing over concrete parameters outside ``jit`` would bake them into the
program as constants.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.method import pyramid as pyramid_lib

Array = jax.Array
VelocityFn = Callable[[tuple[Array, ...], Array, Array, Array], Sequence[Array]]

SOLVERS = ("euler", "heun")

# Guidance-interval bounds are inclusive, with this slack for float rounding of
# schedule values such as 3 * 0.1.
_INTERVAL_SLACK = 1e-9


# --------------------------------------------------------------------------- #
# Validation (pure Python, runs before anything is traced)
# --------------------------------------------------------------------------- #


def _validate_steps(steps_per_stage: Sequence[int]) -> tuple[int, ...]:
    if isinstance(steps_per_stage, str) or not isinstance(steps_per_stage, Sequence):
        raise ValueError(
            f"steps_per_stage must be a sequence of positive ints, one per stage "
            f"(e.g. (30, 10)), got {steps_per_stage!r}"
        )
    if len(steps_per_stage) == 0:
        raise ValueError("steps_per_stage is empty; need at least one stage, e.g. (50,)")
    steps = []
    for k, value in enumerate(steps_per_stage):
        if isinstance(value, bool):
            raise ValueError(f"steps_per_stage[{k}] is a bool ({value}); expected a positive int")
        try:
            count = operator.index(value)
        except TypeError:
            raise ValueError(
                f"steps_per_stage[{k}] must be an int, got {value!r} of type {type(value).__name__}"
            ) from None
        if count < 1:
            raise ValueError(
                f"steps_per_stage[{k}] = {count}: every stage needs at least one step, "
                f"got {tuple(steps_per_stage)}"
            )
        steps.append(count)
    return tuple(steps)


def _validate_thresholds(thresholds: Sequence[float], num_stages: int) -> tuple[float, ...]:
    if isinstance(thresholds, str) or not isinstance(thresholds, Sequence):
        raise ValueError(
            f"thresholds must be a sequence of {num_stages - 1} floats (tau_1 .. tau_(S-1); "
            f"e.g. (0.9,) for two stages, () for one), got {thresholds!r}"
        )
    if len(thresholds) != num_stages - 1:
        raise ValueError(
            f"{num_stages} stage(s) need {num_stages - 1} threshold(s) tau_1 .. tau_(S-1) "
            f"(tau_S = 1 is implicit), got {len(thresholds)}: {tuple(thresholds)}"
        )
    taus = []
    for k, value in enumerate(thresholds):
        try:
            tau = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds[{k}] must be a float, got {value!r}") from None
        if not (math.isfinite(tau) and 0.0 < tau < 1.0):
            raise ValueError(
                f"thresholds[{k}] = {value!r} must lie strictly inside (0, 1) "
                f"(paper convention: the t at which stage {k + 1} hands over; the official "
                f"code writes 1 - tau)"
            )
        taus.append(tau)
    return tuple(taus)


def _validate_interval(guidance_interval: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be a pair (low, high) of floats, got {guidance_interval!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(
            f"guidance_interval must satisfy low <= high (finite), got ({low}, {high})"
        )
    return low, high


def _boundaries(steps: tuple[int, ...]) -> tuple[int, ...]:
    """``(N_0 = 0, N_1, ..., N_S = N)``: the step at which each phase starts / ends."""
    return (0, *np.cumsum(steps).tolist())


# --------------------------------------------------------------------------- #
# The static schedule
# --------------------------------------------------------------------------- #


def stage_schedule(
    steps_per_stage: Sequence[int], thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Every scale's time at every step boundary, and which scales each step updates.

    With ``N_k = T_1 + ... + T_k`` (``N_0 = 0``, ``N = N_S``) and ``tau_S = 1``,
    stage k (1-based) follows, for ``n = 0 .. N``::

        t_k(n) = 0                                              n <= N_(k-1)
        t_k(n) = tau_k * (n - N_(k-1)) / T_k                    N_(k-1) <= n <= N_k
        t_k(n) = tau_k + (1 - tau_k) * (n - N_k) / (N - N_k)    n >= N_k

    i.e. during its own phase stage k moves linearly from 0 to ``tau_k``, and after
    it continues linearly from ``tau_k`` to 1 over all remaining steps. Step n
    (from boundary n to n + 1) updates the scales of stages 1 .. p, where p is the
    phase containing step n. For two stages this is the official schedule.
    ``S = 1`` is plain Flow Matching: ``steps_per_stage=(N,)``, ``thresholds=()``.

    Thresholds: each ``tau_k`` must lie strictly inside (0, 1). ``tau_k = 0``
    would leave stage k at pure noise through its own phase and ``tau_k = 1``
    would finish it early and leave it idle at t = 1, where the network is never
    trained. **No ordering between thresholds is required**: every stage's
    trajectory above is non-decreasing, starts at 0 and ends at 1 for any
    thresholds in (0, 1). The official code asserts ``1 - tau`` strictly
    decreasing (``tau`` increasing) because its own S-stage schedule (broken for
    S >= 3) routes every earlier stage through each later threshold, which is
    only monotone for increasing thresholds; this schedule never does that.
    Increasing thresholds are neither necessary nor sufficient for the property
    one may want instead, that a coarser stage is never noisier than a finer one
    (``t_j(n) >= t_k(n)`` for ``j < k``): that holds iff the post-phase speeds
    ``(1 - tau_k) / (N - N_k)`` are non-decreasing in k for k < S (always for two
    stages). E.g. steps (10, 10, 10) with thresholds (0.5, 0.9) lets stage 2
    overtake stage 1 (0.9 vs 0.75 at n = 20), while (0.9, 0.7) keeps the order.
    The training distribution (earlier scales at LogitNormal(1.5, 1)) covers
    both, so both are accepted.

    Args:
      steps_per_stage: ``(T_1, ..., T_S)`` positive ints.
      thresholds: ``(tau_1, ..., tau_(S-1))`` floats in (0, 1), paper convention.

    Returns:
      ``times``: float64 ``(N + 1, S)``, ``times[n, s]`` is scale s's t at step
      boundary n (``times[0] == 0``, ``times[N] == 1``).
      ``active``: bool ``(N, S)``, ``active[n, s]`` iff step n updates scale s
      (equivalently ``times[n + 1, s] > times[n, s]``).

    Raises:
      ValueError: for non-positive or non-integer step counts, a number of
        thresholds other than S - 1, or thresholds outside (0, 1).
    """
    steps = _validate_steps(steps_per_stage)
    num_stages = len(steps)
    taus = (*_validate_thresholds(thresholds, num_stages), 1.0)
    bounds = _boundaries(steps)
    total = bounds[-1]
    n = np.arange(total + 1, dtype=np.float64)
    times = np.zeros((total + 1, num_stages), dtype=np.float64)
    for k in range(num_stages):
        start, end = bounds[k], bounds[k + 1]
        # Ramp 0 -> tau_k over the phase (tau * (T/T) is exactly tau at the phase end).
        times[:, k] = np.clip(taus[k] * ((n - start) / steps[k]), 0.0, taus[k])
        if end < total:
            after = n > end
            times[after, k] = taus[k] + (1.0 - taus[k]) * ((n[after] - end) / (total - end))
    times[-1] = 1.0  # exact, whatever the rounding of tau + (1 - tau)
    active = n[:-1, None] >= np.asarray(bounds[:-1], dtype=np.float64)[None, :]
    return times, active


# --------------------------------------------------------------------------- #
# Static plan: per-step constants shared by `sample` and the NFE count
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Plan:
    steps: tuple[int, ...]
    times: np.ndarray  # (N + 1, S) float64
    active: np.ndarray  # (N, S) bool
    guide_cur: np.ndarray  # (N, S) bool: guidance on at the evaluation at times[n]
    guide_next: np.ndarray  # (N, S) bool: guidance on at the Heun corrector, times[n + 1]
    correct: np.ndarray  # (N,) bool: Heun corrector evaluated at step n

    @property
    def num_stages(self) -> int:
        return len(self.steps)

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1


def _guidance_mask(
    times: np.ndarray, active: np.ndarray, cfg_scale: float, interval: tuple[float, float]
) -> np.ndarray:
    if cfg_scale == 1.0:
        return np.zeros_like(active)
    low, high = interval
    inside = (times >= low - _INTERVAL_SLACK) & (times <= high + _INTERVAL_SLACK)
    return active & inside


def _make_plan(
    steps_per_stage: Sequence[int],
    thresholds: Sequence[float],
    solver: str,
    cfg_scale: float,
    guidance_interval: Sequence[float],
) -> _Plan:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    try:
        cfg_scale = float(cfg_scale)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_scale must be a float, got {cfg_scale!r}") from None
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
    interval = _validate_interval(guidance_interval)
    times, active = stage_schedule(steps_per_stage, thresholds)
    num_steps = active.shape[0]
    correct = np.zeros(num_steps, dtype=bool)
    if solver == "heun":
        correct[:-1] = True  # the last step (every scale reaches t = 1) is an Euler step
    return _Plan(
        steps=_validate_steps(steps_per_stage),
        times=times,
        active=active,
        guide_cur=_guidance_mask(times[:-1], active, cfg_scale, interval),
        guide_next=_guidance_mask(times[1:], active, cfg_scale, interval),
        correct=correct,
    )


def num_function_evaluations(
    steps_per_stage: Sequence[int],
    thresholds: Sequence[float] = (),
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> int:
    """Network evaluations per generated sample (NFE) made by ``sample``.

    A classifier-free-guided evaluation runs the network on a doubled batch
    ``[cond; uncond]`` and counts 2; an unguided one counts 1. Euler makes one
    evaluation per step (N in all); Heun two per step except the last (2N - 1).
    With ``cfg_scale != 1`` an evaluation is guided iff at least one scale that
    the step updates has its t inside ``guidance_interval``, exactly the rule
    ``sample`` applies, so with the default interval guided NFE is 2N (Euler) or
    2(2N - 1) (Heun). ``thresholds`` only matter with a narrower interval.
    Arguments are validated as in ``sample``.
    """
    plan = _make_plan(steps_per_stage, thresholds, solver, cfg_scale, guidance_interval)
    need_cur = plan.guide_cur.any(axis=1)
    need_next = plan.guide_next.any(axis=1)
    count = int(np.sum(1 + need_cur))
    count += int(np.sum((1 + need_next) * plan.correct))
    return count


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


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


def _check_noise(noise: Sequence[Array], num_stages: int) -> list[Array]:
    if isinstance(noise, jax.Array | np.ndarray) or not isinstance(noise, Sequence):
        raise ValueError(
            "noise must be a list or tuple with one array per scale (coarsest first), "
            f"got {type(noise).__name__}"
        )
    if len(noise) != num_stages:
        raise ValueError(
            f"steps_per_stage describes {num_stages} stage(s) but noise has {len(noise)} scales"
        )
    shapes = [tuple(np.shape(e)) for e in noise]
    for s, shape in enumerate(shapes):
        if len(shape) not in (4, 5):
            raise ValueError(
                f"noise[{s}] has shape {shape}; expected (B, H, W, C) or (B, T, H, W, C)"
            )
        if shape[0] != shapes[0][0]:
            raise ValueError(f"noise scales have different batch sizes: {shapes}")
    return list(noise)


def sample(
    velocity_fn: VelocityFn,
    noise: Sequence[Array],
    labels: Array,
    *,
    steps_per_stage: Sequence[int],
    thresholds: Sequence[float],
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    null_label: int | None = None,
    pyramid: pyramid_lib.Decomposition | None = None,
    return_previews: bool = False,
) -> tuple[Array, ...] | tuple[tuple[Array, ...], list[Array]]:
    """Generates samples with the multi-stage DFM schedule (``stage_schedule``).

    Solvers, for the scales ``A_n`` updated by step n (stages 1 .. p in phase p),
    with ``dt_s = t_s(n + 1) - t_s(n)`` and ``v = velocity(x, t(n))``:

    * ``"euler"``: ``x_s <- x_s + dt_s * v_s`` for s in ``A_n``; N evaluations.
    * ``"heun"`` (explicit trapezoid): predictor ``x'_s = x_s + dt_s v_s``, then
      ``v' = velocity(x', t(n + 1))`` with the same mask and active set, and
      ``x_s <- x_s + dt_s (v_s + v'_s) / 2``. The last step of the trajectory, where
      every scale reaches t = 1, is an Euler step (as in the EDM and SiT
      samplers): the network is never evaluated at t = 1, a point outside its
      training distribution (and, for an exact field, the degenerate data end).
      The steps that end earlier phases are corrected normally (the finishing
      stage is then at ``tau_k < 1``). Global order stays 2; 2N - 1 evaluations.

    Scales outside ``A_n`` (later stages) keep their noise untouched and are
    passed with ``t = 0`` and mask 0; stage k starts from its own noise at the
    first step of phase k. The state is float32 (the official code integrates in
    float64; the step sizes here are computed in float64 and rounded once, and
    the tests show float32 is accurate to well below the discretisation error).

    Classifier-free guidance (``cfg_scale != 1``): one network call on the
    doubled batch ``[x; x]`` with labels ``[labels; null_label]``, and per scale
    ``v = v_u + cfg_scale * (v_c - v_u)``. With ``guidance_interval = (low, high)``
    (paper convention, inclusive) scale s is guided at an evaluation iff its
    ``t_s`` lies in ``[low, high]``, otherwise it takes ``v_c``; the decision is
    per scale, as in the official sampler, whose ``guidance_low/high`` are in the
    SiT convention, so official ``(gl, gh)`` is ``(1 - gh, 1 - gl)`` here. An
    evaluation doubles the batch only if some updated scale is guided (the
    official code also counts not-yet-active scales, which never changes the
    result but can waste a doubled call). Which evaluations are guided is
    static, so a schedule that needs guidance everywhere (the default interval)
    or nowhere traces one network call; a mixed one switches with ``lax.cond``.
    ``cfg_scale == 1`` never doubles the batch.

    Previews (``return_previews=True``): when stage k reaches ``tau_k``
    (boundary ``n = N_k``, k < S) the predicted clean scales
    ``x_hat_s = x_s + (1 - t_s) v_s``, s <= k, are recomposed with
    ``pyramid.preview(x_hat, k)``. The velocity is the one evaluated at the first
    step of phase k + 1, at exactly that state and those times (guided if that
    evaluation is), so previews cost no extra network evaluation; in it stage
    k + 1 is already unmasked but at t = 0, pure noise, which carries no
    information about the earlier scales (for the exact velocity field the
    predictions are identical to a masked evaluation).

    Call it inside ``jax.jit`` (see the module docstring): all arguments except
    ``noise`` and ``labels`` are static Python values, validated with
    ``ValueError`` before anything is traced. The trajectory is a single
    ``lax.scan`` over the N steps.

    Args:
      velocity_fn: ``(scales, t (B', S), mask (B', S), labels (B',)) -> velocities``
        (a sequence of S arrays shaped like ``scales``); ``B'`` is B or 2B.
      noise: S arrays, scale s of shape ``(B, H_s, W_s, C)`` or
        ``(B, T, H_s, W_s, C)``, standard Gaussian (see ``initial_noise``).
      labels: ``(B,)`` int class labels.
      steps_per_stage: ``(T_1, ..., T_S)``.
      thresholds: ``(tau_1, ..., tau_(S-1))``, paper convention.
      solver: ``"euler"`` or ``"heun"``.
      cfg_scale: guidance weight w; 1 disables guidance.
      guidance_interval: ``(low, high)`` in paper-convention t.
      null_label: the null class id (``num_classes``); required iff
        ``cfg_scale != 1``.
      pyramid: the decomposition; required iff ``return_previews``.
      return_previews: also return the progressive previews.

    Returns:
      The final scales, a tuple of S float32 arrays shaped like ``noise``; with
      ``return_previews`` the pair ``(scales, previews)`` where ``previews`` is a
      list of S arrays, ``previews[k - 1]`` of the spatial size of scale k: the
      recomposed prediction when stage k reached ``tau_k`` for k < S, and the
      recomposed final sample for k = S.
    """
    plan = _make_plan(steps_per_stage, thresholds, solver, cfg_scale, guidance_interval)
    num_stages = plan.num_stages
    noise = _check_noise(noise, num_stages)
    batch = np.shape(noise[0])[0]
    if np.ndim(labels) != 1 or np.shape(labels)[0] != batch:
        raise ValueError(
            f"labels must have shape ({batch},) to match the noise batch, got {np.shape(labels)}"
        )
    cfg_scale = float(cfg_scale)
    guided = cfg_scale != 1.0
    if guided and null_label is None:
        raise ValueError(
            f"cfg_scale = {cfg_scale} needs null_label (the null class id, num_classes)"
        )
    if return_previews:
        if pyramid is None:
            raise ValueError("return_previews=True needs the pyramid (decomposition)")
        if pyramid.num_scales != num_stages:
            raise ValueError(
                f"the pyramid has {pyramid.num_scales} scales but steps_per_stage "
                f"describes {num_stages} stages"
            )

    shapes = [tuple(np.shape(e)) for e in noise]
    labels = jnp.asarray(labels, jnp.int32)
    both_labels = None
    if guided:
        both_labels = jnp.concatenate([labels, jnp.full_like(labels, int(null_label))])

    def call(x, t_row, mask_row, call_labels):
        rows = call_labels.shape[0]
        t = jnp.broadcast_to(t_row, (rows, num_stages))
        mask = jnp.broadcast_to(mask_row, (rows, num_stages))
        out = velocity_fn(tuple(x), t, mask, call_labels)
        if not isinstance(out, Sequence) or len(out) != num_stages:
            raise ValueError(
                f"velocity_fn must return a sequence of {num_stages} per-scale arrays, "
                f"got {type(out).__name__}"
            )
        for s, (v, e) in enumerate(zip(out, x, strict=True)):
            if tuple(v.shape) != tuple(e.shape):
                raise ValueError(
                    f"velocity_fn returned shape {tuple(v.shape)} for scale {s + 1}, "
                    f"expected {tuple(e.shape)}"
                )
        return tuple(jnp.asarray(v, jnp.float32) for v in out)

    def unguided(x, t_row, mask_row, guide_row):
        del guide_row
        return call(x, t_row, mask_row, labels)

    def guided_call(x, t_row, mask_row, guide_row):
        doubled = tuple(jnp.concatenate([e, e]) for e in x)
        out = call(doubled, t_row, mask_row, both_labels)
        velocities = []
        for s, v in enumerate(out):
            v_cond, v_uncond = v[:batch], v[batch:]
            mixed = v_uncond + cfg_scale * (v_cond - v_uncond)
            velocities.append(jnp.where(guide_row[s], mixed, v_cond))
        return tuple(velocities)

    def make_evaluator(need: np.ndarray):
        """A static choice of call for evaluations whose 'needs guidance' flags are ``need``."""
        if not need.any():
            return lambda x, t, m, g, flag: unguided(x, t, m, g)
        if need.all():
            return lambda x, t, m, g, flag: guided_call(x, t, m, g)

        def switch(x, t, m, g, flag):
            return jax.lax.cond(flag, guided_call, unguided, x, t, m, g)

        return switch

    need_cur = plan.guide_cur.any(axis=1)
    need_next = plan.guide_next.any(axis=1)
    evaluate = make_evaluator(need_cur)
    evaluate_next = make_evaluator(need_next[plan.correct])

    bounds = _boundaries(plan.steps)
    step_index = np.arange(plan.num_steps)
    f32 = np.float32
    times = plan.times
    xs = {
        "t": times[:-1].astype(f32),
        "t_next": times[1:].astype(f32),
        "dt": (times[1:] - times[:-1]).astype(f32),
        "one_minus_t": (1.0 - times[:-1]).astype(f32),
        "mask": plan.active.astype(f32),
        "active": plan.active,
        "guide": plan.guide_cur,
        "guide_next": plan.guide_next,
        "need": need_cur,
        "need_next": need_next,
        "correct": plan.correct,
        # Column k - 1: this step starts phase k + 1, stage k sits at tau_k.
        "preview": step_index[:, None] == np.asarray(bounds[1:-1], dtype=np.int64)[None, :],
    }
    xs = jax.tree.map(jnp.asarray, xs)

    def update(x, v, inp):
        return tuple(
            jnp.where(inp["active"][s], x[s] + inp["dt"][s] * v[s], x[s]) for s in range(num_stages)
        )

    def step(carry, inp):
        x, xhat = carry
        v = evaluate(x, inp["t"], inp["mask"], inp["guide"], inp["need"])
        x_euler = update(x, v, inp)
        if plan.correct.any():

            def corrected(_):
                v_next = evaluate_next(
                    x_euler, inp["t_next"], inp["mask"], inp["guide_next"], inp["need_next"]
                )
                mean = tuple(0.5 * (a + b) for a, b in zip(v, v_next, strict=True))
                return update(x, mean, inp)

            x_new = jax.lax.cond(inp["correct"], corrected, lambda _: x_euler, None)
        else:
            x_new = x_euler
        if return_previews:
            xhat = tuple(
                tuple(
                    jnp.where(inp["preview"][k - 1], x[s] + inp["one_minus_t"][s] * v[s], old)
                    for s, old in enumerate(xhat[k - 1])
                )
                for k in range(1, num_stages)
            )
        return (x_new, xhat), None

    x0 = tuple(jnp.asarray(e, jnp.float32) for e in noise)
    xhat0 = ()
    if return_previews:
        xhat0 = tuple(
            tuple(jnp.zeros(shapes[s], jnp.float32) for s in range(k)) for k in range(1, num_stages)
        )
    (x_final, xhat), _ = jax.lax.scan(step, (x0, xhat0), xs)
    if not return_previews:
        return x_final
    previews = [pyramid.preview(list(xhat[k - 1]), k) for k in range(1, num_stages)]
    previews.append(pyramid.recompose(list(x_final)))
    return x_final, previews

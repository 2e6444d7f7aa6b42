"""The static description of a DFM sampling run (DFM spec section 4).

Time convention (paper, used throughout): ``x_t = t * x_data + (1 - t) * noise``;
``t = 0`` is noise, ``t = 1`` is data, and sampling integrates every scale's t
upward from 0 to 1.

Everything here is plain Python / float64 numpy, computed before anything is
traced: ``SamplerSettings`` (the validated, hashable settings of a run),
``stage_schedule`` (every scale's time at every step) and ``StepPlan`` (the
per-step constants the sampler scans over, and the NFE count).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import numpy as np

from dfm_jax.method.solvers import SOLVER_NAMES

# Guidance-interval bounds are inclusive, with this slack for float rounding of
# schedule values such as 3 * 0.1.
_INTERVAL_SLACK = 1e-9


# --------------------------------------------------------------------------- #
# Validation (each message starts with the field name)
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
            f"thresholds: {num_stages} stage(s) need {num_stages - 1} threshold(s) "
            f"tau_1 .. tau_(S-1) (tau_S = 1 is implicit), got {len(thresholds)}: "
            f"{tuple(thresholds)}"
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


def _validate_solver(solver: str) -> str:
    if not isinstance(solver, str) or solver not in SOLVER_NAMES:
        raise ValueError(f"solver must be one of {SOLVER_NAMES}, got {solver!r}")
    return solver


def _validate_cfg_scale(cfg_scale: float) -> float:
    try:
        value = float(cfg_scale)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_scale must be a float, got {cfg_scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"cfg_scale must be finite, got {value}")
    return value


GUIDANCE_BATCHING = ("auto", "doubled", "split")  # see guidance.splits_batch


def validate_batching(batching: str) -> str:
    """``batching`` if it is one of ``GUIDANCE_BATCHING``; else a ``ValueError``."""
    if batching not in GUIDANCE_BATCHING:
        raise ValueError(f"guidance_batching must be one of {GUIDANCE_BATCHING}, got {batching!r}")
    return batching


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
# Settings
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The static settings of a sampling run, validated and normalised on construction.

    Attributes:
      steps_per_stage: ``(T_1, ..., T_S)`` positive ints, one per stage (scale).
      thresholds: ``(tau_1, ..., tau_(S-1))`` floats strictly inside (0, 1), paper
        convention (the t at which stage k hands over; ``tau_S = 1``).
      solver: a name in ``SOLVER_NAMES`` (``"euler"`` or ``"heun"``).
      cfg_scale: classifier-free guidance weight w; 1 disables guidance.
      guidance_interval: ``(low, high)`` in paper-convention t, inclusive.
      guidance_batching: how a guided evaluation batches the conditional and
        unconditional calls: "doubled" (one call on 2B), "split" (two on B) or "auto"
        (split on the CPU backend, where it is faster; ``guidance.splits_batch``).

    Sequences (e.g. lists from a config) are normalised to tuples of int / float,
    so the object is hashable and can be a static argument of ``jax.jit``. Every
    ``ValueError`` message starts with the offending field's name. Subclasses may
    add fields (with defaults) and must call ``super().__post_init__()``.
    """

    steps_per_stage: tuple[int, ...] = (30, 10)
    thresholds: tuple[float, ...] = (0.9,)
    solver: str = "euler"
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    guidance_batching: str = "auto"

    def __post_init__(self):
        steps = _validate_steps(self.steps_per_stage)
        normalised = {
            "steps_per_stage": steps,
            "thresholds": _validate_thresholds(self.thresholds, len(steps)),
            "solver": _validate_solver(self.solver),
            "cfg_scale": _validate_cfg_scale(self.cfg_scale),
            "guidance_interval": _validate_interval(self.guidance_interval),
            "guidance_batching": validate_batching(self.guidance_batching),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def num_stages(self) -> int:
        """S, the number of stages (= scales of the model)."""
        return len(self.steps_per_stage)

    @property
    def nfe(self) -> int:
        """Network evaluations per generated sample (NFE) made by ``sampling.sample``.

        A classifier-free-guided evaluation runs the network on a doubled batch
        ``[cond; uncond]`` and counts 2; an unguided one counts 1. Euler makes one
        evaluation per step (N in all); Heun two per step except the last (2N - 1).
        With ``cfg_scale != 1`` an evaluation is guided iff at least one scale that
        the step updates has its t inside ``guidance_interval``, exactly the rule
        ``sample`` applies, so with the default interval guided NFE is 2N (Euler) or
        2(2N - 1) (Heun). ``thresholds`` only matter with a narrower interval.
        """
        plan = step_plan(self)
        count = int(np.sum(1 + plan.need_cur))
        count += int(np.sum((1 + plan.need_next) * plan.correct))
        return count

    def check_num_scales(self, num_scales: int, what: str = "the model") -> None:
        """Raises ``ValueError`` unless there is one stage per scale of ``what``."""
        if num_scales != self.num_stages:
            raise ValueError(
                f"steps_per_stage {self.steps_per_stage} describes {self.num_stages} "
                f"stage(s) but {what} has {num_scales} scales"
            )


def num_function_evaluations(
    steps_per_stage: Sequence[int],
    thresholds: Sequence[float] = (),
    solver: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> int:
    """``SamplerSettings(...).nfe`` for plain values (see ``SamplerSettings.nfe``)."""
    return SamplerSettings(steps_per_stage, thresholds, solver, cfg_scale, guidance_interval).nfe


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
# The per-step plan
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Per-step constants of a run: N steps over S scales (all numpy, static)."""

    steps: tuple[int, ...]
    times: np.ndarray  # (N + 1, S) float64
    active: np.ndarray  # (N, S) bool: step n updates scale s
    guide_cur: np.ndarray  # (N, S) bool: guidance on at the evaluation at times[n]
    guide_next: np.ndarray  # (N, S) bool: guidance on at the Heun corrector, times[n + 1]
    correct: np.ndarray  # (N,) bool: Heun corrector evaluated at step n

    @property
    def num_stages(self) -> int:
        return len(self.steps)

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1

    @property
    def need_cur(self) -> np.ndarray:
        """(N,) bool: the evaluation at ``times[n]`` is guided (doubled batch)."""
        return self.guide_cur.any(axis=1)

    @property
    def need_next(self) -> np.ndarray:
        """(N,) bool: the corrector evaluation at ``times[n + 1]`` would be guided."""
        return self.guide_next.any(axis=1)

    @property
    def preview(self) -> np.ndarray:
        """(N, S - 1) bool: column k - 1 is true at the step starting phase k + 1.

        At that step's start stage k sits exactly at ``tau_k``.
        """
        bounds = np.asarray(_boundaries(self.steps)[1:-1], dtype=np.int64)
        return np.arange(self.num_steps)[:, None] == bounds[None, :]

    def scan_inputs(self) -> dict[str, np.ndarray]:
        """The scanned per-step inputs (leading axis N): float32 times rounded once."""
        f32, times = np.float32, self.times
        return {
            "t": times[:-1].astype(f32),  # (N, S)
            "t_next": times[1:].astype(f32),  # (N, S)
            "dt": (times[1:] - times[:-1]).astype(f32),  # (N, S)
            "one_minus_t": (1.0 - times[:-1]).astype(f32),  # (N, S)
            "mask": self.active.astype(f32),  # (N, S)
            "active": self.active,
            "guide": self.guide_cur,
            "guide_next": self.guide_next,
            "need": self.need_cur,  # (N,)
            "need_next": self.need_next,  # (N,)
            "correct": self.correct,  # (N,)
            "preview": self.preview,  # (N, S - 1)
        }


def _guidance_mask(
    times: np.ndarray, active: np.ndarray, cfg_scale: float, interval: tuple[float, float]
) -> np.ndarray:
    if cfg_scale == 1.0:
        return np.zeros_like(active)
    low, high = interval
    inside = (times >= low - _INTERVAL_SLACK) & (times <= high + _INTERVAL_SLACK)
    return active & inside


def step_plan(settings: SamplerSettings) -> StepPlan:
    """The ``StepPlan`` of ``settings``: schedule, guidance masks, Heun corrector flags.

    Heun corrects every step but the last, where every scale reaches t = 1 (an
    Euler step); Euler corrects none.
    """
    times, active = stage_schedule(settings.steps_per_stage, settings.thresholds)
    correct = np.zeros(active.shape[0], dtype=bool)
    if settings.solver == "heun":
        correct[:-1] = True  # the last step (every scale reaches t = 1) is an Euler step
    cfg, interval = settings.cfg_scale, settings.guidance_interval
    return StepPlan(
        steps=settings.steps_per_stage,
        times=times,
        active=active,
        guide_cur=_guidance_mask(times[:-1], active, cfg, interval),
        guide_next=_guidance_mask(times[1:], active, cfg, interval),
        correct=correct,
    )

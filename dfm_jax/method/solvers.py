"""One-step ODE solvers for the staged DFM sampler, as a table of step functions.

Time convention (paper): ``t = 0`` is noise, ``t = 1`` is data; every step moves
the scales it updates from ``t(n)`` to ``t(n + 1)``, upward.

A state ``x`` is a tuple of S float32 arrays, scale s of shape ``(B, H_s, W_s, C)``
or ``(B, T, H_s, W_s, C)``. Every solver has the signature::

    step(evaluate, x, inputs) -> (x_new, v)

* ``evaluate(x, corrector)`` returns the per-scale velocities (a tuple shaped like
  ``x``) at the step's start times ``t(n)`` (``corrector=False``) or at its end
  times ``t(n + 1)`` (``corrector=True``, Heun's second evaluation); the caller
  binds the times, mask and guidance of the step.
* ``inputs`` is the step's slice of ``StepPlan.scan_inputs()``: ``dt`` ``(S,)``
  float32 step sizes, ``active`` ``(S,)`` bool (scales this step updates) and
  ``correct`` ``()`` bool (Heun corrects this step).
* ``v`` is the velocity evaluated at ``x`` and ``t(n)`` (used for previews).

Scales outside ``active`` are returned unchanged (selected with ``where``, so a
non-finite velocity for a masked scale never leaks in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
State = tuple[Array, ...]
Evaluate = Callable[[State, bool], State]
Step = Callable[[Evaluate, State, Mapping[str, Array]], tuple[State, State]]


def advance(x: State, v: State, inputs: Mapping[str, Array]) -> State:
    """``x_s + dt_s * v_s`` on the active scales, ``x_s`` elsewhere."""
    return tuple(
        jnp.where(inputs["active"][s], x[s] + inputs["dt"][s] * v[s], x[s]) for s in range(len(x))
    )


def euler_step(evaluate: Evaluate, x: State, inputs: Mapping[str, Array]) -> tuple[State, State]:
    """Euler: ``x_s <- x_s + dt_s v_s`` with ``v = velocity(x, t(n))``; one evaluation."""
    v = evaluate(x, False)
    return advance(x, v, inputs), v


def heun_step(evaluate: Evaluate, x: State, inputs: Mapping[str, Array]) -> tuple[State, State]:
    """Heun (explicit trapezoid) where ``inputs["correct"]``, else Euler.

    Predictor ``x'_s = x_s + dt_s v_s``, then ``v' = velocity(x', t(n + 1))`` with
    the same mask and active set, and ``x_s <- x_s + dt_s (v_s + v'_s) / 2``. The
    plan leaves the last step (every scale reaches t = 1) uncorrected, an Euler
    step as in the EDM and SiT samplers: the network is never evaluated at t = 1,
    a point outside its training distribution (and, for an exact field, the
    degenerate data end). The steps that end earlier phases are corrected
    normally (the finishing stage is then at ``tau_k < 1``). Global order stays 2.
    """
    v = evaluate(x, False)
    x_euler = advance(x, v, inputs)

    def corrected(_):
        v_next = evaluate(x_euler, True)
        mean = tuple(0.5 * (a + b) for a, b in zip(v, v_next, strict=True))
        return advance(x, mean, inputs)

    x_new = jax.lax.cond(inputs["correct"], corrected, lambda _: x_euler, None)
    return x_new, v


#: Solver name -> step function.
SOLVERS: dict[str, Step] = {"euler": euler_step, "heun": heun_step}
#: The solver names, as accepted by ``SamplerSettings.solver``.
SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)

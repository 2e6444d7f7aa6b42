"""Sweep specifications: which sampler settings an evaluation visits, and which metrics.

A sweep is the Cartesian product of per-key value lists, written
``key=v1,v2,...`` and joined with ``;``::

    cfg=1.0,1.25,1.5;tau=0.7,0.9;steps=30+10,20+20;solver=euler,heun;interval=0.0-1.0

=========  ===============================================================================
key        values (comma-separated)
=========  ===============================================================================
cfg        classifier-free guidance scale, a float (1 disables guidance)
tau        stage thresholds tau_1/.../tau_(S-1), ``/``-separated, e.g. ``0.9`` for two
           scales, ``0.7/0.9`` for three; not allowed for Flow Matching (one scale)
steps      steps per stage T_1+...+T_S, ``+``-separated, e.g. ``30+10``; ``40`` for FM
solver     ``euler`` or ``heun``
interval   guidance interval ``low-high`` in paper-convention t, e.g. ``0.1-1.0``
=========  ===============================================================================

Keys left out take the config's ``sampling`` values; an empty spec is the single
point of the config. The product varies the last key fastest, in the order of the
table. Every point is validated (lengths against the number of scales, threshold
order, solver, interval) with a ``ValueError`` before any work starts.

Each point also has a canonical text form per key (``columns()``); results files
store these strings, and resuming compares them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

from dfm_jax.evaluation.features import METRICS
from dfm_jax.method import sampling

SWEEP_KEYS = ("cfg", "tau", "steps", "solver", "interval")
#: Metric names accepted by ``parse_metrics``, in the order results list them.
METRIC_NAMES = tuple(METRICS)


def _float_text(value: float) -> str:
    """Shortest round-trip text of a float ("1.0", "0.9", "1.25")."""
    return repr(float(value))


@dataclasses.dataclass(frozen=True)
class SweepPoint(sampling.SamplerSettings):
    """One sampler setting of a sweep: a ``SamplerSettings`` with its result columns."""

    def columns(self) -> dict[str, str]:
        """Canonical text per sweep key, as written to ``results.csv``."""
        return {
            "cfg": _float_text(self.cfg_scale),
            "tau": "/".join(_float_text(t) for t in self.thresholds),
            "steps": "+".join(str(s) for s in self.steps_per_stage),
            "solver": self.solver,
            "interval": "-".join(_float_text(v) for v in self.guidance_interval),
        }

    @property
    def name(self) -> str:
        """A compact identifier, e.g. ``cfg1.5_tau0.9_steps30+10_euler_int0.0-1.0``."""
        c = self.columns()
        tau = f"_tau{c['tau']}" if c["tau"] else ""
        return f"cfg{c['cfg']}{tau}_steps{c['steps']}_{c['solver']}_int{c['interval']}"


def _split(text: str, separator: str, what: str, item: str) -> list[str]:
    parts = [p.strip() for p in text.split(separator)]
    if any(not p for p in parts):
        raise ValueError(f"sweep {item!r}: empty entry in {what} {text!r}")
    return parts


def _number(text: str, kind: type, item: str):
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"sweep {item!r}: {text!r} is not {noun}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"sweep {item!r}: {text!r} is not finite")
    return value


def _parse_value(key: str, text: str, num_scales: int, item: str):
    if key == "cfg":
        return _number(text, float, item)
    if key == "tau":
        if num_scales == 1:
            raise ValueError(
                f"sweep {item!r}: a Flow Matching config (1 scale) has no stage thresholds; "
                "drop the tau key"
            )
        taus = tuple(_number(t, float, item) for t in _split(text, "/", "tau", item))
        if len(taus) != num_scales - 1:
            raise ValueError(
                f"sweep {item!r}: tau {text!r} has {len(taus)} threshold(s) but the config has "
                f"{num_scales} scales, which need {num_scales - 1} (write them "
                f"'/'-separated, e.g. {'/'.join(['0.9'] * (num_scales - 1))})"
            )
        return taus
    if key == "steps":
        steps = tuple(_number(s, int, item) for s in _split(text, "+", "steps", item))
        if len(steps) != num_scales:
            example = "+".join(["10"] * num_scales)
            raise ValueError(
                f"sweep {item!r}: steps {text!r} has {len(steps)} stage(s) but the config has "
                f"{num_scales} scale(s) (write one count per stage, '+'-separated, e.g. {example})"
            )
        return steps
    if key == "solver":
        if text not in sampling.SOLVERS:
            raise ValueError(f"sweep {item!r}: solver must be one of {sampling.SOLVERS}")
        return text
    # interval
    bounds = _split(text, "-", "interval", item)
    if len(bounds) != 2:
        raise ValueError(f"sweep {item!r}: interval {text!r} must be 'low-high', e.g. 0.1-1.0")
    return tuple(_number(b, float, item) for b in bounds)


def parse_sweep(
    spec: str, sampling_config: sampling.SamplerSettings, num_scales: int
) -> list[SweepPoint]:
    """The sweep points of ``spec`` (see the module docstring), validated.

    Args:
      spec: e.g. ``"cfg=1.0,1.5;tau=0.9;steps=30+10"``; "" is the config's point.
      sampling_config: the config's sampler settings (values of omitted keys).
      num_scales: scales of the model's decomposition (1 for Flow Matching).

    Raises:
      ValueError: unknown or repeated keys, malformed values, lengths that do not
        match ``num_scales``, or settings the sampler rejects; the message names the
        offending entry.
    """
    values: dict[str, list] = {
        "cfg": [float(sampling_config.cfg_scale)],
        "tau": [tuple(float(t) for t in sampling_config.thresholds)],
        "steps": [tuple(int(s) for s in sampling_config.steps_per_stage)],
        "solver": [str(sampling_config.solver)],
        "interval": [tuple(float(v) for v in sampling_config.guidance_interval)],
    }
    seen = set()
    for item in (part.strip() for part in spec.split(";")):
        if not item:
            continue
        key, equals, listing = (s.strip() for s in item.partition("="))
        if not equals:
            raise ValueError(f"sweep entry {item!r} is not key=value[,value...]")
        if key not in SWEEP_KEYS:
            raise ValueError(f"unknown sweep key {key!r} in {item!r}; known keys: {SWEEP_KEYS}")
        if key in seen:
            raise ValueError(f"sweep key {key!r} is given twice; list all its values once")
        seen.add(key)
        parsed = [_parse_value(key, v, num_scales, item) for v in _split(listing, ",", key, item)]
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"sweep {item!r} repeats a value")
        values[key] = parsed
    points = []
    for cfg, tau, steps, solver, interval in itertools.product(*(values[k] for k in SWEEP_KEYS)):
        if len(steps) != num_scales:
            raise ValueError(
                f"config sampling.steps_per_stage {steps} does not match the "
                f"{num_scales} scale(s); give steps= in the sweep"
            )
        try:  # the sampler's own checks: steps, thresholds, solver, cfg, interval
            point = SweepPoint(
                steps_per_stage=steps,
                thresholds=tau,
                solver=solver,
                cfg_scale=cfg,
                guidance_interval=interval,
            )
        except ValueError as e:
            setting = f"cfg={cfg}, tau={tau}, steps={steps}, solver={solver}, interval={interval}"
            raise ValueError(f"sweep point {setting}: {e}") from e
        points.append(point)
    return points


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """Metric names from ``"fid,fdd,is"`` (or a sequence), deduplicated, in canonical order.

    Raises:
      ValueError: unknown names or none at all.
    """
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known metrics: {METRIC_NAMES}")
    if not names:
        raise ValueError(f"no metrics given; choose from {METRIC_NAMES}")
    return tuple(n for n in METRIC_NAMES if n in names)


def metrics_text(metrics: Sequence[str]) -> str:
    """The ``metrics`` column of results: names joined with ``+``."""
    return "+".join(metrics)

"""Tables, plot and sample grids of the Fashion-MNIST study (DFM, FM, Pyramidal, Cascaded).

``write_report(runs, root, out_dir)`` reads every run's ``eval/results.csv`` under
``root`` and writes, into ``out_dir``:

- ``fmnist_study.md``: FD-FMNIST per checkpoint (every method, each seed and the mean)
  with its training compute, the compute each method needs to reach Flow Matching's FD
  (the paper's measure), the ablations and the tau sweep; runs not finished yet are
  listed as missing, never filled in;
- ``fmnist_fd_vs_compute.png``: FD-FMNIST against training compute, one panel per cfg;
- ``fmnist_grids.png``: the final EMA sample grids of the four methods (seed 0).

Compute is counted in analytic training FLOPs (the method's ``forward_flops`` x 3 per
example x batch x steps), so the ratios include DFM's per-scale-layer overhead and the
cheaper low-resolution stages of Pyramidal Flow and Cascaded.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
from collections.abc import Sequence

import numpy as np

from configs import study_fmnist
from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.evaluation import results
from dfm_jax.training import perf
from dfm_jax.training import setup as setup_lib
from dfm_jax.utils import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The file in each run's workdir listing the code versions it was trained/evaluated at.
VERSIONS = "code_versions.txt"
NUM_SAMPLES = 500  # FD-FMNIST samples per point (biased upwards at this size; equal for all)
CFGS = ("1.0", "1.5")
CURVE_TAU = "0.9"
REPORT = "fmnist_study.md"
PLOT = "fmnist_fd_vs_compute.png"
#: Report names of the variants, in plotting order, and their colours.
METHODS = {"dfm": "DFM", "fm": "FM", "pyramidal": "Pyramidal", "cascaded": "Cascaded"}
COLOURS = {"DFM": "tab:blue", "FM": "tab:orange", "Pyramidal": "tab:purple",
           "Cascaded": "tab:red"}  # fmt: skip
GRIDS = "fmnist_grids.png"


def _rows(root: str, name: str) -> list[dict[str, str]]:
    return results.read_results(os.path.join(root, name, "eval"))


def fd_curve(rows, cfg: str, tau: str | None = CURVE_TAU) -> dict[int, float]:
    """{step: FD-FMNIST} of the rows at this cfg and tau (``None``: any tau; the methods
    without a threshold record their config's unused default)."""
    curve = {}
    for row in rows:
        tau_ok = tau is None or row["tau"] in (tau, "")
        if row["cfg"] == cfg and tau_ok and row["fd_fmnist"]:
            curve[int(row["step"])] = float(row["fd_fmnist"])
    return dict(sorted(curve.items()))


def mean_curve(curves: Sequence[dict[int, float]]) -> dict[int, float]:
    """Mean over seeds at the steps every curve has."""
    curves = [c for c in curves if c]
    if not curves:
        return {}
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {s: float(np.mean([c[s] for c in curves])) for s in steps}


def steps_to_reach(curve: dict[int, float], target: float) -> float | None:
    """First step at which ``curve`` reaches ``target`` (linear between checkpoints;
    the first checkpoint when it is already there, None when never)."""
    previous = None
    for step, value in curve.items():
        if value <= target:
            if previous is None:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def train_flops_per_example(variant: str) -> float:
    """Analytic training FLOPs per example (forward + backward) of a study variant."""
    settings = config_lib.read(study_fmnist.get_config(variant))
    method = setup_lib.build_method(settings, data.data_spec(settings.data))
    return perf.TRAIN_FLOPS_PER_FORWARD * method.forward_flops()


@functools.cache
def budget(variant: str) -> tuple[int, int]:
    """``(batch_size, total_steps)`` of a study variant (its config, built once)."""
    config = study_fmnist.get_config(variant)
    return int(config.batch_size), int(config.total_steps)


def tera_flops(variant: str, steps: float, flops: dict[str, float]) -> float:
    """Training compute of ``steps`` steps of a variant, in TFLOP."""
    return steps * budget(variant)[0] * flops[variant] / 1e12


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _curve_table(curves: dict[str, dict[int, float]]) -> list[str]:
    names = list(curves)
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in steps:
        cells = [_fmt(curves[n].get(step)) for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def _method_table(panel: dict[str, dict], flops: dict[str, float], seeds) -> list[str]:
    """One row per method and checkpoint: steps, training TFLOP, each seed, the mean."""
    header = "| method | step | training TFLOP | " + " | ".join(f"seed {s}" for s in seeds)
    lines = [header + " | mean |", "|---" * (len(seeds) + 4) + "|"]
    for variant, method in METHODS.items():
        mean = panel.get(f"{method} mean", {})
        per_seed = [panel.get(f"{method} seed {s}", {}) for s in seeds]
        for step in sorted({s for c in [mean, *per_seed] for s in c}):
            cells = [_fmt(c.get(step)) for c in [*per_seed, mean]]
            compute = tera_flops(variant, step, flops)
            lines.append(f"| {method} | {step} | {compute:.1f} | " + " | ".join(cells) + " |")
    return lines


def _plot(panels: dict[str, dict[str, dict[int, float]]], extras, flops, path: str) -> None:
    """One panel per cfg against training TFLOP: the main runs (thin: seeds, thick: mean),
    ``extras`` (DFM ablations) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    variants = {method: variant for variant, method in METHODS.items()}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for name, curve in curves.items():
            if not curve:
                continue
            method = name.split()[0]
            mean = name.endswith("mean")
            ax.plot(
                [tera_flops(variants[method], s, flops) for s in curve],
                list(curve.values()),
                marker="o" if mean else None,
                linewidth=2.2 if mean else 0.9,
                alpha=1.0 if mean else 0.45,
                color=COLOURS.get(method, "gray"),
                label=name if mean else None,
            )
        for name, curve in extras.get(title, {}).items():
            ax.plot([tera_flops("dfm", s, flops) for s in curve], list(curve.values()), "--",
                    marker="s", color="tab:green", linewidth=1.4, label=name)  # fmt: skip
        ax.set_title(f"{title} (thin lines: seeds)")
        ax.set_xlabel("training compute (TFLOP, analytic)")
        ax.set_ylabel(f"FD-FMNIST ({NUM_SAMPLES} samples, lower is better)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grids(root: str, names: Sequence[tuple[str, str, int]], path: str) -> bool:
    """Pastes the runs' (name, caption, step) sample grids side by side; False if missing."""
    from PIL import Image, ImageDraw

    images = []
    for name, caption, step in names:
        grid = os.path.join(root, name, "samples", f"step_{step:08d}_grid.png")
        if not os.path.exists(grid):
            return False
        images.append((Image.open(grid).convert("RGB"), caption))
    header, gap = 24, 16
    width = sum(im.width for im, _ in images) + gap * (len(images) - 1)
    height = header + max(im.height for im, _ in images)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, caption in images:
        draw.text((x + 4, 6), caption, fill="black")
        canvas.paste(image, (x, header))
        x += image.width + gap
    canvas.save(path)
    return True


def code_version(repo: str = REPO) -> str:
    """``git`` commit of ``repo`` (with "+changes" when tracked files outside ``docs/``
    differ), or "unknown"."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short=10", "HEAD")
    if not commit:
        return "unknown"
    # The report this study writes under docs/ is not code: it does not count as a change.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs")
    return commit + ("+changes" if changed else "")


def read_versions(workdir: str) -> list[str]:
    """The code versions a run was trained and evaluated at (its ``VERSIONS`` file)."""
    path = os.path.join(workdir, VERSIONS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted({line.strip() for line in f if line.strip()})


def run_versions(root: str, names: Sequence[str]) -> dict[str, list[str]]:
    """{run: its code versions} for the runs under ``root`` that record any."""
    versions = {name: read_versions(os.path.join(root, name)) for name in names}
    return {name: found for name, found in versions.items() if found}


def _panels(main, rows) -> dict[str, dict[str, dict[int, float]]]:
    """{"cfg 1.0": {"DFM seed 0": {step: FD}, ..., "DFM mean": ..., "FM seed 0": ...}}."""
    panels = {}
    for cfg in CFGS:
        curves = {}
        for variant, method in METHODS.items():
            tau = CURVE_TAU if variant == "dfm" else None
            per_seed = {
                f"{method} seed {r.seed}": fd_curve(rows[r.name], cfg, tau)
                for r in main
                if r.variant == variant
            }
            curves.update(per_seed)
            curves[f"{method} mean"] = mean_curve(list(per_seed.values()))
        panels[f"cfg {cfg}"] = curves
    return panels


def _header(flops: dict[str, float], versions: dict[str, list[str]]) -> list[str]:
    steps = {v: budget(v)[1] for v in METHODS}
    budgets = ", ".join(
        f"{METHODS[v]} {flops[v] / 1e6:.1f} M x {steps[v]} steps = "
        f"{tera_flops(v, steps[v], flops):.1f} TFLOP"
        for v in METHODS
    )
    distinct = sorted({v for vs in versions.values() for v in vs})
    if not distinct:
        version = "No run records its code version yet."
    elif len(distinct) == 1:
        version = f"Every run was trained and evaluated at code version `{distinct[0]}`."
    else:
        version = (
            "Code versions per run: "
            + "; ".join(f"{name} `{', '.join(vs)}`" for name, vs in versions.items())
            + "."
        )
    return [
        "# Fashion-MNIST study: DFM, Flow Matching, Pyramidal Flow, Cascaded (generated)",
        "",
        "Written by `experiments/fmnist_study.py`; do not edit by hand. FD-FMNIST on "
        f"{NUM_SAMPLES} EMA samples per point (class-balanced, fixed noise), 40 network "
        "evaluations per guidance branch (DFM 30 + 10 with tau 0.9, FM 40, Pyramidal and "
        "Cascaded 20 + 20), Euler. Training FLOPs per example (batch 64) and the budget: "
        f"{budgets}. {version}",
        "",
    ]


def write_report(runs, root: str, out_dir: str) -> str:
    """Writes the report files into ``out_dir``; returns the Markdown file's path."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {run.name: _rows(root, run.name) for run in runs}
    main = [run for run in runs if run.curve and not run.overrides]
    flops = {v: train_flops_per_example(v) for v in METHODS}
    lines = _header(flops, run_versions(root, [r.name for r in runs]))
    missing = [run.name for run in runs if not rows[run.name]]
    if missing:
        lines += [f"Runs without results yet: {', '.join(missing)}.", ""]
    panels = _panels(main, rows)
    seeds = sorted({r.seed for r in main})
    for title, panel in panels.items():
        lines += [f"## FD-FMNIST along training, {title}", ""]
        lines += [*_method_table(panel, flops, seeds), ""]
    for variant in ("dfm", "pyramidal", "cascaded"):
        done = [r.seed for r in main if r.variant == variant and rows[r.name]]
        seeds_text = f"mean over seeds {done}" if done else "no results yet"
        lines += _compute_ratio_section(panels, flops, variant, seeds_text)
    extras = _ablation_curves(runs, rows, panels, flops, lines)
    dfm_steps = budget("dfm")[1]
    ablations = [r for r in runs if r.overrides or r.name == "dfm_s0"]
    lines += _final_table("DFM ablations (seed 0, final step)", ablations, rows, dfm_steps)
    lines += _tau_table([r for r in runs if r.tau_sweep], rows, dfm_steps)
    if any(curve for curves in panels.values() for curve in curves.values()):
        _plot(panels, extras, flops, os.path.join(out_dir, PLOT))
        lines += [f"![FD-FMNIST vs training compute]({PLOT})", ""]
    seed0 = [r for r in main if r.seed == 0]
    captions = [(r.name, f"{METHODS[r.variant]}, step {r.total_steps()}", r.total_steps())
                for r in seed0]  # fmt: skip
    if seed0 and _grids(root, captions, os.path.join(out_dir, GRIDS)):
        names = ", ".join(METHODS[r.variant] for r in seed0)
        lines += [f"![Final EMA samples, cfg 1.5, one class per row: {names}]({GRIDS})", ""]
    path = os.path.join(out_dir, REPORT)
    files.atomic_write_text(path, "\n".join(lines))
    return path


def _ablation_curves(runs, rows, panels, flops, lines: list[str]) -> dict[str, dict]:
    """Appends the along-training sections of the DFM ablation curve runs to ``lines``;
    returns their curves per panel (dashed in the plot)."""
    extras = {panel: {} for panel in panels}
    for run in (r for r in runs if r.curve and r.overrides):
        curves = {f"cfg {cfg}": fd_curve(rows[run.name], cfg) for cfg in CFGS}
        if not any(curves.values()):
            continue
        lines += [f"## {run.label} (seed {run.seed}) along training", ""]
        for cfg in CFGS:
            table = {
                run.label: curves[f"cfg {cfg}"],
                "DFM seed 0": panels[f"cfg {cfg}"].get("DFM seed 0", {}),
                "FM mean": panels[f"cfg {cfg}"]["FM mean"],
            }
            lines += [f"cfg {cfg}:", "", *_curve_table(table), ""]
            extras[f"cfg {cfg}"][run.label] = curves[f"cfg {cfg}"]
        versus_fm = {
            panel: {"DFM mean": curves[panel], "FM mean": panels[panel]["FM mean"]}
            for panel in panels
        }
        lines += _compute_ratio_section(
            versus_fm,
            flops,
            "dfm",
            f"{run.label}, seed {run.seed}, against the FM mean",
            title=f"Compute at which {run.label} matches Flow Matching",
        )
    return extras


def _compute_ratio_section(
    panels, flops, variant: str, seeds_text: str, title: str = ""
) -> list[str]:
    """For every FM checkpoint: the steps ``variant`` needs to reach its FD, and the
    training-compute ratio FM / method.

    The row of FM's last checkpoint is the paper's measure ("DFM matches FM's final score
    with N x less compute"); the earlier rows show how the ratio evolves in training.
    """
    method = METHODS[variant]
    fm_total = budget("fm")[1]
    lines = [
        f"## {title or f'Compute at which {method} matches Flow Matching'}",
        "",
        f"For each FM checkpoint, the training steps {method} needs to reach the same "
        f"FD-FMNIST (interpolated linearly between its checkpoints; its first checkpoint, "
        "an upper bound, when it is already there) and the training-compute ratio "
        f"FM / {method} in FLOPs ({seeds_text}).",
        "",
        f"| cfg | FM steps | FM FD | {method} steps to reach it | compute ratio FM / {method} |",
        "|---|---|---|---|---|",
    ]
    for cfg in CFGS:
        curves = panels[f"cfg {cfg}"]
        fm, curve = curves.get("FM mean", {}), curves.get(f"{method} mean", {})
        if not fm or not curve:
            lines.append(f"| {cfg} | — | — | — | (runs not finished) |")
            continue
        for step, target in fm.items():
            fm_compute = tera_flops("fm", step, flops)
            reach = steps_to_reach(curve, target)
            if reach is None:
                reach_text = f"not reached in {max(curve)}"
                ratio = f"< {fm_compute / tera_flops(variant, max(curve), flops):.2f}"
            else:
                bound = "≤ " if reach == min(curve) else ""  # there at its first point
                reach_text = f"{bound}{reach:.0f}"
                ratio = (
                    f"{'≥ ' if bound else ''}{fm_compute / tera_flops(variant, reach, flops):.2f}"
                )
            b = "**" if step == fm_total else ""
            lines.append(f"| {cfg} | {b}{step}{b} | {target:.1f} | {reach_text} | {b}{ratio}{b} |")
    return [*lines, ""]


def _final_table(title: str, runs, rows, total_steps: int) -> list[str]:
    lines = [f"## {title}", "", "| run | " + " | ".join(f"cfg {c}" for c in CFGS) + " |"]
    lines.append("|---" * (len(CFGS) + 1) + "|")
    for run in runs:
        cells = [_fmt(fd_curve(rows[run.name], cfg).get(total_steps)) for cfg in CFGS]
        label = run.label if run.overrides else f"{run.label} (p_q 0.9, location 1.5)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _tau_table(runs, rows, total_steps: int) -> list[str]:
    lines = [f"## Threshold tau (DFM, final step {total_steps})", ""]
    lines += ["| run | tau | " + " | ".join(f"cfg {c}" for c in CFGS) + " |"]
    lines.append("|---" * (len(CFGS) + 2) + "|")
    for run in runs:
        for tau in ("0.7", "0.9"):
            cells = [_fmt(fd_curve(rows[run.name], c, tau).get(total_steps)) for c in CFGS]
            lines.append(f"| {run.label} | {tau} | " + " | ".join(cells) + " |")
    return [*lines, ""]

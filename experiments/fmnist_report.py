"""Tables, plot and sample grids of the Fashion-MNIST DFM-vs-FM study.

``write_report(runs, root, out_dir, total_steps)`` reads every run's ``eval/results.csv``
under ``root`` and writes, into ``out_dir``:

- ``fmnist_study.md``: FD-FMNIST per checkpoint (both methods, each seed and the mean),
  the compute ratio at which DFM matches Flow Matching's final score, the ablations and
  the tau sweep; runs not finished yet are listed as missing, never filled in;
- ``fmnist_fd_vs_steps.png``: FD-FMNIST against training steps, one panel per cfg;
- ``fmnist_grids.png``: the final EMA sample grids of DFM and FM (seed 0) side by side.

Compute is counted in analytic training FLOPs (``dit.forward_flops`` x 3 per example),
so the ratio includes DFM's per-scale-layer overhead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from configs import study_fmnist
from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.evaluation import results
from dfm_jax.training import perf
from dfm_jax.training import setup as setup_lib
from dfm_jax.utils import files

NUM_SAMPLES = 500  # FD-FMNIST samples per point (biased upwards at this size; equal for all)
CFGS = ("1.0", "1.5")
CURVE_TAU = "0.9"
REPORT = "fmnist_study.md"
PLOT = "fmnist_fd_vs_steps.png"
GRIDS = "fmnist_grids.png"


def _rows(root: str, name: str) -> list[dict[str, str]]:
    return results.read_results(os.path.join(root, name, "eval"))


def fd_curve(rows, cfg: str, tau: str = CURVE_TAU) -> dict[int, float]:
    """{step: FD-FMNIST} of the rows at this cfg and tau (the config's 30+10 / 40 steps)."""
    curve = {}
    for row in rows:
        if row["cfg"] == cfg and row["tau"] in (tau, "") and row["fd_fmnist"]:
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
    """First step at which ``curve`` reaches ``target`` (linear between checkpoints)."""
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


def _plot(panels: dict[str, dict[str, dict[int, float]]], extras, path: str) -> None:
    """One panel per cfg: the main runs (thin: seeds, thick: mean), ``extras`` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    colours = {"DFM": "tab:blue", "FM": "tab:orange"}
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for name, curve in curves.items():
            if not curve:
                continue
            method = name.split()[0]
            mean = name.endswith("mean")
            ax.plot(
                list(curve),
                list(curve.values()),
                marker="o" if mean else None,
                linewidth=2.2 if mean else 0.9,
                alpha=1.0 if mean else 0.45,
                color=colours.get(method, "gray"),
                label=name,
            )
        for name, curve in extras.get(title, {}).items():
            ax.plot(list(curve), list(curve.values()), "--", marker="s", color="tab:green",
                    linewidth=1.6, label=name)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("training steps (batch 64)")
        ax.set_ylabel(f"FD-FMNIST ({NUM_SAMPLES} samples, lower is better)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grids(root: str, names: Sequence[tuple[str, str]], step: int, path: str) -> bool:
    """Pastes the runs' final sample grids side by side with a caption; False if missing."""
    from PIL import Image, ImageDraw

    images = []
    for name, caption in names:
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


def write_report(runs, root: str, out_dir: str, total_steps: int) -> str:
    """Writes the report files into ``out_dir``; returns the Markdown file's path."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {run.name: _rows(root, run.name) for run in runs}
    main = [run for run in runs if run.curve and not run.overrides]
    flops = {v: train_flops_per_example(v) for v in ("dfm", "fm")}
    lines = [
        "# Fashion-MNIST study: DFM vs Flow Matching (generated)",
        "",
        "Written by `experiments/fmnist_dfm_vs_fm.py`; do not edit by hand. FD-FMNIST on "
        f"{NUM_SAMPLES} EMA samples per point (class-balanced, fixed noise), 40 network "
        "evaluations (DFM 30 + 10 with tau 0.9, FM 40), Euler. Training FLOPs per example: DFM "
        f"{flops['dfm'] / 1e6:.1f} M, FM {flops['fm'] / 1e6:.1f} M "
        f"(ratio {flops['dfm'] / flops['fm']:.4f}).",
        "",
    ]
    missing = [run.name for run in runs if not rows[run.name]]
    if missing:
        lines += [f"Runs without results yet: {', '.join(missing)}.", ""]
    panels = {}
    for cfg in CFGS:
        curves = {}
        for method, variant in (("DFM", "dfm"), ("FM", "fm")):
            per_seed = {
                f"{method} seed {r.seed}": fd_curve(rows[r.name], cfg)
                for r in main
                if r.variant == variant
            }
            curves.update(per_seed)
            curves[f"{method} mean"] = mean_curve(list(per_seed.values()))
        panels[f"cfg {cfg}"] = curves
        lines += [f"## FD-FMNIST vs training steps, cfg {cfg}", "", *_curve_table(curves), ""]
    with_results = [r.seed for r in main if r.variant == "dfm" and rows[r.name]]
    seeds_text = f"mean over seeds {with_results}" if with_results else "no results yet"
    lines += _compute_ratio_section(panels, flops, total_steps, seeds_text)
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
            total_steps,
            f"{run.label}, seed {run.seed}, against the FM mean",
            title=f"Compute at which {run.label} matches Flow Matching",
        )
    lines += _final_table(
        "Ablations (seed 0, final step)",
        [r for r in runs if r.overrides or r.name == "dfm_s0"],
        rows,
        total_steps,
    )
    lines += _tau_table([r for r in runs if r.tau_sweep], rows, total_steps)
    if any(curve for curves in panels.values() for curve in curves.values()):
        _plot(panels, extras, os.path.join(out_dir, PLOT))
        lines += [f"![FD-FMNIST vs training steps]({PLOT})", ""]
    grid_runs = [("dfm_s0", f"DFM, step {total_steps}"), ("fm_s0", f"FM, step {total_steps}")]
    if _grids(root, grid_runs, total_steps, os.path.join(out_dir, GRIDS)):
        lines += [
            f"![Final EMA samples, DFM left, FM right, cfg 1.5, one class per row]({GRIDS})",
            "",
        ]
    path = os.path.join(out_dir, REPORT)
    files.atomic_write_text(path, "\n".join(lines))
    return path


def _compute_ratio_section(
    panels, flops, total_steps: int, seeds_text: str, title: str = ""
) -> list[str]:
    """For every FM checkpoint: the DFM steps that reach its FD, and the compute ratio.

    The row of the last checkpoint is the paper's measure ("DFM matches FM's final score
    with N x less compute"); the earlier rows show how the ratio evolves in training.
    """
    lines = [
        f"## {title or 'Compute at which DFM matches Flow Matching'}",
        "",
        "For each FM checkpoint, the training steps DFM needs to reach the same FD-FMNIST "
        "(interpolated linearly between DFM's checkpoints; DFM's first checkpoint, an upper "
        "bound, when DFM is already there) and the training-compute ratio "
        f"FM / DFM in FLOPs ({seeds_text}).",
        "",
        "| cfg | FM steps | FM FD | DFM steps to reach it | compute ratio FM / DFM |",
        "|---|---|---|---|---|",
    ]
    for cfg in CFGS:
        curves = panels[f"cfg {cfg}"]
        fm, dfm_curve = curves.get("FM mean", {}), curves.get("DFM mean", {})
        if not fm or not dfm_curve:
            lines.append(f"| {cfg} | — | — | — | (runs not finished) |")
            continue
        for step, target in fm.items():
            reach = steps_to_reach(dfm_curve, target)
            if reach is None:
                reach_text = f"not reached in {max(dfm_curve)}"
                ratio = f"< {step / max(dfm_curve):.2f}"
            else:
                bound = "≤ " if reach == min(dfm_curve) else ""  # there at its first point
                reach_text = f"{bound}{reach:.0f}"
                ratio = f"{'≥ ' if bound else ''}{step * flops['fm'] / (reach * flops['dfm']):.2f}"
            b = "**" if step == total_steps else ""
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

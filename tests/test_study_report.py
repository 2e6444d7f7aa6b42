"""The Fashion-MNIST study's report: curves, the compute-ratio measure, missing runs."""

import csv
import os

import pytest

from experiments import fmnist_dfm_vs_fm as study
from experiments import fmnist_report as report


def test_steps_to_reach_interpolates_between_checkpoints():
    curve = {400: 80.0, 800: 40.0, 1200: 20.0}
    assert report.steps_to_reach(curve, 30.0) == pytest.approx(1000.0)
    assert report.steps_to_reach(curve, 90.0) == 400.0  # already there at the first point
    assert report.steps_to_reach(curve, 10.0) is None


def test_mean_curve_uses_common_steps():
    assert report.mean_curve([{1: 2.0, 2: 4.0}, {1: 4.0}]) == {1: 3.0}
    assert report.mean_curve([{}, {}]) == {}


def _write_results(root, name, values):
    os.makedirs(os.path.join(root, name, "eval"))
    path = os.path.join(root, name, "eval", "results.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "num_samples", "cfg", "tau", "fd_fmnist"])
        writer.writeheader()
        for (step, cfg, tau), fd in values.items():
            writer.writerow(
                {"step": step, "num_samples": 500, "cfg": cfg, "tau": tau, "fd_fmnist": fd}
            )


def test_report_compute_ratio_and_missing_runs(tmp_path):
    root, out = str(tmp_path / "study"), str(tmp_path / "report")
    runs = study.RUNS[:2]  # dfm_s0, fm_s0
    # FM reaches 40 at step 2000; DFM reaches 40 at step 1000 (halfway 1200 -> 800).
    _write_results(root, "fm_s0", {(s, c, ""): 3e4 / s + 25 for s in (1000, 2000) for c in ["1.0"]})
    dfm = {(800, "1.0", "0.9"): 50.0, (1200, "1.0", "0.9"): 30.0, (2000, "1.0", "0.9"): 20.0}
    _write_results(root, "dfm_s0", dfm)
    path = report.write_report(runs, root, out, total_steps=2000)
    with open(path) as f:
        text = f.read()
    flops = report.train_flops_per_example("fm") / report.train_flops_per_example("dfm")
    assert f"| 1.0 | **2000** | 40.0 | 1000 | **{2 * flops:.2f}** |" in text
    assert f"| 1.0 | 1000 | 55.0 | ≤ 800 | ≥ {1.25 * flops:.2f} |" in text  # DFM's first point
    assert "| 1.5 | — | — | — | (runs not finished) |" in text
    assert os.path.exists(os.path.join(out, report.PLOT))


def test_unknown_run_names_are_refused(monkeypatch):
    monkeypatch.setattr("sys.argv", ["study", "--runs=dfm_s7", "--report_only"])
    with pytest.raises(SystemExit, match="unknown runs"):
        study.main()

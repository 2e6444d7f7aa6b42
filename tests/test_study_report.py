"""The Fashion-MNIST study's report: curves, the compute-ratio measure, missing runs."""

import csv
import os

import pytest

from experiments import fmnist_report as report
from experiments import fmnist_study as study


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
    runs = study.RUNS[:4]  # dfm_s0, fm_s0, pyr_s0, cas_s0
    assert [r.variant for r in runs] == ["dfm", "fm", "pyramidal", "cascaded"]
    # FM reaches 40 at step 2000; DFM reaches 40 at step 1000 (halfway 1200 -> 800).
    _write_results(root, "fm_s0", {(s, c, ""): 3e4 / s + 25 for s in (1000, 2000) for c in ["1.0"]})
    dfm = {(800, "1.0", "0.9"): 50.0, (1200, "1.0", "0.9"): 30.0, (2000, "1.0", "0.9"): 20.0}
    dfm[(2000, "1.0", "0.7")] = 99.0  # the tau sweep's other point stays out of the curve
    _write_results(root, "dfm_s0", dfm)
    # Pyramidal (its rows carry its config's unused tau 0.5) reaches 40 at step 3000.
    _write_results(root, "pyr_s0", {(2000, "1.0", "0.5"): 60.0, (3229, "1.0", "0.5"): 36.0})
    path = report.write_report(runs, root, out)
    with open(path) as f:
        text = f.read()
    flops = {v: report.train_flops_per_example(v) for v in report.METHODS}
    dfm_ratio = flops["fm"] / flops["dfm"]
    assert f"| 1.0 | **2000** | 40.0 | 1000 | **{2 * dfm_ratio:.2f}** |" in text
    assert f"| 1.0 | 1000 | 55.0 | ≤ 800 | ≥ {1.25 * dfm_ratio:.2f} |" in text  # first point
    reach = 2000 + 1229 * (60 - 40) / (60 - 36)
    pyr_ratio = 2000 * flops["fm"] / (reach * flops["pyramidal"])
    assert f"| 1.0 | **2000** | 40.0 | {reach:.0f} | **{pyr_ratio:.2f}** |" in text
    assert "| 1.5 | — | — | — | (runs not finished) |" in text
    assert "Runs without results yet: cas_s0." in text
    compute = 3229 * 64 * flops["pyramidal"] / 1e12
    assert f"| Pyramidal | 3229 | {compute:.1f} | 36.0 | 36.0 |" in text
    assert "| DFM | 2000 | " in text and "| 20.0 | 20.0 |" in text
    assert os.path.exists(os.path.join(out, report.PLOT))


def test_curve_steps_skip_a_multiple_next_to_the_last_step():
    assert study.curve_steps([400, 800, 2000, 2003], 400, 2003) == [400, 800, 2003]
    assert study.curve_steps([400, 3200, 3229], 400, 3229) == [400, 3229]
    assert study.curve_steps([400, 555, 2000], 400, 2000) == [400, 2000]  # SIGTERM save


def test_code_versions_are_recorded_once_per_run(tmp_path, monkeypatch):
    workdir = str(tmp_path / "dfm_s0")
    for version in ("abc", "abc", "def"):
        monkeypatch.setattr(report, "code_version", lambda v=version: v)
        study.record_version(workdir)
    assert report.read_versions(workdir) == ["abc", "def"]
    assert report.run_versions(str(tmp_path), ["dfm_s0", "fm_s0"]) == {"dfm_s0": ["abc", "def"]}


def test_unknown_run_names_are_refused(monkeypatch):
    monkeypatch.setattr("sys.argv", ["study", "--runs=dfm_s7", "--report_only"])
    with pytest.raises(SystemExit, match="unknown runs"):
        study.main()

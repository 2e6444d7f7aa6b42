"""DFM, Flow Matching, Pyramidal Flow and Cascaded at equal compute: the Fashion-MNIST study.

    python experiments/fmnist_study.py                    # everything, resumable
    python experiments/fmnist_study.py --runs=dfm_s0,fm_s0
    python experiments/fmnist_study.py --report_only      # tables + plots from results

Trains every run of `RUNS` with ``python -m dfm_jax.main`` (``configs/study_fmnist.py``),
evaluates FD-FMNIST on the EMA parameters with ``python -m dfm_jax.eval``, and writes the
report (``docs/results/fmnist_study.md``, the FD-vs-compute plot and side-by-side sample
grids). Every piece resumes: the trainer continues from a run's newest checkpoint, and
evaluation skips points already in the run's ``eval/results.csv``; killing the script and
starting it again loses at most the step or sweep point in progress.

The four methods share the backbone, batch, optimizer and training FLOPs (the Pyramidal
and Cascaded configs scale ``total_steps`` to DFM's FLOPs; ``configs/study_fmnist.py``).
Main runs (one per method and seed) are evaluated at every checkpoint at cfg 1.0 and 1.5;
ablation runs (p_q, earlier-stage location) at the last checkpoint; the threshold tau is
a sampling choice, swept at the last checkpoint of the main DFM runs. Samplers all use 40
network evaluations per sample per guidance branch (DFM 30 + 10, FM 40, Pyramidal and
Cascaded 20 + 20).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = "configs/study_fmnist.py"
GUIDANCE = "cfg=1.0,1.5"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study.

    Attributes:
      name: the workdir name under the study root, e.g. "dfm_s0".
      variant: "dfm", "fm", "pyramidal" or "cascaded" (``configs/study_fmnist.py:<variant>``).
      seed: ``config.seed`` (parameters, data order, noise).
      overrides: extra ``--config.<field>=<value>`` flags (ablations).
      curve: evaluate every checkpoint (main runs) instead of the last only.
      tau_sweep: also sweep tau in {0.7, 0.9} at the last checkpoint.
      label: what the report calls it.
    """

    name: str
    variant: str
    seed: int = 0
    overrides: tuple[tuple[str, str], ...] = ()
    curve: bool = False
    tau_sweep: bool = False
    label: str = ""

    def config_flags(self) -> list[str]:
        flags = [f"--config={CONFIG}:{self.variant}", f"--config.seed={self.seed}"]
        return flags + [f"--config.{field}={value}" for field, value in self.overrides]

    def total_steps(self) -> int:
        """The run's ``total_steps`` (Pyramidal and Cascaded: scaled to DFM's FLOPs)."""
        from experiments import fmnist_report

        return fmnist_report.budget(self.variant)[1]


#: Report names of the variants.
METHODS = {"dfm": "DFM", "fm": "FM", "pyramidal": "Pyramidal", "cascaded": "Cascaded"}
_PREFIX = {"dfm": "dfm", "fm": "fm", "pyramidal": "pyr", "cascaded": "cas"}


def _main_runs(seed: int) -> list[Run]:
    return [
        Run(f"{_PREFIX[variant]}_s{seed}", variant, seed, curve=True,
            tau_sweep=variant == "dfm", label=f"{method} seed {seed}")
        for variant, method in METHODS.items()
    ]  # fmt: skip


#: In priority order: the four methods for two seeds (the headline and its spread), then
#: the Table 1 ablations of DFM's training distribution (seed 0).
RUNS: tuple[Run, ...] = (
    *_main_runs(0),
    *_main_runs(1),
    # Evaluated along training too: it beat both p_q = 0.9 and FM at the last checkpoint.
    Run("dfm_pq0.8_s0", "dfm", overrides=(("objective.stage_probs", "(0.8,0.2)"),),
        curve=True, label="DFM p_q = 0.8"),
    Run("dfm_pq0.95_s0", "dfm", overrides=(("objective.stage_probs", "(0.95,0.05)"),),
        label="DFM p_q = 0.95"),
    Run("dfm_loc0_s0", "dfm", overrides=(("objective.earlier_location", "0.0"),),
        label="DFM earlier location 0"),
    Run("dfm_loc2_s0", "dfm", overrides=(("objective.earlier_location", "2.0"),),
        label="DFM earlier location 2.0"),
)  # fmt: skip


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _call(args: list[str], log_path: str) -> None:
    """Runs ``python -m ...`` from the repository root, appending its output to log_path."""
    _log(" ".join(args[1:]))
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        result = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"command failed ({result.returncode}); see {log_path}")


def _checkpoint_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _evaluated(workdir: str, step: int, sweep_size: int) -> bool:
    from dfm_jax.evaluation import results
    from experiments.fmnist_report import NUM_SAMPLES

    rows = results.read_results(os.path.join(workdir, "eval"))
    done = [r for r in rows if int(r["step"]) == step and r["num_samples"] == str(NUM_SAMPLES)]
    return len(done) >= sweep_size


def record_version(workdir: str) -> None:
    """Adds the current code version to the run's ``VERSIONS`` file (the report lists them:
    all four methods' numbers must come from one version)."""
    from experiments import fmnist_report

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, fmnist_report.VERSIONS)
    version = fmnist_report.code_version()
    if version not in fmnist_report.read_versions(workdir):
        with open(path, "a") as f:
            f.write(version + "\n")


def train(run: Run, workdir: str) -> None:
    if run.total_steps() in _checkpoint_steps(workdir):
        return
    log = os.path.join(workdir, "train.log")
    record_version(workdir)
    _call([sys.executable, "-m", "dfm_jax.main", *run.config_flags(), f"--workdir={workdir}"], log)


def curve_steps(saved: list[int], every: int, total_steps: int) -> list[int]:
    """The checkpoints a curve run is evaluated at: every ``every`` steps and the last.

    A multiple of ``every`` closer than ``every / 2`` to the last step is left out (the
    equal-FLOPs runs end at 2003 or 3229 steps); checkpoints saved at other steps (on
    SIGTERM) are not evaluated.
    """
    return [
        s for s in saved if s == total_steps or (s % every == 0 and total_steps - s >= every / 2)
    ]


def evaluate(run: Run, workdir: str, every: int) -> None:
    """FD-FMNIST of the run's checkpoints: along training (curve runs) or the last."""
    from experiments import fmnist_report

    total_steps = run.total_steps()
    steps = [total_steps]
    if run.curve:
        steps = curve_steps(_checkpoint_steps(workdir), every, total_steps)
    jobs = [(step, GUIDANCE, 2) for step in steps]
    if run.tau_sweep:
        jobs.append((total_steps, f"{GUIDANCE};tau=0.7,0.9", 4))
    log = os.path.join(workdir, "eval.log")
    for step, sweep, size in jobs:
        if _evaluated(workdir, step, size):
            continue
        record_version(workdir)
        _call(
            [
                sys.executable, "-m", "dfm_jax.eval", *run.config_flags(),
                f"--workdir={workdir}", f"--step={step}", "--metrics=fd_fmnist",
                f"--sweep={sweep}", f"--num_samples={fmnist_report.NUM_SAMPLES}",
            ],
            log,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.join(REPO, "workdir", "study"))
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--report_dir", default=os.path.join(REPO, "docs", "results"))
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()

    from configs import study_fmnist
    from experiments import fmnist_report

    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in RUNS})
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {[r.name for r in RUNS]}")
    runs = [r for r in RUNS if not names or r.name in names]
    every = int(study_fmnist.get_config("dfm").checkpoint_every)
    # One compilation cache for every subprocess: evaluation recompiles the same sampler.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.root, "jax_cache"))
    if not args.report_only:
        for run in runs:
            workdir = os.path.join(args.root, run.name)
            _log(f"== {run.name} ({run.label})")
            train(run, workdir)
            evaluate(run, workdir, every)
            fmnist_report.write_report(RUNS, args.root, args.report_dir)
    path = fmnist_report.write_report(RUNS, args.root, args.report_dir)
    _log(f"report: {path}")


if __name__ == "__main__":
    main()

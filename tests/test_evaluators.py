"""Evaluators declared in the config: run by the trainer, and the same numbers from eval.py.

A tiny 32x32x1 run with an FD-FMNIST evaluator every 2 steps (a small classifier built
here stands in for the cached FD-FMNIST one, which takes minutes to train): the
trainer must score steps 2 and 4, write the rows and TensorBoard scalars, and score
exactly what ``python -m dfm_jax.eval``'s library path scores on the saved checkpoint.
"""

from __future__ import annotations

import csv
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import train_utils

from dfm_jax import config as config_lib
from dfm_jax.evaluation import evaluators, metrics, runner
from dfm_jax.evaluation.fd_fmnist import FdFmnist, TrainingSettings
from dfm_jax.training import loop
from dfm_jax.training import setup as setup_lib

RUN = {
    "data.resolution": 32,
    "model.patch_sizes": (4, 8),
    "total_steps": 4,
    "log_every": 2,
    "checkpoint_every": 2,
    "sample_every": 100,
    "evals.fd_fmnist.every": 2,
    "evals.fd_fmnist.num_samples": 16,
    "evals.fd_fmnist.batch_size": 8,
}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


def small_fd_fmnist(settings: config_lib.Settings) -> FdFmnist:
    """A random 4-channel classifier with reference statistics from the run's own data."""
    classifier = TrainingSettings(channels=(4,), feature_dim=6)
    params = classifier.model().init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
    source = setup_lib.build(settings).source
    images = np.stack([source[i]["image"] for i in range(200, 400)])
    reference = metrics.RunningStatistics(6).update(classifier.model().apply(params, images)[1])
    return FdFmnist(classifier, params, 0.5, reference)


def _rows(workdir):
    with open(os.path.join(workdir, "eval", "results.csv")) as f:
        return list(csv.DictReader(f))


def _scalars(workdir, tag):
    values = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_trainer_runs_the_declared_evaluators(tmp_path, monkeypatch):
    settings = train_utils.tiny_settings(RUN)
    fd = small_fd_fmnist(settings)
    monkeypatch.setattr(evaluators, "load_fd_fmnist", lambda *args, **kwargs: fd)
    workdir = str(tmp_path / "run")
    loop.run(settings, workdir)

    rows = _rows(workdir)
    assert [(r["step"], r["num_samples"], r["metrics"], r["cfg"]) for r in rows] == [
        ("2", "16", "fd_fmnist", "1.5"),
        ("4", "16", "fd_fmnist", "1.5"),
    ]
    scores = [float(r["fd_fmnist"]) for r in rows]
    assert all(np.isfinite(scores)) and scores[0] != scores[1]  # the parameters moved
    point = "cfg1.5_tau0.9_steps2+2_euler_int0.0-1.0"
    assert _scalars(workdir, f"fd_fmnist/{point}/fd_fmnist") == pytest.approx(
        {2: scores[0], 4: scores[1]}, rel=1e-6
    )

    # eval.py on the saved checkpoints: the rows are already there (same step, samples,
    # seed, metrics and sampler), so nothing is recomputed ...
    declared = settings.evals["fd_fmnist"]
    again = runner.run_sweep(settings, workdir, declared, step=2, fd_fmnist=fd)
    assert [r["fd_fmnist"] for r in again] == [rows[0]["fd_fmnist"]]
    assert len(_rows(workdir)) == 2
    # ... and computing it afresh from the newest checkpoint gives the trainer's number.
    os.remove(os.path.join(workdir, "eval", "results.csv"))
    recomputed = runner.run_sweep(settings, workdir, declared, fd_fmnist=fd, print_summary=False)
    assert float(recomputed[0]["fd_fmnist"]) == pytest.approx(scores[1], rel=1e-5)


def test_evaluators_that_cannot_take_the_samples_are_skipped_with_a_warning(caplog):
    """FD-FMNIST takes 32x32 grayscale images: the 8x8 tiny run skips it, saying why."""
    settings = train_utils.tiny_settings({"evals.fd_fmnist.every": 2})
    setup = setup_lib.build(settings)
    with caplog.at_level("WARNING"):
        training = evaluators.TrainingEvaluators(setup, "/nonexistent", writer=None)
    assert not training.due(2) and not training.due(settings.total_steps)
    assert any("evaluator fd_fmnist is skipped" in r.getMessage() for r in caplog.records)
    assert any("32x32 images, but the samples are 8x8" in r.getMessage() for r in caplog.records)

"""FVD-FMNIST: the video classifier, its cache, its gates and that the metric sees motion.

The classifier is trained here at a tiny size (few steps, a small subset, a tmp cache);
the full-size classifier's gates and scores are checked by the ``slow`` test.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import train_utils
import xla_flags
from test_eval import random_checkpoint

from dfm_jax import config as config_lib
from dfm_jax.evaluation import classifier_cache, evaluators, results
from dfm_jax.evaluation import features as features_lib
from dfm_jax.evaluation import fvd_fmnist as fvd_lib
from dfm_jax.evaluation.demo import demo_report
from dfm_jax.evaluation.fvd_fmnist import FvdFmnist, TrainingSettings
from dfm_jax.training import setup as setup_lib

TINY = TrainingSettings(
    channels=(4, 8, 8),
    feature_dim=16,
    train_clips=2_000,
    steps=300,
    batch_size=32,
    learning_rate=3e-3,
    reference_clips=300,
    min_class_accuracy=0.0,
    min_direction_accuracy=0.0,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(cache_dir, FvdFmnist)`` of the tiny classifier, trained once for the module.

    Its train step runs at XLA's default optimisation level (``xla_flags.optimized``):
    the 300 steps are compute, not compilation.
    """
    cache_dir = str(tmp_path_factory.mktemp("fvd_cache"))
    step = xla_flags.optimized(fvd_lib._train_step.__wrapped__, static_argnums=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fvd_lib, "_train_step", step)
        return cache_dir, FvdFmnist.load_or_train(cache_dir=cache_dir, settings=TINY)


def _count_training(monkeypatch, trained_fvd: FvdFmnist) -> list[TrainingSettings]:
    """Makes ``FvdFmnist.train`` return ``trained_fvd`` and record its calls (no training)."""
    calls: list[TrainingSettings] = []

    def train(settings, data_dir=None):
        calls.append(settings)
        return dataclasses.replace(trained_fvd, settings=settings)

    monkeypatch.setattr(FvdFmnist, "train", staticmethod(train))
    return calls


def _same_params(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_direction_bins():
    velocities = [(0, 1), (1, 1), (1, 0), (0, -1), (-1, 0), (-1, 1), (0.1, 1), (-0.1, 1)]
    assert fvd_lib.direction_bins(np.asarray(velocities)).tolist() == [0, 1, 2, 4, 6, 7, 0, 0]


def test_shuffle_frames_permutes_every_clip():
    clips = np.arange(6 * 8, dtype=np.float32).reshape(6, 8, 1, 1, 1)
    shuffled = fvd_lib.shuffle_frames(clips, seed=3)
    for clip, out in zip(clips, shuffled, strict=True):
        assert not np.array_equal(clip, out)
        assert sorted(out.ravel().tolist()) == clip.ravel().tolist()


def test_tiny_classifier_learns_both_heads(trained):
    """Chance is 0.1 (class) and 0.125 (direction): both heads must beat it (measured at
    this size: 0.22 and 0.38; the full-size classifier is gated by the slow test)."""
    _, fvd = trained
    assert fvd.class_accuracy > 0.15, fvd.class_accuracy
    assert fvd.direction_accuracy > 0.25, fvd.direction_accuracy
    assert fvd.reference.count == TINY.reference_clips


def test_metric_sees_motion(trained):
    """Held-out real clips < the same clips shuffled in time < noise (measured at this
    size: 0.18, 0.63 and 169)."""
    _, fvd = trained
    scores = fvd.reference_scores(num_clips=300)
    assert scores["real"] < 0.5 * scores["shuffled"], scores
    assert scores["shuffled"] < 0.5 * scores["noise"], scores
    real = fvd.held_out_clips(300)
    assert fvd.distance(real) == pytest.approx(scores["real"], rel=1e-6)
    assert fvd.statistics(real).count == 300


def test_cache_round_trip_does_not_retrain(trained, monkeypatch):
    cache_dir, fvd = trained
    calls = _count_training(monkeypatch, fvd)
    again = FvdFmnist.load_or_train(cache_dir=cache_dir, settings=TINY)
    assert calls == []
    assert _same_params(again.params, fvd.params)
    assert (again.class_accuracy, again.direction_accuracy) == (
        fvd.class_accuracy,
        fvd.direction_accuracy,
    )
    np.testing.assert_array_equal(again.reference.covariance, fvd.reference.covariance)
    clips = fvd.held_out_clips(20)
    np.testing.assert_allclose(again.features(clips), fvd.features(clips), rtol=1e-6)


@pytest.mark.slow  # trains twice; the cache tests cover reuse
def test_training_is_deterministic():
    short = dataclasses.replace(TINY, steps=3)
    source = fvd_lib.clip_source("train", short)
    first, second = (fvd_lib.train_classifier(source, short) for _ in range(2))
    assert _same_params(first, second)


@pytest.mark.parametrize(
    "change",
    [
        {"frames": 6},
        {"resolution": 24},
        {"channels": (4, 8, 16)},
        {"feature_dim": 32},
        {"train_clips": 1_000},
        {"steps": 61},
        {"batch_size": 16},
        {"learning_rate": 2e-2},
        {"direction_weight": 0.5},
        {"reference_clips": 200},
        {"seed": 1},
    ],
)
def test_every_training_setting_is_in_the_cache_key(change):
    assert dataclasses.replace(TINY, **change).cache_name() != TINY.cache_name()


def test_gates_are_not_in_the_cache_key():
    assert dataclasses.replace(TINY, min_class_accuracy=0.5).cache_name() == TINY.cache_name()


@pytest.mark.parametrize(
    "suffix", [classifier_cache.PARAMS_SUFFIX, classifier_cache.STATS_SUFFIX, ".json"]
)
def test_corrupt_cache_is_retrained(trained, tmp_path, monkeypatch, caplog, suffix):
    cache_dir, fvd = trained
    shutil.copytree(cache_dir, tmp_path, dirs_exist_ok=True)
    copy = str(tmp_path / TINY.cache_name())
    damaged = pathlib.Path(copy + suffix)
    payload = bytearray(damaged.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one altered byte in the middle of the file
    damaged.write_bytes(bytes(payload))
    with pytest.raises(classifier_cache.CorruptCacheError, match="cache entry"):
        classifier_cache.load_entry(copy, fvd.params)

    calls = _count_training(monkeypatch, fvd)
    again = FvdFmnist.load_or_train(cache_dir=str(tmp_path), settings=TINY)
    assert calls == [TINY]
    assert "retraining" in caplog.text
    assert _same_params(again.params, fvd.params)
    classifier_cache.load_entry(copy, fvd.params)  # the entry was rewritten whole


def test_missing_cache_file_is_retrained(trained, tmp_path, monkeypatch):
    cache_dir, fvd = trained
    shutil.copytree(cache_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / (TINY.cache_name() + classifier_cache.STATS_SUFFIX)).unlink()
    calls = _count_training(monkeypatch, fvd)
    FvdFmnist.load_or_train(cache_dir=str(tmp_path), settings=TINY)
    assert calls == [TINY]


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"min_class_accuracy": 1.01}, "garment-class test accuracy, below the required 1.01"),
        ({"min_direction_accuracy": 1.01}, "motion-direction test accuracy, below the required"),
    ],
)
def test_accuracy_gates(trained, tmp_path, monkeypatch, gate, message):
    cache_dir, fvd = trained
    strict = dataclasses.replace(TINY, **gate)
    monkeypatch.setattr(fvd_lib, "train_classifier", lambda source, settings: fvd.params)
    with pytest.raises(RuntimeError, match=message):  # a cached classifier is gated too
        FvdFmnist.load_or_train(cache_dir=cache_dir, settings=strict)
    with pytest.raises(RuntimeError, match=message):  # and a fresh one is not cached
        FvdFmnist.load_or_train(cache_dir=str(tmp_path), settings=strict)
    assert os.listdir(tmp_path) == []


def test_features_refuse_images_and_wrong_clips(trained):
    _, fvd = trained
    assert fvd.features(np.zeros((3, 8, 32, 32, 1))).shape == (3, TINY.feature_dim)
    with pytest.raises(ValueError, match=r"got images .*use FD-FMNIST"):
        fvd.features(np.zeros((3, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"clips \(N, 8, 32, 32, 1\).*\(3, 4, 32, 32, 1\)"):
        fvd.features(np.zeros((3, 4, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"\(3, 8, 16, 16, 1\)"):
        fvd.distance(np.zeros((3, 8, 16, 16, 1)))


@pytest.mark.slow
def test_full_size_classifier():
    """The default (demo) classifier: both gates and real < shuffled < noise, clearly.

    Trains it into the user cache on first use (minutes), as the demo would.
    """
    fvd = FvdFmnist.load_or_train()
    assert fvd.class_accuracy >= fvd.settings.min_class_accuracy
    assert fvd.direction_accuracy >= fvd.settings.min_direction_accuracy
    scores = fvd.reference_scores()
    assert scores["real"] < 0.2 * scores["shuffled"], scores
    assert scores["shuffled"] < 0.5 * scores["noise"], scores


def test_registry_metric_takes_clips_only(trained):
    _, fvd = trained
    assert features_lib.METRICS["fvd_fmnist"].extractor == "fvd_fmnist"
    assert "fvd_fmnist" in results.COLUMNS
    features_lib.check_metrics_input(("fvd_fmnist",), (8, 32, 32, 1))
    with pytest.raises(ValueError, match=r"fvd_fmnist features take clips .*T=8 .*images .*"):
        features_lib.check_metrics_input(("fvd_fmnist",), (32, 32, 1))
    with pytest.raises(ValueError, match=r"T=8 frames, but the samples have shape \(4, 32"):
        features_lib.check_metrics_input(("fvd_fmnist",), (4, 32, 32, 1))
    with pytest.raises(ValueError, match="take 32x32 images, but the samples are 16x16"):
        features_lib.check_metrics_input(("fvd_fmnist",), (8, 16, 16, 1))
    with pytest.raises(ValueError, match=r"take images .*video metrics are .*fvd_fmnist"):
        features_lib.check_metrics_input(("fd_fmnist",), (8, 32, 32, 1))
    extractor = features_lib.fvd_fmnist_extractor(fvd)
    extractor.check_input((8, 32, 32, 1))
    with pytest.raises(ValueError, match="take clips"):
        extractor.check_input((32, 32, 1))
    clips = fvd.held_out_clips(4)
    np.testing.assert_allclose(
        np.asarray(extractor(clips)["features"]), fvd.features(clips), rtol=1e-5, atol=1e-6
    )


def test_evaluator_config_accepts_the_metric():
    assert config_lib.EvalSettings(metrics=("fvd_fmnist",)).metrics == ("fvd_fmnist",)
    with pytest.raises(ValueError, match="unknown metrics"):
        config_lib.EvalSettings(metrics=("fvd_fmnistx",))


#: A tiny video run on the demo's clips (8 frames at 32x32x1).
VIDEO_RUN = {
    "data.source": "moving_fashion_mnist",
    "data.num_classes": 10,
    "data.frames": 8,
    "data.resolution": 32,
    "model.patch_sizes": (4, 8),
}


def test_evaluator_scores_video_samples(trained, tmp_path):
    """The fvd_fmnist metric through ``Evaluator`` on a tiny video run (random DiT): the
    row's value is the FVD-FMNIST of the saved (uint8-quantised) sample clips."""
    _, fvd = trained
    setup = setup_lib.build(train_utils.tiny_settings(VIDEO_RUN))
    params = setup_lib.initial_state(setup, jax.random.key(0)).params
    declared = config_lib.EvalSettings(metrics=("fvd_fmnist",), num_samples=16, batch_size=8)
    scorer = evaluators.Evaluator(setup, declared, eval_dir=str(tmp_path), fvd_fmnist=fvd)
    row = scorer.evaluate_point(scorer.points[0], params, 0, save_npz=True, progress_bar=False)
    (path,) = glob.glob(str(tmp_path / "samples_step0_*.npz"))
    with np.load(path) as data:
        samples = data["arr_0"].astype(np.float32) / 127.5 - 1.0
    assert samples.shape == (16, 8, 32, 32, 1)
    assert float(row["fvd_fmnist"]) == pytest.approx(fvd.distance(samples), rel=1e-4)


def test_video_demo_report(trained, tmp_path, capsys):
    """``--demo_report`` on a video run: the samples' FVD-FMNIST next to real, shuffled and
    noise clips."""
    _, fvd = trained
    settings = train_utils.tiny_settings(VIDEO_RUN)
    random_checkpoint(settings, str(tmp_path), steps=(1,))
    report = demo_report(settings, str(tmp_path), num_samples=16, batch_size=8, fd=fvd)
    assert report["metric"] == "fvd_fmnist" and report["step"] == 1
    # 16 clips and the tiny classifier: only noise is reliably far (the full-size
    # ordering real << shuffled << noise is test_full_size_classifier's).
    assert max(report["real_clips"], report["shuffled_frames"]) < report["noise"]
    assert np.isfinite(report["model"]) and report["test_accuracy"] == fvd.class_accuracy
    printed = capsys.readouterr().out
    assert "FVD-FMNIST, 16 clips each" in printed and "frames shuffled in time" in printed


def test_loader_refuses_image_runs():
    with pytest.raises(ValueError, match=r"takes clips, but this run's data are images"):
        evaluators.load_fvd_fmnist(train_utils.tiny_settings().data)

"""Evaluation paths no other test drives: eval CLI flags, cross-process gathering, the
FD-FMNIST classifier's training, cache and accuracy gate.

The CLI is driven in process (``dfm_jax.eval.main`` after absl parses the flags), on the
tiny 32x32 checkpoint of ``test_eval`` with a small FD-FMNIST classifier put in place of
the cached one (no real cache, ``~/.cache/dfm_jax``, is read or written: ``DFM_JAX_CACHE``
points at a temporary directory for the whole module).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import itertools
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils
from absl import flags
from jax.experimental import multihost_utils
from test_eval import TINY32, fake_inception, random_checkpoint

from dfm_jax import data
from dfm_jax.data.fashion_mnist import FashionMnistSource
from dfm_jax.evaluation import demo, evaluators, metrics
from dfm_jax.evaluation import fd_fmnist as fd_lib
from dfm_jax.evaluation import results as results_lib
from dfm_jax.evaluation import runner as runner_lib
from dfm_jax.evaluation.fd_fmnist import FdFmnist, TrainingSettings
from dfm_jax.evaluation.features import METRICS
from dfm_jax.evaluation.point import class_balanced_labels
from dfm_jax.evaluation.scores import InceptionScoreStream, allgather_rows
from dfm_jax.training import setup as setup_lib


@pytest.fixture(scope="module", autouse=True)
def _compile_cache_and_tmp_user_cache(tmp_path_factory):
    """The session's compile cache; ``DFM_JAX_CACHE`` in a temporary directory."""
    previous = os.environ.get("DFM_JAX_CACHE")
    os.environ["DFM_JAX_CACHE"] = str(tmp_path_factory.mktemp("user_cache"))
    try:
        with train_utils.persistent_compile_cache():
            yield
    finally:
        if previous is None:
            del os.environ["DFM_JAX_CACHE"]
        else:
            os.environ["DFM_JAX_CACHE"] = previous


# --------------------------------------------------------------------------- #
# The eval CLI in process
# --------------------------------------------------------------------------- #

eval_cli = None  # dfm_jax.eval while this module's tests run (``_eval_cli_imported``)


@pytest.fixture(scope="module", autouse=True)
def _eval_cli_imported():
    """Imports ``dfm_jax.eval`` for this module only: its absl flags (``--config``,
    ``--batch_size``, ...) are removed afterwards, since the other CLIs (``prepare``)
    define the same names and a later test imports them into this process."""
    global eval_cli
    eval_cli = importlib.import_module("dfm_jax.eval")
    try:
        yield
    finally:
        for flag in flags.FLAGS.get_flags_for_module(eval_cli.__name__):
            if flag.name in flags.FLAGS:
                delattr(flags.FLAGS, flag.name)
        sys.modules.pop(eval_cli.__name__, None)
        eval_cli = None


def run_cli(*argv: str, overrides: dict | None = None) -> None:
    """``python -m dfm_jax.eval --config=configs/demo.py <tiny overrides> *argv``, in process."""
    flag_values = flags.FLAGS
    flag_values.unparse_flags()
    args = [
        "eval",
        f"--config={train_utils.DEMO_CONFIG}",
        *train_utils.cli_flags({**TINY32, **(overrides or {})}),
        *argv,
    ]
    saved_argv, sys.argv = sys.argv, args  # ml_collections reads config overrides there
    try:
        eval_cli.main(flag_values(args))
    finally:
        sys.argv = saved_argv
        flag_values.unparse_flags()
        for name in [n for n in flag_values if n.startswith("config.")]:
            delattr(flag_values, name)  # the overrides' flags, defined again by each parse


@pytest.fixture(scope="module")
def small_fd():
    """A small untrained FD-FMNIST classifier with reference statistics of 200 tiny images."""
    config = train_utils.tiny_settings(TINY32)
    settings = TrainingSettings(channels=(4,), feature_dim=6)
    params = settings.model().init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
    source = setup_lib.build(config).source
    images = np.stack([source[i]["image"] for i in range(200, 400)])
    reference = metrics.RunningStatistics(6).update(settings.model().apply(params, images)[1])
    return FdFmnist(settings, params, 0.5, reference)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``(config, workdir)``: a workdir holding checkpoints of steps 1 and 2."""
    config = train_utils.tiny_settings(TINY32)
    workdir = str(tmp_path_factory.mktemp("cli_run"))
    random_checkpoint(config, workdir)
    return config, workdir


@pytest.fixture
def fd_loads(monkeypatch, small_fd):
    """Puts ``small_fd`` in place of the cached classifier; returns the cache dirs asked for."""
    asked = []

    def load(data_settings, cache_dir=None):
        asked.append(cache_dir)
        return small_fd

    monkeypatch.setattr(evaluators, "load_fd_fmnist", load)
    monkeypatch.setattr(demo, "load_fd_fmnist", load)
    return asked


def _read_csv(workdir):
    with open(os.path.join(workdir, "eval", "results.csv")) as f:
        return list(csv.DictReader(f))


def _samples(workdir, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the saved ``samples_*_seed<seed>_n16.npz`` of ``workdir``."""
    eval_dir = os.path.join(workdir, "eval")
    (name,) = [n for n in os.listdir(eval_dir) if n.endswith(f"_seed{seed}_n16.npz")]
    with np.load(os.path.join(eval_dir, name)) as npz:
        return npz["arr_0"], npz["arr_1"]


def _same_checkpoints(source_workdir, workdir) -> str:
    os.makedirs(workdir)
    os.symlink(os.path.join(source_workdir, "checkpoints"), os.path.join(workdir, "checkpoints"))
    return str(workdir)


SWEEP_FLAGS = ("--metrics=fd_fmnist", "--num_samples=16", "--batch_size=8", "--save_npz")


def test_cli_seed_sets_labels_noise_and_row(cli_run, fd_loads, tmp_path):
    """``--seed``: the labels are ``class_balanced_labels(seed)``, another seed gives other
    samples and another row (seed column), the same seed repeats the samples bit for bit."""
    config, workdir = cli_run
    run_cli(f"--workdir={workdir}", "--seed=5", *SWEEP_FLAGS)
    images5, labels5 = _samples(workdir, 5)
    run_cli(f"--workdir={workdir}", "--seed=6", *SWEEP_FLAGS)
    images6, labels6 = _samples(workdir, 6)  # its own file: seed 5's is kept
    np.testing.assert_array_equal(_samples(workdir, 5)[0], images5)
    np.testing.assert_array_equal(labels5, class_balanced_labels(16, 4, 5))
    np.testing.assert_array_equal(labels6, class_balanced_labels(16, 4, 6))
    assert not np.array_equal(images5, images6)
    rows = [r for r in _read_csv(workdir) if r["metrics"] == "fd_fmnist"]
    assert [(r["seed"], r["num_samples"], r["step"]) for r in rows] == [
        ("5", "16", "2"),
        ("6", "16", "2"),
    ]
    assert rows[0]["fd_fmnist"] != rows[1]["fd_fmnist"]

    again = _same_checkpoints(workdir, tmp_path / "again")
    run_cli(f"--workdir={again}", "--seed=5", *SWEEP_FLAGS)
    images, labels = _samples(again, 5)
    np.testing.assert_array_equal(images, images5)
    np.testing.assert_array_equal(labels, labels5)
    (row,) = _read_csv(again)
    assert row["seed"] == "5" and row["fd_fmnist"] == rows[0]["fd_fmnist"]
    assert config.seed not in (5, 6)  # the flag, not the config, chose them
    assert fd_loads == [None] * 3  # no --fd_fmnist_cache: the default cache directory


def test_cli_demo_report_prints_and_records(cli_run, fd_loads, tmp_path, capsys):
    """``--demo_report``: prints the FD-FMNIST report, records the model's row with the
    flags' sample count and seed, and loads the classifier from ``--fd_fmnist_cache``."""
    _, source_workdir = cli_run
    workdir = _same_checkpoints(source_workdir, tmp_path / "demo")
    cache = str(tmp_path / "fd_cache")
    run_cli(
        f"--workdir={workdir}",
        "--demo_report",
        "--num_samples=16",
        "--batch_size=8",
        "--seed=7",
        "--step=1",
        f"--fd_fmnist_cache={cache}",
    )
    printed = capsys.readouterr().out
    assert "FD-FMNIST, 16 images each" in printed
    assert "model samples (step 1;" in printed and "Gaussian noise" in printed
    assert fd_loads == [cache]
    (row,) = _read_csv(workdir)
    assert (row["metrics"], row["num_samples"], row["seed"], row["step"]) == (
        "fd_fmnist",
        "16",
        "7",
        "1",
    )
    model_line = next(line for line in printed.splitlines() if "model samples" in line)
    assert float(model_line.split()[-1]) == pytest.approx(float(row["fd_fmnist"]), abs=1e-3)


def test_cli_init_key_selects_the_state_dict(cli_run, fd_loads, monkeypatch, tmp_path):
    """``--init_key``: the imported checkpoint's ``model`` or ``ema`` state dict (default
    ema) is what the sweep evaluates, and the row's init column names it."""
    config, _ = cli_run
    imported, evaluated = [], []

    def import_params(setup, path, which):
        imported.append((path, which))
        return {"params of": (path, which)}

    def fake_run_points(scorer, params, step, points, rows, o):
        for p in points:
            evaluated.append(params)
            row = {**scorer.key_columns(step), **p.columns(), "nfe": p.nfe, "fd_fmnist": 1.0}
            rows.append({c: results_lib.format_value(c, v) for c, v in row.items()})
        results_lib.write_results(scorer.context.eval_dir, rows)

    monkeypatch.setattr(runner_lib, "import_params", import_params)
    monkeypatch.setattr(runner_lib, "_run_points", fake_run_points)
    checkpoint_file = tmp_path / "dfm_sit.pt"
    checkpoint_file.write_bytes(b"")
    workdir = str(tmp_path / "results_only")  # no checkpoints: only --init can be evaluated
    common = (f"--workdir={workdir}", f"--init={checkpoint_file}", "--step=3", *SWEEP_FLAGS[:3])
    run_cli(*common, "--init_key=model")
    run_cli(*common)
    run_cli(*common, "--init_key=ema")  # the default's row: resumed, nothing evaluated
    assert imported == [(str(checkpoint_file), "model"), (str(checkpoint_file), "ema")]
    assert evaluated == [{"params of": p} for p in imported]
    rows = _read_csv(workdir)
    assert [(r["init"], r["step"]) for r in rows] == [
        (f"{checkpoint_file}:model", "3"),
        (f"{checkpoint_file}:ema", "3"),
    ]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    assert config.seed == int(rows[0]["seed"])


#: Fashion-MNIST itself (its train and test splits differ; the synthetic data has none).
FMNIST = {"data.source": "fashion_mnist", "data.num_classes": 10}


def _fmnist_reference_mean(split: str, seed: int) -> np.ndarray:
    """Mean fake-Inception pool3 of the first 16 images of ``split`` in the reference's
    seeded pipeline order (batch 8), computed here from the source."""
    source = FashionMnistSource(None, split=split, resolution=32)
    dataset = data.make_dataset(
        source, global_batch_size=8, seed=seed, num_epochs=1, shuffle=True, drop_remainder=False
    )
    images = np.concatenate([b["image"] for b in itertools.islice(iter(dataset), 2)])
    pixels = jnp.asarray(np.round((images + 1) * 127.5) / 127.5 - 1, jnp.float32)
    return np.asarray(fake_inception(32 * 32)(pixels)["pool3"], np.float64).mean(0)


def test_cli_compute_reference_and_split(monkeypatch, tmp_path):
    """``--compute_reference=OUT`` writes OUT (no workdir needed) with the statistics of
    ``--num_samples`` images of ``--reference_split`` (default: the config's, train)."""
    built = []

    def build_extractors(names, **weights):
        built.append((tuple(names), weights["inception_weights"]))
        return {"inception": fake_inception(32 * 32)}

    monkeypatch.setattr(evaluators, "build_extractors", build_extractors)
    weights = tmp_path / "pt_inception.pth"  # only checked to exist: the extractor is faked
    weights.write_bytes(b"")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    common = ("--metrics=fid", "--num_samples=16", f"--inception_weights={weights}")
    test_flags = (f"--compute_reference={out_dir / 'test.npz'}", "--reference_split=test")
    run_cli(*test_flags, *common, overrides=FMNIST)
    run_cli(f"--compute_reference={out_dir / 'train.npz'}", *common, overrides=FMNIST)
    assert sorted(os.listdir(out_dir)) == ["test.npz", "train.npz"]
    assert built == [(("fid",), str(weights))] * 2
    seed = train_utils.tiny_settings().seed
    for split in ("test", "train"):
        with np.load(out_dir / f"{split}.npz") as npz:
            assert sorted(npz.files) == ["mu", "num_samples", "sigma"]
            assert int(npz["num_samples"]) == 16
            np.testing.assert_allclose(
                npz["mu"], _fmnist_reference_mean(split, seed), rtol=1e-5, atol=1e-6
            )
    with np.load(out_dir / "test.npz") as test, np.load(out_dir / "train.npz") as train:
        assert np.abs(test["mu"] - train["mu"]).max() > 1e-3


# --------------------------------------------------------------------------- #
# Gathering across processes (two processes simulated by threads)
# --------------------------------------------------------------------------- #


def two_processes(monkeypatch, function, inputs):
    """``[function(*inputs[0]), function(*inputs[1])]`` run as processes 0 and 1 of two.

    Each runs in its own thread; ``jax.process_count()`` is 2, ``jax.process_index()``
    the thread's, and ``multihost_utils.process_allgather`` exchanges the threads' arrays
    (stacked, or concatenated with ``tiled``) in process order.
    """
    local = threading.local()
    barrier = threading.Barrier(2, timeout=30)
    slots: list = [None, None]

    def allgather(x, tiled=False):
        slots[local.index] = np.asarray(x)
        barrier.wait()
        out = np.concatenate(slots) if tiled else np.stack(slots)
        barrier.wait()  # both have read before the next round writes
        return out

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: local.index)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    results, errors = [None, None], []

    def target(index):
        local.index = index
        try:
            results[index] = function(*inputs[index])
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("split", [3, 0, 5])
def test_allgather_rows_concatenates_uneven_processes(monkeypatch, split):
    """``allgather_rows``: rows of two processes with different (or zero) counts come back
    as their concatenation in process order, the same on both, padding dropped."""
    rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    got = two_processes(monkeypatch, allgather_rows, [(rows[:split],), (rows[split:],)])
    for gathered in got:
        np.testing.assert_array_equal(gathered, rows)


def test_scores_over_two_processes_match_one(monkeypatch):
    """Frechet statistics and the Inception Score of samples split between two processes
    (interleaved ids, uneven counts) equal those of all samples in one process."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(23, 4))
    logits = 3 * rng.normal(size=(23, 5))
    ids = rng.permutation(23)
    shares = [ids[:15], ids[15:]]

    def score(share):
        stats = metrics.RunningStatistics(4).update(features[share])
        total = metrics.gather_across_processes(stats)
        stream = InceptionScoreStream(METRICS["is"], 23, 5, splits=4)
        stream.update(share, logits[share])
        return total, stream.result()

    got = two_processes(monkeypatch, score, [(s,) for s in shares])
    expected_is = metrics.inception_score(logits, splits=4)
    for total, inception in got:
        assert total.count == 23
        np.testing.assert_allclose(total.mean, features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(total.covariance, np.cov(features, rowvar=False), rtol=1e-10)
        np.testing.assert_allclose([inception["is"], inception["is_std"]], expected_is, rtol=1e-10)
    np.testing.assert_array_equal(got[0][0].covariance, got[1][0].covariance)  # bit for bit


# --------------------------------------------------------------------------- #
# The FD-FMNIST classifier: training, cache, accuracy gate
# --------------------------------------------------------------------------- #

TINY_CLASSIFIER = TrainingSettings(channels=(4,), feature_dim=8, epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def fmnist_subset():
    """Per split: the first 512 (train) / 256 (test) Fashion-MNIST images and labels."""
    subset = {}
    for split, count in (("train", 512), ("test", 256)):
        source = FashionMnistSource(None, split=split, resolution=32)
        examples = [source[i] for i in range(count)]
        subset[split] = (
            np.stack([e["image"] for e in examples]),
            np.asarray([e["label"] for e in examples], np.int32),
        )
    return subset


@pytest.fixture
def subset_training(monkeypatch, fmnist_subset):
    """``load_split`` reads ``fmnist_subset``; returns the settings ``train_classifier``
    is called with (training for real)."""
    calls = []
    train = fd_lib.train_classifier

    def counted(images, labels, settings):
        calls.append(settings)
        return train(images, labels, settings)

    monkeypatch.setattr(fd_lib, "load_split", lambda split, data_dir=None: fmnist_subset[split])
    monkeypatch.setattr(fd_lib, "train_classifier", counted)
    return calls


def test_fd_fmnist_trains_caches_and_reloads(subset_training, fmnist_subset, tmp_path, monkeypatch):
    """A fresh cache trains the classifier once (test accuracy and statistics of the test
    subset recorded); the second call loads it without training; another setting misses
    that entry, is trained (a stand-in here) and cached under its own name."""
    monkeypatch.setattr(fd_lib, "MIN_TEST_ACCURACY", 0.0)  # the tiny classifier passes
    cache = str(tmp_path)
    first = FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)
    assert subset_training == [TINY_CLASSIFIER]
    test_images, test_labels = fmnist_subset["test"]
    logits, features = TINY_CLASSIFIER.model().apply(first.params, test_images)
    assert first.test_accuracy == pytest.approx(float((logits.argmax(-1) == test_labels).mean()))
    assert first.test_accuracy > 0.2  # chance is 0.1: it learned something
    assert first.reference.count == 256
    np.testing.assert_allclose(first.reference.mean, np.mean(features, 0), rtol=1e-4, atol=1e-5)
    stem = TINY_CLASSIFIER.cache_name()
    assert sorted(os.listdir(cache)) == sorted(
        [stem + ".json", stem + ".msgpack", stem + "_test_stats.npz"]
    )

    again = FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)
    assert subset_training == [TINY_CLASSIFIER]  # loaded, not trained
    assert again.test_accuracy == first.test_accuracy
    train_utils.assert_trees_equal(again.params, first.params, "params")
    np.testing.assert_array_equal(again.reference.covariance, first.reference.covariance)
    assert again.distance(test_images[:32]) == pytest.approx(first.distance(test_images[:32]))

    other = dataclasses.replace(TINY_CLASSIFIER, seed=1)
    assert other.cache_name() != stem

    def stand_in(images, labels, settings):  # the same architecture: no need to train
        subset_training.append(settings)
        return first.params

    monkeypatch.setattr(fd_lib, "train_classifier", stand_in)
    FdFmnist.load_or_train(cache_dir=cache, settings=other)
    assert subset_training == [TINY_CLASSIFIER, other]
    assert sorted(n for n in os.listdir(cache) if n.endswith(".json")) == sorted(
        [stem + ".json", other.cache_name() + ".json"]
    )


def test_fd_fmnist_retrains_a_corrupt_entry_and_gates_a_loaded_one(
    subset_training, tmp_path, monkeypatch, caplog
):
    """A cache entry whose parameters no longer match their digest is logged and
    replaced by a retrained one; an entry whose recorded accuracy is below the gate
    raises on load, naming the entry."""
    monkeypatch.setattr(fd_lib, "MIN_TEST_ACCURACY", 0.0)
    cache = str(tmp_path)
    first = FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)
    stem = os.path.join(cache, TINY_CLASSIFIER.cache_name())
    with open(stem + ".msgpack", "r+b") as f:  # flip bytes in the middle of the params
        f.seek(os.path.getsize(stem + ".msgpack") // 2)
        f.write(b"\xff\xfe\xfd\xfc")
    with caplog.at_level("WARNING"):
        again = FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)
    assert subset_training == [TINY_CLASSIFIER] * 2  # retrained
    assert "FD-FMNIST" in caplog.text and "retraining" in caplog.text
    train_utils.assert_trees_equal(again.params, first.params, "params")  # same seed
    FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)  # intact again
    assert len(subset_training) == 2
    monkeypatch.setattr(fd_lib, "MIN_TEST_ACCURACY", first.test_accuracy + 0.01)
    with pytest.raises(RuntimeError, match=r"below the required .*cache entry .*\.json"):
        FdFmnist.load_or_train(cache_dir=cache, settings=TINY_CLASSIFIER)


@pytest.mark.parametrize(
    "change",
    [
        {"channels": (4, 8)},
        {"feature_dim": 16},
        {"epochs": 2},
        {"batch_size": 32},
        {"learning_rate": 1e-3},
        {"seed": 1},
    ],
)
def test_every_fd_fmnist_setting_is_in_the_cache_key(change):
    """Each ``TrainingSettings`` field changes the cache entry's name."""
    assert dataclasses.replace(TINY_CLASSIFIER, **change).cache_name() != (
        TINY_CLASSIFIER.cache_name()
    )


def test_fd_fmnist_gate_refuses_a_weak_classifier(monkeypatch, fmnist_subset, tmp_path):
    """A classifier below ``MIN_TEST_ACCURACY`` (0.90; here untrained parameters, about
    chance) raises with the accuracy and the threshold, and nothing is cached."""
    untrained = TINY_CLASSIFIER.model().init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    monkeypatch.setattr(fd_lib, "load_split", lambda split, data_dir=None: fmnist_subset[split])
    monkeypatch.setattr(fd_lib, "train_classifier", lambda images, labels, settings: untrained)
    assert fd_lib.MIN_TEST_ACCURACY == 0.90
    with pytest.raises(
        RuntimeError, match=r"reached 0\.\d{4} test accuracy, below the required 0.9"
    ):
        FdFmnist.load_or_train(cache_dir=str(tmp_path), settings=TINY_CLASSIFIER)
    assert os.listdir(tmp_path) == []

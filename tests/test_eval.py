"""Tests of dfm_jax.eval / dfm_jax.evaluation: sweeps, labels, scores, files, whole runs.

The end-to-end runs evaluate an initial-state checkpoint of the tiny trainer config
(``train_utils.tiny_config``) saved in a temporary workdir. The FID/IS/PR network is
a small stand-in ``FeatureExtractor`` (a fixed random projection) and the FDD
network a one-block DINOv2 at 28 px: real Inception (299 px) and ViT-L (224 px)
would take minutes on a CPU, but everything around them -- jit on the mesh,
batch sharding, local rows, streaming scores, references, results -- is the code
the real networks run through.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.evaluation import metrics
from dfm_jax.evaluation import results as results_lib
from dfm_jax.evaluation import runner as runner_lib
from dfm_jax.evaluation.demo import demo_report
from dfm_jax.evaluation.fd_fmnist import FdFmnist, TrainingSettings
from dfm_jax.evaluation.features import (
    METRICS,
    FeatureExtractor,
    dinov2_extractor,
    fd_fmnist_extractor,
)
from dfm_jax.evaluation.point import class_balanced_labels
from dfm_jax.evaluation.references import compute_reference
from dfm_jax.evaluation.scores import IDS_KEY, InceptionScoreStream, local_rows
from dfm_jax.evaluation.sweep import parse_metrics, parse_sweep
from dfm_jax.method import generation as generate_lib
from dfm_jax.method import sampling
from dfm_jax.models.dinov2 import DINOv2, DINOv2Config
from dfm_jax.training import checkpoint
from dfm_jax.training import setup as setup_lib


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


# --------------------------------------------------------------------------- #
# Sweep and metric specs
# --------------------------------------------------------------------------- #


def _sampling(steps=(30, 10), thresholds=(0.9,)):
    return config_lib.SamplingSettings(steps_per_stage=steps, thresholds=thresholds)


_EVAL_FIELDS = {field.name for field in dataclasses.fields(config_lib.EvalSettings)}


def run_sweep(settings, workdir, **keywords):
    """``runner.run_sweep`` with the ``EvalSettings`` fields given as keywords too."""
    fields = {k: v for k, v in keywords.items() if k in _EVAL_FIELDS}
    if isinstance(fields.get("metrics"), str):
        fields["metrics"] = tuple(fields["metrics"].split(","))
    options = {k: v for k, v in keywords.items() if k not in _EVAL_FIELDS}
    return runner_lib.run_sweep(settings, workdir, config_lib.EvalSettings(**fields), **options)


def test_parse_sweep_product_and_canonical_columns():
    points = parse_sweep(
        "cfg=1.0,1.25,1.5; tau=0.7,0.9 ;steps=30+10,20+20;solver=euler,heun", _sampling(), 2
    )
    assert len(points) == 3 * 2 * 2 * 2
    first, last = points[0].columns(), points[-1].columns()
    assert first == {
        "cfg": "1.0",
        "tau": "0.7",
        "steps": "30+10",
        "solver": "euler",
        "interval": "0.0-1.0",
    }
    assert last == {
        "cfg": "1.5",
        "tau": "0.9",
        "steps": "20+20",
        "solver": "heun",
        "interval": "0.0-1.0",
    }
    assert points[1].solver == "heun" and points[1].cfg_scale == 1.0  # last key varies fastest
    assert points[0].steps_per_stage == (30, 10) and points[0].thresholds == (0.7,)
    assert points[0].nfe == 40 and points[-2].nfe == 80  # guidance doubles the evaluations
    last = points[-1]  # a point is the sampler's own settings
    assert isinstance(last, sampling.SamplerSettings) and last.steps_per_stage == (20, 20)
    assert last.solver == "heun" and last.cfg_scale == 1.5 and last.thresholds == (0.9,)


def test_parse_sweep_defaults_three_scales_and_flow_matching():
    (point,) = parse_sweep("", _sampling(), 2)
    assert point.columns()["steps"] == "30+10" and point.columns()["tau"] == "0.9"
    three = parse_sweep("tau=0.7/0.9,0.5/0.8;steps=10+10+5;interval=0.1-0.9", _sampling(), 3)
    assert [p.thresholds for p in three] == [(0.7, 0.9), (0.5, 0.8)]
    assert three[0].guidance_interval == (0.1, 0.9) and three[0].columns()["tau"] == "0.7/0.9"
    fm = parse_sweep("steps=40,20;cfg=1.5", _sampling((40,), ()), 1)
    assert [p.steps_per_stage for p in fm] == [(40,), (20,)]
    assert fm[0].columns()["tau"] == "" and "tau" not in fm[0].name


@pytest.mark.parametrize(
    "spec, scales, message",
    [
        ("foo=1", 2, "unknown sweep key 'foo'"),
        ("cfg=1.0;cfg=2.0", 2, "given twice"),
        ("cfg", 2, "not key=value"),
        ("cfg=abc", 2, "'abc' is not a number"),
        ("cfg=1.0,,2.0", 2, "empty entry"),
        ("cfg=nan", 2, "not finite"),
        ("cfg=1.0,1.0", 2, "repeats a value"),
        ("steps=30", 2, "has 1 stage.* 2 scale"),
        ("steps=30+x", 2, "'x' is not an integer"),
        ("steps=30+0", 2, "at least one step"),
        ("tau=0.9", 3, "has 1 threshold.* need 2"),
        ("tau=0.9/0.0;steps=5+5+5", 3, "thresholds\\[1\\] = 0.0 must lie"),
        ("tau=1.5", 2, "inside \\(0, 1\\)"),
        ("tau=0.9;steps=40", 1, "Flow Matching"),
        ("solver=rk4", 2, "solver must be one of"),
        ("interval=0.5", 2, "must be 'low-high'"),
        ("interval=0.9-0.1", 2, "low <= high"),
    ],
)
def test_parse_sweep_rejects(spec, scales, message):
    sampling_config = _sampling((10,) * scales, (0.5, 0.9)[: scales - 1])
    with pytest.raises(ValueError, match=message):
        parse_sweep(spec, sampling_config, scales)


def test_parse_metrics():
    assert parse_metrics("is, fid,fdd,fid") == ("fid", "fdd", "is")
    assert parse_metrics(["fd_fmnist"]) == ("fd_fmnist",)
    with pytest.raises(ValueError, match="unknown metrics \\['kid'\\]"):
        parse_metrics("fid,kid")
    with pytest.raises(ValueError, match="no metrics"):
        parse_metrics(" , ")


# --------------------------------------------------------------------------- #
# Labels, scores, files
# --------------------------------------------------------------------------- #


def test_class_balanced_labels():
    labels = class_balanced_labels(103, 10, seed=3)
    assert labels.dtype == np.int32 and labels.shape == (103,)
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 103 and set(counts) == {10, 11} and (counts == 11).sum() == 3
    np.testing.assert_array_equal(labels, class_balanced_labels(103, 10, seed=3))
    assert not np.array_equal(labels, class_balanced_labels(103, 10, seed=4))
    assert not np.all(np.diff(labels) >= 0)  # shuffled: IS splits see every class
    first_tenth = labels[:10]
    assert len(set(first_tenth)) > 3
    np.testing.assert_array_equal(np.bincount(class_balanced_labels(40, 4, 0)), [10] * 4)


def test_inception_score_stream_matches_batch_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(103, 7)) * 3
    stream = InceptionScoreStream(METRICS["is"], 103, 7, splits=5)
    order = rng.permutation(103)
    for chunk in np.array_split(order, 6):  # any order and chunking
        stream.update(chunk, logits[chunk])
    result = stream.result()
    mean, std = metrics.inception_score(logits, splits=5)
    np.testing.assert_allclose([result["is"], result["is_std"]], [mean, std], rtol=1e-12)


def test_local_rows_takes_each_row_once_and_drops_padding():
    mesh = parallel.create_mesh({"data": 4, "model": 2})  # rows replicated over "model"
    sharding = parallel.batch_sharding(mesh, parallel.BATCH_AXES)
    ids = np.asarray([0, 1, 2, 3, 4, 5, -1, -1], np.int32)
    features = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    outputs = {
        IDS_KEY: parallel.global_from_host(ids, sharding),
        "x": parallel.global_from_host(features, sharding),
    }
    row_ids, blocks = local_rows(outputs)
    order = np.argsort(row_ids)
    np.testing.assert_array_equal(row_ids[order], np.arange(6))
    np.testing.assert_array_equal(blocks["x"][order], features[:6])


def test_adm_npz_writer(tmp_path):
    labels = np.arange(7) % 3
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    writer = results_lib.AdmNpzWriter(tmp_path / "s.npz", (5, 4, 3), labels)
    writer.write(images[:4])
    writer.write(images[4:])
    writer.close()
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels)
    aborted = results_lib.AdmNpzWriter(tmp_path / "t.npz", (5, 4, 3), labels)
    aborted.write(images[:2])
    with pytest.raises(ValueError, match="wrote 2 of 7"):
        aborted.close()
    aborted.abort()
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


# --------------------------------------------------------------------------- #
# Whole runs on a tiny checkpoint
# --------------------------------------------------------------------------- #


def _projection_apply(params, images):
    x = images.reshape(images.shape[0], -1)
    return {"pool3": jnp.tanh(x @ params["w"]), "logits_unbiased": 4.0 * (x @ params["v"])}


def fake_inception(pixels: int, dim: int = 12, classes: int = 6) -> FeatureExtractor:
    """A stand-in for InceptionV3 with its two outputs: fixed random projections."""
    kw, kv = jax.random.split(jax.random.key(42))
    params = {
        "w": jax.random.normal(kw, (pixels, dim)) / np.sqrt(pixels),
        "v": jax.random.normal(kv, (pixels, classes)) / np.sqrt(pixels),
    }
    return FeatureExtractor(
        "inception", {"pool3": dim, "logits_unbiased": classes}, _projection_apply, params
    )


def tiny_dinov2() -> FeatureExtractor:
    """A one-block DINOv2 (width 32) at 28 px with random weights: the real FDD code path."""
    module = DINOv2(DINOv2Config(width=32, depth=1, num_heads=2, pos_grid=2))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    rng = np.random.default_rng(7)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    return dinov2_extractor(module=module, params=params, resolution=28)


#: The tiny trainer config at 32x32x1 (the FD-FMNIST input size), 4x4 token grids.
TINY32 = {"data.resolution": 32, "model.patch_sizes": (4, 8)}


def random_checkpoint(config, workdir: str, steps=(1, 2)) -> None:
    """Checkpoints of a train state with random parameters (0.05 N(0, 1)) at ``steps``.

    Saved from host arrays (Orbax restores them into the run's shardings); random
    rather than initial parameters, so that samples depend on the model and on the
    guidance scale (the DiT's output layers start at zero).
    """
    setup = setup_lib.build(config)
    rng = np.random.default_rng(0)

    def leaf(abstract):
        if jnp.issubdtype(abstract.dtype, jnp.floating):
            return (0.05 * rng.normal(size=abstract.shape)).astype(abstract.dtype)
        return np.zeros(abstract.shape, abstract.dtype)

    state = jax.tree.map(leaf, setup.abstract_state)
    manager = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    for step in steps:
        manager.save(step, state)
    manager.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The config, a workdir with checkpoints of steps 1 and 2, and stand-in extractors."""
    config = train_utils.tiny_settings(TINY32)
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    random_checkpoint(config, workdir)
    extractors = {"inception": fake_inception(32 * 32), "dinov2": tiny_dinov2()}
    return config, workdir, extractors


class GenerateCounter:
    """Counts ``generation.make_generate_fn`` calls (one per evaluated sweep point)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = generate_lib.make_generate_fn

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(generate_lib, "make_generate_fn", counted)


def _reference_file(path, rng):
    """Reference statistics: FID/FDD from random features; ADM-style arr_0 images for PR."""
    fid_features = np.tanh(rng.normal(size=(64, 12)))
    fdd_features = rng.normal(size=(80, 32))
    np.savez(
        path,
        mu=fid_features.mean(0),
        sigma=np.cov(fid_features, rowvar=False),
        fdd_mu=fdd_features.mean(0),
        fdd_sigma=np.cov(fdd_features, rowvar=False),
        arr_0=rng.integers(0, 256, (20, 32, 32, 1), dtype=np.uint8),
    )


def _read_csv(workdir):
    with open(os.path.join(workdir, "eval", "results.csv")) as f:
        return list(csv.DictReader(f))


def test_restore_ema_params_reads_only_the_ema_fields(tiny):
    config, workdir, _ = tiny
    setup = setup_lib.build(config)
    ema = runner_lib.restore_ema_params(setup, workdir, 2)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    full, _ = checkpointer.restore(setup.abstract_state, step=2)
    checkpointer.close()
    for got, want, abstract in zip(
        jax.tree.leaves(ema),
        jax.tree.leaves(full.ema_params),
        jax.tree.leaves(setup.abstract_state.ema_params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == abstract.sharding


def _assert_metrics_of(row: dict, images: np.ndarray, extractors, reference: str) -> None:
    """FID, IS, FDD, precision and recall of ``row`` recomputed from its uint8 samples."""
    outputs = extractors["inception"](jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
    pool3, logits = np.asarray(outputs["pool3"]), np.asarray(outputs["logits_unbiased"])
    mu, sigma = metrics.load_reference_statistics(reference)
    expected_fid = metrics.frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), mu, sigma)
    np.testing.assert_allclose(float(row["fid"]), expected_fid, rtol=1e-4)
    expected_is = metrics.inception_score(logits, splits=2)[0]
    np.testing.assert_allclose(float(row["is"]), expected_is, rtol=1e-4)
    with np.load(reference) as npz:
        fdd_mu, fdd_sigma, reference_images = npz["fdd_mu"], npz["fdd_sigma"], npz["arr_0"]
    fdd = np.asarray(extractors["dinov2"](jnp.asarray(images, jnp.float32) / 127.5 - 1)["features"])
    expected_fdd = metrics.frechet_distance(
        fdd.mean(0), np.cov(fdd, rowvar=False), fdd_mu, fdd_sigma
    )
    np.testing.assert_allclose(float(row["fdd"]), expected_fdd, rtol=1e-4)
    real = extractors["inception"](jnp.asarray(reference_images, jnp.float32) / 127.5 - 1)["pool3"]
    expected_pr = metrics.precision_recall(np.asarray(real), pool3)
    np.testing.assert_allclose(
        [float(row["precision"]), float(row["recall"])], expected_pr, atol=1e-6
    )


def test_sweep_end_to_end_then_resume(tiny, tmp_path, monkeypatch, capsys):
    config, workdir, extractors = tiny
    reference = str(tmp_path / "ref.npz")
    _reference_file(reference, np.random.default_rng(0))
    counter = GenerateCounter(monkeypatch)
    run = functools.partial(
        run_sweep,
        config,
        workdir,
        metrics="fid,fdd,is,pr",
        num_samples=20,
        batch_size=8,
        reference=reference,
        extractors=extractors,
        is_splits=2,
    )
    rows = run(sweep="cfg=1.0,2.0", save_npz=True, save_png=6)
    assert counter.calls == 2
    assert [r["cfg"] for r in rows] == ["1.0", "2.0"]
    csv_rows = _read_csv(workdir)
    assert [
        {k: r[k] for k in ("step", "num_samples", "cfg", "tau", "steps", "nfe")} for r in csv_rows
    ] == [
        {"step": "2", "num_samples": "20", "cfg": "1.0", "tau": "0.9", "steps": "2+2", "nfe": "4"},
        {"step": "2", "num_samples": "20", "cfg": "2.0", "tau": "0.9", "steps": "2+2", "nfe": "8"},
    ]
    for row in csv_rows:
        assert row["metrics"] == "fid+fdd+is+pr" and row["fd_fmnist"] == ""
        for column in ("fid", "fdd", "is", "is_std", "precision", "recall", "gen_images_per_s"):
            assert np.isfinite(float(row[column])), column
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        markdown = f.read()
    assert "| step | samples | cfg | tau |" in markdown and markdown.count("\n| 2 | 20 |") == 2
    assert "| FID | FDD | IS | IS std | precision | recall |" in markdown
    assert "| step | samples |" in capsys.readouterr().out  # the summary table
    eval_files = os.listdir(os.path.join(workdir, "eval"))
    assert any(name.startswith("events.out.tfevents") for name in eval_files)  # TensorBoard

    # The ADM file holds exactly the evaluated samples: recompute the metrics from it.
    point = parse_sweep("cfg=2.0", config.sampling, 2)[0]
    npz_path = os.path.join(workdir, "eval", f"samples_step2_{point.name}_n20.npz")
    with np.load(npz_path) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 1)
    np.testing.assert_array_equal(labels, class_balanced_labels(20, 4, config.seed))
    assert os.path.exists(os.path.join(workdir, "eval", f"samples_step2_{point.name}.png"))
    _assert_metrics_of(csv_rows[1], images, extractors, reference)
    # The two guidance scales share the noise but give different samples.
    assert csv_rows[0]["fid"] != csv_rows[1]["fid"]

    # Resume: the recorded points are skipped, the new one is appended.
    rows = run(sweep="cfg=1.0,2.0,3.0")
    assert counter.calls == 3 and [r["cfg"] for r in rows] == ["1.0", "2.0", "3.0"]
    assert len(_read_csv(workdir)) == 3 and _read_csv(workdir)[:2] == csv_rows
    run(sweep="cfg=3.0,2.0")
    assert counter.calls == 3
    # Another step (or sample count, metric set, seed) is a different row. Step 1 holds
    # the same parameters as step 2; the decode hook sees every generated batch.
    run(sweep="cfg=2.0", step=1, metrics="is", decode=lambda x: -x, save_npz=True)
    assert counter.calls == 4
    assert [r["step"] for r in _read_csv(workdir)] == ["2", "2", "2", "1"]
    with np.load(npz_path.replace("step2", "step1")) as npz:
        negated = npz["arr_0"].astype(np.int32)
    assert np.abs(negated - (255 - images.astype(np.int32))).max() <= 1


def test_resume_key_changes_with_each_identity_column(tiny, tmp_path, monkeypatch):
    """A row is skipped only when step, init, sample count, seed, metrics and point match.

    The points are "evaluated" by a stand-in that writes the rows the real evaluator
    would key (``Evaluator.key_columns`` + the point's columns), so every run is cheap and
    what is tested is the identity ``run_sweep`` resumes by.
    """
    config, source_workdir, extractors = tiny
    workdir = str(tmp_path / "run")  # its own results.csv, the checkpoints of ``tiny``
    os.makedirs(workdir)
    os.symlink(os.path.join(source_workdir, "checkpoints"), os.path.join(workdir, "checkpoints"))
    evaluated = []

    def fake_run_points(scorer, params, step, points, rows, o):
        for p in points:
            evaluated.append(p.name)
            row = {**scorer.key_columns(step), **p.columns(), "nfe": p.nfe, "is": 1.5}
            rows.append({c: results_lib.format_value(c, v) for c, v in row.items()})
        results_lib.write_results(scorer.context.eval_dir, rows)

    monkeypatch.setattr(runner_lib, "_run_points", fake_run_points)
    monkeypatch.setattr(runner_lib, "import_params", lambda setup, path, which: (path, which))
    first_pt, second_pt = tmp_path / "a.pt", tmp_path / "b.pt"
    first_pt.write_bytes(b"")
    second_pt.write_bytes(b"")
    base = dict(metrics="is", num_samples=20, batch_size=8, extractors=extractors, sweep="cfg=2.0")

    def run(**changes):
        before = len(evaluated)
        run_sweep(config, workdir, **{**base, **changes})
        return len(evaluated) - before

    assert run() == 1 and run() == 0  # evaluated, then resumed
    assert run(num_samples=24) == 1 and run(num_samples=24) == 0
    assert run(seed=5) == 1 and run(seed=5) == 0
    assert run(step=1) == 1 and run(step=1) == 0
    # Imported checkpoints: another file, or the other state dict of the same file, is
    # another row; neither is the workdir's checkpoint of the same step.
    assert run(init=str(first_pt), step=2) == 1 and run(init=str(first_pt), step=2) == 0
    assert run(init=str(second_pt), step=2) == 1
    assert run(init=str(first_pt), init_key="model", step=2) == 1
    assert run(init=str(first_pt), init_key="model", step=2) == 0
    rows = _read_csv(workdir)
    assert [r["init"] for r in rows] == [""] * 4 + [
        f"{first_pt}:ema",
        f"{second_pt}:ema",
        f"{first_pt}:model",
    ]
    assert [(r["num_samples"], r["seed"], r["step"]) for r in rows[:4]] == [
        ("20", str(config.seed), "2"),
        ("24", str(config.seed), "2"),
        ("20", "5", "2"),
        ("20", str(config.seed), "1"),
    ]
    # A results.csv from before the init column: its rows read as init "" and still resume.
    old_columns = [c for c in results_lib.COLUMNS if c != "init"]
    with open(os.path.join(workdir, "eval", "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[:4])
    assert run() == 0 and run(init=str(first_pt), step=2) == 1


def test_missing_inputs_fail_before_generation(tiny, tmp_path, monkeypatch):
    config, workdir, extractors = tiny
    counter = GenerateCounter(monkeypatch)
    reference = str(tmp_path / "ref.npz")
    _reference_file(reference, np.random.default_rng(1))
    with pytest.raises(
        FileNotFoundError, match=re.escape("--inception_weights=/nonexistent/pt_inc.pth")
    ):
        run_sweep(
            config,
            workdir,
            metrics="fid,is",
            reference=reference,
            inception_weights="/nonexistent/pt_inc.pth",
        )
    with pytest.raises(FileNotFoundError) as error:
        run_sweep(config, workdir, metrics="fid,fdd", extractors={})
    message = str(error.value)
    assert "--inception_weights is required" in message and "pytorch-fid" in message
    assert "--dinov2_weights is required" in message and "--reference is required" in message
    with pytest.raises(
        FileNotFoundError, match=re.escape("--fdd_reference=/no/fdd.npz does not exist")
    ):
        run_sweep(
            config,
            workdir,
            metrics="fdd",
            extractors=extractors,
            reference=reference,
            fdd_reference="/no/fdd.npz",
        )
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        run_sweep(config, str(tmp_path / "empty"), metrics="is", extractors=extractors)
    assert not os.path.exists(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7.*\[1, 2\]"):
        run_sweep(config, workdir, metrics="is", extractors=extractors, step=7)
    with pytest.raises(ValueError, match="unknown sweep key"):
        run_sweep(config, workdir, metrics="is", extractors=extractors, sweep="taux=0.5")
    with pytest.raises(ValueError, match="not divisible by the 8 data-parallel"):
        run_sweep(
            config,
            workdir,
            metrics="is",
            extractors=extractors,
            batch_size=12,
            num_samples=24,
            sweep="cfg=7.0",
        )
    assert counter.calls == 0


def test_compute_reference_matches_direct_statistics(tiny, tmp_path):
    config, _, extractors = tiny
    output = str(tmp_path / "ref.npz")
    counts = compute_reference(
        config,
        output,
        ("fid", "fdd", "pr", "is"),
        extractors,
        num_samples=20,
        batch_size=8,
        pr_samples=12,
    )
    assert counts == {"fid": 20, "fdd": 20, "pr": 12}
    with np.load(output) as npz:
        stored = {k: npz[k] for k in npz.files}
    assert sorted(stored) == [
        "fdd_mu",
        "fdd_num_samples",
        "fdd_sigma",
        "mu",
        "num_samples",
        "pr_features",
        "sigma",
    ]
    # The same 20 images, in the pipeline's seeded order, through the extractors directly.
    dataset = data.make_dataset(
        setup_lib.build(config).source,
        global_batch_size=8,
        seed=config.seed,
        num_epochs=1,
        shuffle=True,
        drop_remainder=False,
    )
    images = np.concatenate([b["image"] for b in dataset])[:20]
    pixels = jnp.asarray(np.round((images + 1) * 127.5) / 127.5 - 1, jnp.float32)
    pool3 = np.asarray(extractors["inception"](pixels)["pool3"], np.float64)
    np.testing.assert_allclose(stored["mu"], pool3.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored["sigma"], np.cov(pool3, rowvar=False), atol=1e-6)
    assert stored["pr_features"].shape == (12, 12) and int(stored["fdd_num_samples"]) == 20
    fdd = np.asarray(extractors["dinov2"](pixels)["features"], np.float64)
    np.testing.assert_allclose(stored["fdd_mu"], fdd.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="none of"):
        compute_reference(config, output, ("is", "fd_fmnist"), extractors)


def test_fd_fmnist_metric_and_demo_report(tiny, capsys):
    """The fd_fmnist metric and the demo report with a small FdFmnist built directly."""
    config, workdir, _ = tiny
    settings = TrainingSettings(channels=(4,), feature_dim=6)
    params = settings.model().init(jax.random.key(1), jnp.zeros((1, 32, 32, 1)))
    source = setup_lib.build(config).source
    reference_images = np.stack([source[i]["image"] for i in range(200, 400)])
    features = settings.model().apply(params, reference_images)[1]
    reference = metrics.RunningStatistics(6).update(features)
    fd = FdFmnist(settings, params, 0.5, reference)

    report = demo_report(config, workdir, num_samples=16, batch_size=8, fd=fd)
    assert report["step"] == 2 and report["num_samples"] == 16 and report["test_accuracy"] == 0.5
    assert all(np.isfinite(report[k]) for k in ("model", "train_images", "noise"))
    assert report["train_images"] < report["noise"]
    printed = capsys.readouterr().out
    assert "FD-FMNIST, 16 images each" in printed and "Gaussian noise" in printed
    (row,) = [r for r in _read_csv(workdir) if r["metrics"] == "fd_fmnist"]
    assert float(row["fd_fmnist"]) == pytest.approx(report["model"], rel=1e-5)
    assert (row["cfg"], row["steps"], row["num_samples"]) == ("1.5", "2+2", "16")
    with pytest.raises(ValueError, match="32x32 images, but the samples are 8x8"):
        fd_fmnist_extractor(fd).check_input((8, 8, 1))


def test_feature_extractor_rejects_wrong_inputs(tiny):
    extractor = tiny[2]["inception"]
    with pytest.raises(ValueError, match=r"take images \(H, W, C\).*video metrics are fvd"):
        extractor.check_input((4, 8, 8, 3))  # not per_frame: clips refused
    with pytest.raises(ValueError, match="latent configs need a decode"):
        extractor.check_input((8, 8, 16))


def test_cli_reports_missing_inputs_before_any_work(tmp_path):
    """``python -m dfm_jax.eval``: flags reach the library; missing inputs stop it at once."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfm_jax.eval",
            f"--config={train_utils.DEMO_CONFIG}",
            f"--workdir={tmp_path / 'run'}",
            "--metrics=fid,is",
            "--sweep=cfg=1.0,1.5",
            f"--reference={tmp_path / 'ref.npz'}",
        ],
        env=train_utils.subprocess_env(),
        cwd=train_utils.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--inception_weights is required for ['fid', 'is']" in result.stderr
    assert f"--reference={tmp_path / 'ref.npz'} does not exist" in result.stderr
    assert not os.path.exists(tmp_path / "run")

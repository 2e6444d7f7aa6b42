"""Sample-quality sweeps of a trained checkpoint: generate, extract features, score, record.

``run_sweep`` is the library form of ``python -m dfm_jax.eval``. For one checkpoint
(the EMA parameters of ``step``, default the newest) and every sweep point, it
generates ``num_samples`` class-balanced samples batch by batch on the model's
mesh, quantises them to uint8, extracts the features every requested metric
needs, streams them into the metric accumulators (``scores``), and appends a row
to ``<workdir>/eval/results.csv`` (and ``results.md``, TensorBoard scalars under
``<workdir>/eval``). Points already recorded for the same step, sample count,
seed and metric set are skipped, so an interrupted sweep resumes where it stopped.
With ``init`` it evaluates an official DFM-SiT checkpoint (a PyTorch ``.pt``,
imported by ``dfm_jax.weights.dfm_sit``) instead, and ``workdir`` only receives
the results.

Everything that can fail cheaply is checked before the first sample: the sweep and
metric names, the weight and reference files, the checkpoint, the batch size
against the mesh, the image shape against the feature networks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from dfm_jax import parallel
from dfm_jax.evaluation import references, results
from dfm_jax.evaluation.extraction import FeatureFunction
from dfm_jax.evaluation.features import (
    FeatureExtractor,
    dinov2_extractor,
    fd_fmnist_extractor,
    inception_extractor,
    needed_extractors,
)
from dfm_jax.evaluation.point import (
    Decode,
    PointContext,
    class_balanced_labels,
    evaluate_point,
    make_score_factory,
)
from dfm_jax.evaluation.sweep import SweepPoint, metrics_text, parse_metrics, parse_sweep
from dfm_jax.models import dit
from dfm_jax.training import checkpoint, decoding
from dfm_jax.training import setup as setup_lib


def resolve_step(workdir: str, step: int | None) -> int:
    """``step`` if ``<workdir>/checkpoints`` has it, else the newest; clear errors otherwise."""
    directory = os.path.join(workdir, "checkpoints")
    if not epath.Path(directory).exists():
        raise FileNotFoundError(
            f"no checkpoints in {directory}: train first (python -m dfm_jax.main "
            f"--workdir={workdir} ...) or pass the workdir of a trained run"
        )
    checkpointer = checkpoint.Checkpointer(directory, async_save=False)
    try:
        steps = sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it has {steps}")
    return step


def restore_ema_params(setup: setup_lib.Setup, workdir: str, step: int) -> Any:
    """The EMA parameters of checkpoint ``step``, placed with the run's shardings.

    Only the EMA parameters are read (not the raw parameters or the optimizer state).
    """
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        abstract = {"ema_params": setup.abstract_state.ema_params}
        return checkpointer.restore_fields(abstract, step)["ema_params"]
    finally:
        checkpointer.close()


def init_step(path: str, step: int | None) -> int:
    """The step recorded for an imported checkpoint: ``step``, else the file's, else 0."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init={path} does not exist")
    if step is not None:
        return int(step)
    from dfm_jax.weights import dfm_sit

    return dfm_sit.training_step(path) or 0


def import_params(setup: setup_lib.Setup, path: str, which: str = "ema") -> Any:
    """The ``which`` weights of an official DFM-SiT checkpoint, placed like the EMA params.

    ``dfm_jax.weights.dfm_sit.load_params`` checks them against the run's model config
    and token grid and converts them to the paper convention; every process reads
    the file and builds only its own shards.
    """
    from dfm_jax.weights import dfm_sit

    grid = dit.token_grid(setup.model_config, setup.scale_shapes)
    params = dfm_sit.load_params(path, setup.model_config, which=which, grid=grid)
    return jax.tree.map(
        lambda a, x: jax.make_array_from_callback(a.shape, a.sharding, lambda i: x[i]),
        setup.abstract_state.ema_params,
        params,
    )


def build_extractors(
    metric_names: Sequence[str],
    *,
    inception_weights: str | None = None,
    dinov2_weights: str | None = None,
    fd_fmnist=None,
    injected: Mapping[str, FeatureExtractor] | None = None,
) -> dict[str, FeatureExtractor]:
    """The extractors ``metric_names`` need: ``injected`` ones, else loaded from files."""
    out = dict(injected or {})
    for name in needed_extractors(metric_names):
        if name in out:
            continue
        if name == "inception":
            out[name] = inception_extractor(inception_weights)
        elif name == "dinov2":
            out[name] = dinov2_extractor(dinov2_weights)
        else:
            out[name] = fd_fmnist_extractor(fd_fmnist)
    return out


def load_fd_fmnist(config: ml_collections.ConfigDict, cache_dir: str | None = None):
    """The cached FD-FMNIST classifier (trained on first use, minutes on a CPU)."""
    from dfm_jax.evaluation import fd_fmnist

    data_dir = config.data.dir if config.data.source == "fashion_mnist" else None
    return fd_fmnist.FdFmnist.load_or_train(cache_dir=cache_dir, data_dir=data_dir or None)


def _pending(points: Sequence[SweepPoint], base: dict, existing: list[dict]) -> list[SweepPoint]:
    """The points without a row for ``base`` in ``existing`` (decided by process 0)."""
    done = {results.row_key(row) for row in existing}
    flags = np.asarray(
        [results.row_key({**base, **p.columns()}) not in done for p in points], np.int32
    )
    if jax.process_count() > 1:
        flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
    return [p for p, flag in zip(points, flags, strict=True) if flag]


def _rows_of_run(points, base, rows) -> list[dict[str, str]]:
    by_key = {results.row_key(row): row for row in rows}
    keys = [results.row_key({**base, **p.columns()}) for p in points]
    return [by_key[k] for k in keys if k in by_key]


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What ``run_sweep`` evaluates and how (the keyword arguments of ``run_sweep``).

    Attributes:
      sweep: the sweep spec (``dfm_jax.evaluation.sweep``); "" is the config's point.
      metrics: names among fid, fdd, is, pr, fd_fmnist (a comma string or a sequence).
      num_samples: samples per sweep point.
      step: the checkpoint step (default: the newest).
      inception_weights, dinov2_weights: the feature networks' weight files.
      reference, fdd_reference: reference ``.npz`` files (``references``).
      batch_size: global generation batch (default ``config.batch_size``, capped at
        ``num_samples`` rounded up to the data-parallel size); must be divisible by
        the data-parallel size of the mesh.
      seed: labels and noise (default ``config.seed``); batch b draws its noise from
        ``fold_in(key(seed), b)``, so every sweep point sees the same noise.
      save_npz: also write each point's samples as an ADM ``.npz`` (``arr_0`` uint8
        images, ``arr_1`` labels) under ``eval/``.
      save_png: write each point's first ``save_png`` samples as a PNG grid.
      is_splits: Inception Score splits.
      extractors: ready-made feature extractors by name ("inception", "dinov2"),
        used instead of loading weight files (custom networks, tests).
      fd_fmnist: a ``dfm_jax.evaluation.fd_fmnist.FdFmnist`` for the fd_fmnist metric (default:
        the one cached in ``fd_fmnist_cache``, trained on first use).
      fd_fmnist_cache: its cache directory (default ``fd_fmnist.default_cache_dir()``).
      decode: ``model space -> pixels in [-1, 1]``, jit-compatible, applied to every
        generated batch. Default: the decoder of ``config.autoencoder`` for latent
        configs (its weights are then required), the identity for pixel configs.
      mesh: replaces the mesh of ``config.mesh``.
      print_summary: print the Markdown table of this run's rows at the end.
      init: an official DFM-SiT checkpoint (``.pt``; ``dfm_jax.weights.dfm_sit``) to
        evaluate instead of a checkpoint of ``workdir``; its rows are recorded under
        ``step`` if given, else the file's training step (0 if it has none).
      init_key: the state dict of ``init`` to evaluate: "ema" or "model".
    """

    sweep: str = ""
    metrics: str | Sequence[str] = ("fid", "fdd", "is")
    num_samples: int = 50_000
    step: int | None = None
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    reference: str | None = None
    fdd_reference: str | None = None
    batch_size: int | None = None
    seed: int | None = None
    save_npz: bool = False
    save_png: int = 0
    is_splits: int = 10
    extractors: Mapping[str, FeatureExtractor] | None = None
    fd_fmnist: Any = None
    fd_fmnist_cache: str | None = None
    decode: Decode | None = None
    mesh: jax.sharding.Mesh | None = None
    print_summary: bool = True
    init: str | None = None
    init_key: str = "ema"


def run_sweep(config: ml_collections.ConfigDict, workdir: str, **settings) -> list[dict[str, str]]:
    """Evaluates a checkpoint of ``workdir`` over a sweep (keyword args: ``SweepSettings``).

    Returns this run's result rows (points recorded earlier included), as the text
    of ``results.csv``, in sweep order.
    """
    s = SweepSettings(**settings)
    metric_names = parse_metrics(s.metrics)
    points = parse_sweep(s.sweep, config.sampling, len(config.pyramid.ratios) + 1)
    if s.num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {s.num_samples}")
    if "is" in metric_names and not 1 <= s.is_splits <= s.num_samples:
        raise ValueError(f"is_splits must be in [1, num_samples={s.num_samples}]: {s.is_splits}")
    if "pr" in metric_names and s.num_samples < 4:
        raise ValueError("precision/recall (k = 3) needs at least 4 samples")
    references.check_files(
        metric_names,
        weights={"inception": s.inception_weights, "dinov2": s.dinov2_weights},
        reference=s.reference,
        fdd_reference=s.fdd_reference,
        injected=list(s.extractors or {}),
    )
    step = init_step(s.init, s.step) if s.init else resolve_step(workdir, s.step)
    seed = int(config.seed if s.seed is None else s.seed)
    eval_dir = os.path.join(workdir, "eval")
    base = {
        "step": step,
        "num_samples": s.num_samples,
        "seed": seed,
        "metrics": metrics_text(metric_names),
    }
    rows = results.read_results(eval_dir)
    pending = _pending(points, base, rows)
    if len(pending) < len(points):
        done = len(points) - len(pending)
        logging.info("%d of %d sweep points are in results.csv already", done, len(points))
    if pending:
        ctx = _prepare(config, workdir, s, metric_names, step, seed)
        _run_points(ctx, pending, base, rows)
    run_rows = _rows_of_run(points, base, rows)
    if s.print_summary and jax.process_index() == 0:
        print(f"\nEvaluation of step {step}, {s.num_samples} samples per point:\n")
        print(results.summary_table(run_rows))
    return run_rows


def _prepare(config, workdir, s: SweepSettings, metric_names, step: int, seed: int) -> PointContext:
    """Builds the model, loads networks and references, restores (or imports) the params."""
    setup = setup_lib.build(config, s.mesh, read_data=s.init is None)
    if s.decode is not None:
        decode = decoding.FunctionDecoder(s.decode)
    else:
        codec = decoding.load_codec(config, setup.mesh, required=True)
        decode = codec if codec is not None else decoding.IDENTITY
    dp = parallel.data_parallel_size(setup.mesh)
    batch_size = s.batch_size
    if batch_size is None:
        batch_size = min(int(config.batch_size), -(-s.num_samples // dp) * dp)
    if batch_size < 1 or batch_size % dp:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {dp} data-parallel devices of "
            f"mesh {dict(setup.mesh.shape)}; use a multiple of {dp}"
        )
    fd = s.fd_fmnist
    if "fd_fmnist" in metric_names and fd is None:
        fd = load_fd_fmnist(config, s.fd_fmnist_cache)
    extractors = build_extractors(
        metric_names,
        inception_weights=s.inception_weights,
        dinov2_weights=s.dinov2_weights,
        fd_fmnist=fd,
        injected=s.extractors,
    )
    function = FeatureFunction(extractors, needed_extractors(metric_names), setup.mesh)
    pixels = jax.eval_shape(decode, jax.ShapeDtypeStruct((1, *setup.example_shape), np.float32))
    function.check_input(pixels.shape[1:])
    make_scores = make_score_factory(
        metric_names,
        extractors,
        function,
        num_samples=s.num_samples,
        is_splits=s.is_splits,
        reference=s.reference,
        fdd_reference=s.fdd_reference,
        fd_fmnist=fd,
        batch_size=batch_size,
    )
    return PointContext(
        setup=setup,
        params=(
            import_params(setup, s.init, s.init_key)
            if s.init
            else restore_ema_params(setup, workdir, step)
        ),
        features=function,
        make_scores=make_scores,
        labels=class_balanced_labels(s.num_samples, setup.num_classes, seed),
        batch_size=batch_size,
        seed=seed,
        decode=decode,
        image_shape=tuple(pixels.shape[1:]),
        eval_dir=os.path.join(workdir, "eval"),
        step=step,
        save_npz=s.save_npz,
        save_png=s.save_png,
    )


def _run_points(ctx: PointContext, points, base: dict, rows: list[dict]) -> None:
    """Evaluates ``points`` in order, appending a row to ``rows`` and the files after each."""
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(
        ctx.eval_dir, just_logging=not is_main, asynchronous=False
    )
    try:
        for i, point in enumerate(points):
            logging.info(
                "Sweep point %d/%d: %s (%d NFE)", i + 1, len(points), point.name, point.nfe
            )
            values = evaluate_point(ctx, point)
            row = {**base, **point.columns(), "nfe": point.nfe, **values}
            rows.append({c: results.format_value(c, v) for c, v in row.items()})
            if is_main:
                results.write_results(ctx.eval_dir, rows)
            writer.write_scalars(ctx.step, {f"{point.name}/{k}": v for k, v in values.items()})
            summary = ", ".join(f"{k} {results.format_value(k, v)}" for k, v in values.items())
            logging.info("%s: %s", point.name, summary)
    finally:
        writer.flush()
        writer.close()

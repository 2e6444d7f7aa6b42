"""Sample-quality sweeps of a trained checkpoint: generate, extract features, score, record.

``run_sweep`` is the library form of ``python -m dfm_jax.eval``: for one checkpoint (the
EMA parameters of ``step``, default the newest) and one evaluator (``EvalSettings``: the
metrics, the sweep, the sample count, the weights and references), it scores every
sweep point (``evaluators.Evaluator``) and appends a row per point to
``<workdir>/eval/results.csv`` (and ``results.md``, TensorBoard scalars under
``<workdir>/eval``). Points already recorded for the same step, sample count, seed and
metric set are skipped, so an interrupted sweep resumes where it stopped. With ``init``
it evaluates an official DFM-SiT checkpoint (a PyTorch ``.pt``, imported by
``dfm_jax.weights.dfm_sit``) instead, and ``workdir`` only receives the results.
``run_declared`` runs the evaluators that the config declares (``config.evals``), with
overrides from the command line.

Everything that can fail cheaply is checked before the first sample: the sweep and
metric names, the weight and reference files, the checkpoint, the batch size against
the mesh, the sample shape against the feature networks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from dfm_jax import config as config_lib
from dfm_jax import parallel
from dfm_jax.evaluation import results
from dfm_jax.evaluation.evaluators import Evaluator, check_files, summary
from dfm_jax.evaluation.features import METRIC_COLUMNS, FeatureExtractor
from dfm_jax.evaluation.sweep import SweepPoint, metrics_text, parse_metrics, parse_sweep
from dfm_jax.models import dit
from dfm_jax.training import checkpoint
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


def restore_newest_ema_params(setup: setup_lib.Setup, workdir: str, newest: int) -> tuple[Any, int]:
    """The EMA parameters of the newest readable checkpoint up to ``newest``, and its step.

    Unreadable checkpoints are logged and skipped (never renamed: evaluation only reads
    the workdir, which may be training); ``checkpoint.NoReadableCheckpointError`` when
    none can be read.
    """
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        abstract = {"ema_params": setup.abstract_state.ema_params}
        steps = [s for s in checkpointer.all_steps() if s <= newest]
        fields, step = checkpointer.newest_readable(abstract, steps)
        return fields["ema_params"], step
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

    grid = dit.token_grid(setup.model_config, setup.method.scale_shapes)
    params = dfm_sit.load_params(path, setup.model_config, which=which, grid=grid)
    return jax.tree.map(
        lambda a, x: parallel.global_from_host(x, a.sharding),
        setup.abstract_state.ema_params,
        params,
    )


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
class SweepOptions:
    """How ``run_sweep`` evaluates (what it evaluates is the ``EvalSettings``).

    Attributes:
      name: the evaluator's name (log lines).
      step: the checkpoint step (default: the newest).
      save_npz: also write each point's samples as an ADM ``.npz`` (``arr_0`` uint8
        images, ``arr_1`` labels) under ``eval/``.
      save_png: write each point's first ``save_png`` samples as a PNG grid.
      extractors: ready-made feature extractors by name ("inception", "dinov2"),
        used instead of loading weight files (custom networks, tests).
      fd_fmnist: a ``dfm_jax.evaluation.fd_fmnist.FdFmnist`` for the fd_fmnist metric
        (default: the one cached in ``fd_fmnist_cache``, trained on first use).
      fd_fmnist_cache: its cache directory (default ``fd_fmnist.default_cache_dir()``).
      fvd_fmnist: a ``dfm_jax.evaluation.fvd_fmnist.FvdFmnist`` for the fvd_fmnist metric
        (default: the one cached in ``fd_fmnist_cache`` for the run's clip shape).
      decode: ``model space -> pixels in [-1, 1]``, jit-compatible (``Evaluator``).
      mesh: replaces the mesh of ``config.mesh``.
      print_summary: print the Markdown table of this run's rows at the end.
      init: an official DFM-SiT checkpoint (``.pt``; ``dfm_jax.weights.dfm_sit``) to
        evaluate instead of a checkpoint of ``workdir``; its rows are recorded under
        ``step`` if given, else the file's training step (0 if it has none).
      init_key: the state dict of ``init`` to evaluate: "ema" or "model".
    """

    name: str = "eval"
    step: int | None = None
    save_npz: bool = False
    save_png: int = 0
    extractors: Mapping[str, FeatureExtractor] | None = None
    fd_fmnist: Any = None
    fd_fmnist_cache: str | None = None
    fvd_fmnist: Any = None
    decode: Any = None
    mesh: jax.sharding.Mesh | None = None
    print_summary: bool = True
    init: str | None = None
    init_key: str = "ema"


def run_sweep(
    settings: config_lib.Settings,
    workdir: str,
    evaluator: config_lib.EvalSettings,
    **options: Any,
) -> list[dict[str, str]]:
    """Evaluates a checkpoint of ``workdir`` with ``evaluator`` (keyword args: ``SweepOptions``).

    Returns this run's result rows (points recorded earlier included), as the text
    of ``results.csv``, in sweep order.
    """
    o = SweepOptions(**options)
    points = parse_sweep(evaluator.sweep, settings.sampling, settings.num_scales)
    check_files(evaluator, o.extractors)
    step = init_step(o.init, o.step) if o.init else resolve_step(workdir, o.step)
    seed = settings.seed if evaluator.seed is None else evaluator.seed
    eval_dir = os.path.join(workdir, "eval")
    base = {
        "step": step,
        "init": results.init_text(o.init, o.init_key),
        "num_samples": evaluator.num_samples,
        "seed": seed,
        "metrics": metrics_text(parse_metrics(evaluator.metrics)),
    }
    rows = results.read_results(eval_dir)
    pending = _pending(points, base, rows)
    if len(pending) < len(points):
        done = len(points) - len(pending)
        logging.info("%d of %d sweep points are in results.csv already", done, len(points))
    if pending:
        setup = setup_lib.build(settings, o.mesh, read_data=o.init is None)
        scorer = Evaluator(
            setup,
            evaluator,
            name=o.name,
            eval_dir=eval_dir,
            extractors=o.extractors,
            fd_fmnist=o.fd_fmnist,
            fd_fmnist_cache=o.fd_fmnist_cache,
            fvd_fmnist=o.fvd_fmnist,
            decode=o.decode,
            init=base["init"],
        )
        if o.init:
            params = import_params(setup, o.init, o.init_key)
        elif o.step is None:  # the newest readable step (an explicit --step must read)
            params, readable = restore_newest_ema_params(setup, workdir, step)
            if readable != step:
                step = base["step"] = readable
                pending = _pending(points, base, rows)
        else:
            params = restore_ema_params(setup, workdir, step)
        _run_points(scorer, params, step, pending, rows, o)
    run_rows = _rows_of_run(points, base, rows)
    if o.print_summary and jax.process_index() == 0:
        print(f"\nEvaluation of step {step}, {evaluator.num_samples} samples per point:\n")
        print(results.summary_table(run_rows))
    return run_rows


def _run_points(
    scorer: Evaluator, params, step: int, points, rows: list[dict], o: SweepOptions
) -> None:
    """Evaluates ``points`` in order, appending a row to ``rows`` and the files after each."""
    eval_dir = scorer.context.eval_dir
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(
        eval_dir, just_logging=not is_main, asynchronous=False
    )
    try:
        for i, point in enumerate(points):
            logging.info(
                "Sweep point %d/%d: %s (%d NFE)", i + 1, len(points), point.name, point.nfe
            )
            row = scorer.evaluate_point(
                point, params, step, save_npz=o.save_npz, save_png=o.save_png
            )
            rows.append(row)
            if is_main:
                results.write_results(eval_dir, rows)
            values = {c: float(row[c]) for c in (*METRIC_COLUMNS, *results.THROUGHPUT_COLUMNS)
                      if row.get(c, "") != ""}  # fmt: skip
            writer.write_scalars(step, {f"{point.name}/{k}": v for k, v in values.items()})
            logging.info("%s: %s", point.name, summary(row, values))
    finally:
        writer.flush()
        writer.close()


def run_declared(
    settings: config_lib.Settings,
    workdir: str,
    *,
    names: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, list[dict[str, str]]]:
    """Runs the evaluators of ``settings.evals`` (all, or ``names``) on a checkpoint.

    ``overrides`` replace ``EvalSettings`` fields of every selected evaluator (the eval
    command's flags). A config that declares none evaluates with the ``EvalSettings``
    defaults (FID, FDD and IS on 50,000 samples) and the overrides.

    Returns:
      Evaluator name -> its result rows.
    """
    declared = dict(settings.evals) or {"eval": config_lib.EvalSettings()}
    names = list(declared) if names is None else list(names)
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise config_lib.ConfigError(
            f"--evals names {unknown}, but the config declares {sorted(declared)} (config.evals)"
        )
    selected = {}
    for name in names:
        try:
            selected[name] = dataclasses.replace(declared[name], **(overrides or {}))
        except ValueError as e:
            raise config_lib.ConfigError(f"evaluator {name!r}: {e}") from None
    return {
        name: run_sweep(settings, workdir, evaluator, name=name, **options)
        for name, evaluator in selected.items()
    }

"""Evaluators declared in the config (``config.evals``), run by the trainer and by eval.py.

An ``Evaluator`` is one ``EvalSettings`` entry built on one run's setup: its sweep
points, its metrics' feature networks and references, the class-balanced labels and
the compiled samplers (once per point, so evaluating every few thousand steps compiles
nothing new). ``evaluate(params, step)`` scores every point on the given (EMA)
parameters and returns one result row per point, with the columns of
``results.COLUMNS``. Everything that can fail cheaply (metric names, weight and
reference files, the sample shape against the feature networks, the batch against the
mesh) fails when the evaluator is built, before any sample is drawn.

``TrainingEvaluators`` is the trainer's periodic action: every evaluator with
``every > 0`` runs every ``every`` steps and at the last step, builds itself on first
use (big_vision's lazy evaluators), appends its rows to ``<workdir>/eval/results.csv``
(``results.md``), writes TensorBoard scalars ``<name>/<point>/<metric>`` and prints
one console line per point.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from dfm_jax import config as config_lib
from dfm_jax import parallel
from dfm_jax.evaluation import point as point_lib
from dfm_jax.evaluation import references, results
from dfm_jax.evaluation.extraction import FeatureFunction
from dfm_jax.evaluation.features import (
    METRIC_COLUMNS,
    FeatureExtractor,
    check_metrics_input,
    check_sample_kind,
    dinov2_extractor,
    fd_fmnist_extractor,
    fvd_fmnist_extractor,
    i3d_extractor,
    inception_extractor,
    needed_extractors,
)
from dfm_jax.evaluation.sweep import SweepPoint, metrics_text, parse_metrics, parse_sweep
from dfm_jax.training import decoding
from dfm_jax.training import setup as setup_lib


def load_fd_fmnist(data: config_lib.DataSettings, cache_dir: str | None = None):
    """The cached FD-FMNIST classifier (trained on first use, minutes on a CPU)."""
    from dfm_jax.evaluation import fd_fmnist

    data_dir = data.dir if data.source == "fashion_mnist" else ""
    return fd_fmnist.FdFmnist.load_or_train(cache_dir=cache_dir, data_dir=data_dir or None)


def load_fvd_fmnist(data: config_lib.DataSettings, cache_dir: str | None = None):
    """The cached FVD-FMNIST video classifier for the run's clip shape (trained on first
    use, minutes on a CPU)."""
    from dfm_jax.evaluation import fvd_fmnist

    if not data.frames:
        raise ValueError(
            "the fvd_fmnist metric takes clips, but this run's data are images "
            "(data.frames=0); the image demo's metric is fd_fmnist"
        )
    data_dir = data.dir if data.source in ("fashion_mnist", "moving_fashion_mnist") else ""
    settings = fvd_fmnist.TrainingSettings(
        frames=data.frames, resolution=data.resolution or fvd_fmnist.RESOLUTION
    )
    return fvd_fmnist.FvdFmnist.load_or_train(
        cache_dir=cache_dir, data_dir=data_dir or None, settings=settings
    )


def build_extractors(
    metric_names,
    *,
    inception_weights: str = "",
    dinov2_weights: str = "",
    i3d_weights: str = "",
    fd_fmnist=None,
    fvd_fmnist=None,
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
        elif name == "i3d":
            out[name] = i3d_extractor(i3d_weights)
        elif name == "fvd_fmnist":
            out[name] = fvd_fmnist_extractor(fvd_fmnist)
        else:
            out[name] = fd_fmnist_extractor(fd_fmnist)
    return out


def check_files(
    settings: config_lib.EvalSettings, extractors: Mapping[str, FeatureExtractor] | None
) -> None:
    """Raises ``FileNotFoundError`` naming every weight or reference file the evaluator
    needs that is unset or missing (``extractors`` given ready-made need no weights)."""
    references.check_files(
        parse_metrics(settings.metrics),
        weights={
            "inception": settings.inception_weights,
            "dinov2": settings.dinov2_weights,
            "i3d": settings.i3d_weights,
        },
        reference=settings.reference,
        fdd_reference=settings.fdd_reference,
        injected=list(extractors or {}),
    )


def generation_batch_size(
    settings: config_lib.EvalSettings, batch_size: int, mesh, name: str = "eval"
) -> int:
    """The evaluator's batch: its own, else ``batch_size`` capped at the sample count
    rounded up to the data-parallel size; must split over the data-parallel devices."""
    dp = parallel.data_parallel_size(mesh)
    size = settings.batch_size
    if size is None:
        size = min(batch_size, -(-settings.num_samples // dp) * dp)
    config_lib.check_batch_size(size, dp, f"evals.{name}.batch_size")
    return size


class Evaluator:
    """One declared evaluator on one run's setup (see the module docstring).

    Args:
      setup: the run's setup (``training.setup.build``).
      settings: the evaluator's ``EvalSettings``.
      name: its key in ``config.evals`` (TensorBoard prefix).
      eval_dir: where result and sample files go.
      extractors: ready-made feature extractors by name (custom networks, tests),
        used instead of loading weight files.
      fd_fmnist: a ``fd_fmnist.FdFmnist`` (default: the cached one, trained on first use).
      fd_fmnist_cache: its cache directory.
      fvd_fmnist: a ``fvd_fmnist.FvdFmnist`` (default: the cached one for the run's clip
        shape, trained on first use; cached in ``fd_fmnist_cache`` too).
      decode: model space -> pixels in [-1, 1], jit-compatible. Default: the decoder of
        ``config.autoencoder`` for latent configs (its weights are then required), the
        identity for pixel configs.
      init: the imported checkpoint evaluated, as ``results.init_text`` writes it (the
        ``init`` column; empty for the workdir's checkpoints).
    """

    def __init__(
        self,
        setup: setup_lib.Setup,
        settings: config_lib.EvalSettings,
        *,
        name: str = "eval",
        eval_dir: str,
        extractors: Mapping[str, FeatureExtractor] | None = None,
        fd_fmnist=None,
        fd_fmnist_cache: str | None = None,
        fvd_fmnist=None,
        decode=None,
        init: str = "",
    ):
        run = setup.settings
        self.setup, self.settings, self.name = setup, settings, name
        self.init = init  # the ``init`` column (``results.init_text``)
        self.metric_names = parse_metrics(settings.metrics)
        self.points = parse_sweep(settings.sweep, run.sampling, run.num_scales)
        self.seed = run.seed if settings.seed is None else settings.seed
        check_files(settings, extractors)
        self.batch_size = generation_batch_size(settings, run.batch_size, setup.mesh, name)
        if decode is None:
            codec = decoding.load_codec(run.autoencoder, setup.mesh, required=True)
            decode = codec if codec is not None else decoding.IDENTITY
        else:
            decode = decoding.FunctionDecoder(decode)
        if "fd_fmnist" in self.metric_names and fd_fmnist is None:
            fd_fmnist = load_fd_fmnist(run.data, fd_fmnist_cache)
        if "fvd_fmnist" in self.metric_names and fvd_fmnist is None:
            fvd_fmnist = load_fvd_fmnist(run.data, fd_fmnist_cache)
        networks = build_extractors(
            self.metric_names,
            inception_weights=settings.inception_weights,
            dinov2_weights=settings.dinov2_weights,
            i3d_weights=settings.i3d_weights,
            fd_fmnist=fd_fmnist,
            fvd_fmnist=fvd_fmnist,
            injected=extractors,
        )
        features = FeatureFunction(networks, needed_extractors(self.metric_names), setup.mesh)
        example = jax.ShapeDtypeStruct((1, *setup.example_shape), np.float32)
        image_shape = tuple(jax.eval_shape(decode, example).shape[1:])
        check_sample_kind(self.metric_names, image_shape)
        features.check_input(image_shape)
        self.context = point_lib.PointContext(
            setup=setup,
            features=features,
            make_scores=point_lib.make_score_factory(
                self.metric_names,
                networks,
                features,
                num_samples=settings.num_samples,
                is_splits=settings.is_splits,
                reference=settings.reference,
                fdd_reference=settings.fdd_reference,
                fd_fmnist=fd_fmnist,
                fvd_fmnist=fvd_fmnist,
                batch_size=self.batch_size,
            ),
            labels=point_lib.class_balanced_labels(
                settings.num_samples, setup.num_classes, self.seed
            ),
            batch_size=self.batch_size,
            seed=self.seed,
            decode=decode,
            image_shape=image_shape,
            eval_dir=eval_dir,
            init=init,
        )
        self._samplers: dict[SweepPoint, setup_lib.MeshBound] = {}

    def key_columns(self, step: int) -> dict[str, Any]:
        """The columns that, with a point's sampler columns, identify a result row."""
        return {
            "step": step,
            "init": self.init,
            "num_samples": self.settings.num_samples,
            "seed": self.seed,
            "metrics": metrics_text(self.metric_names),
        }

    def evaluate_point(
        self,
        point: SweepPoint,
        params: Any,
        step: int,
        *,
        save_npz: bool = False,
        save_png: int = 0,
        progress_bar: bool = True,
    ) -> dict[str, str]:
        """The result row (text, as in ``results.csv``) of one point at ``params``."""
        if point not in self._samplers:
            self._samplers[point] = point_lib.make_sampler(self.context, point)
        values = point_lib.evaluate_point(
            self.context,
            point,
            self._samplers[point],
            params,
            step,
            save_npz=save_npz,
            save_png=save_png,
            progress_bar=progress_bar,
        )
        row = {**self.key_columns(step), **point.columns(), "nfe": point.nfe, **values}
        return {column: results.format_value(column, value) for column, value in row.items()}


def summary(row: Mapping[str, str], metric_columns) -> str:
    """``fd_fmnist 45.2, ...`` of a result row's filled metric columns."""
    return ", ".join(f"{c} {row[c]}" for c in metric_columns if row.get(c, "") != "")


class TrainingEvaluators:
    """The trainer's evaluators: those of ``config.evals`` with ``every > 0``."""

    def __init__(self, setup: setup_lib.Setup, workdir: str, writer):
        self.setup, self.writer = setup, writer
        self.eval_dir = os.path.join(workdir, "eval")
        self.declared = {}
        for name, settings in setup.settings.evals.items():
            if settings.every > 0 and self._fits(name, settings):
                self.declared[name] = settings
        self._built: dict[str, Evaluator] = {}

    def _fits(self, name: str, settings: config_lib.EvalSettings) -> bool:
        """Whether the evaluator's networks take the samples (checked now for pixel
        configs; decoded latents are checked when the evaluator is built)."""
        if self.setup.settings.autoencoder.name:
            return True
        try:
            check_metrics_input(settings.metrics, self.setup.example_shape)
        except ValueError as e:
            logging.warning(
                "evaluator %s is skipped during training: %s (set --config.evals.%s.every=0 "
                "to say so)",
                name,
                e,
                name,
            )
            return False
        return True

    def _due(self, step: int) -> list[str]:
        last = step == self.setup.settings.total_steps
        return [n for n, e in self.declared.items() if last or step % e.every == 0]

    def due(self, step: int) -> bool:
        return bool(self._due(step))

    def __call__(self, step: int, ema_params: Any) -> None:
        rows = results.read_results(self.eval_dir)
        for name in self._due(step):
            if name not in self._built:
                self._built[name] = Evaluator(
                    self.setup, self.declared[name], name=name, eval_dir=self.eval_dir
                )
            evaluator = self._built[name]
            for point in evaluator.points:
                row = evaluator.evaluate_point(point, ema_params, step, progress_bar=False)
                rows = [r for r in rows if results.row_key(r) != results.row_key(row)] + [row]
                if jax.process_index() == 0:
                    results.write_results(self.eval_dir, rows)
                scalars = {
                    f"{name}/{point.name}/{c}": float(row[c])
                    for c in METRIC_COLUMNS
                    if row.get(c, "") != ""
                }
                self.writer.write_scalars(step, scalars)
                logging.info(
                    "evaluation %s at step %d, %s (%s samples): %s",
                    name,
                    step,
                    point.name,
                    row["num_samples"],
                    summary(row, METRIC_COLUMNS),
                )

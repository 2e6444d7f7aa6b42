"""Evaluation of trained models: FID, FDD, IS, precision/recall and FD-FMNIST sweeps.

The library behind ``python -m dfm_jax.eval`` (see ``dfm_jax/eval.py`` for the CLI):

* ``run_sweep(config, workdir, **SweepSettings)``: sample a checkpoint over a sweep of
  sampler settings and record the metrics (``runner``).
* ``compute_reference(config, output, metrics, extractors)``: reference statistics
  of a dataset split (``references``).
* ``demo_report(config, workdir)``: FD-FMNIST of the demo model next to real data and
  noise (``demo``).

Modules: ``sweep`` (sweep and metric specs), ``features`` (feature extractors, the
metric registry), ``extraction`` (extractors on the mesh), ``scores`` (streaming
accumulators), ``references``, ``results`` (CSV/Markdown, ADM ``.npz``, PNG), ``point``
(one sweep point: labels, generation, scores), ``runner``, ``demo``.
"""

from dfm_jax.evaluation.demo import demo_report
from dfm_jax.evaluation.features import (
    METRICS,
    FeatureExtractor,
    dinov2_extractor,
    fd_fmnist_extractor,
    inception_extractor,
)
from dfm_jax.evaluation.point import class_balanced_labels
from dfm_jax.evaluation.references import REFERENCE_METRICS, check_files, compute_reference
from dfm_jax.evaluation.runner import SweepSettings, build_extractors, run_sweep
from dfm_jax.evaluation.sweep import SweepPoint, parse_metrics, parse_sweep

__all__ = [
    "METRICS",
    "REFERENCE_METRICS",
    "FeatureExtractor",
    "SweepPoint",
    "SweepSettings",
    "build_extractors",
    "check_files",
    "class_balanced_labels",
    "compute_reference",
    "demo_report",
    "dinov2_extractor",
    "fd_fmnist_extractor",
    "inception_extractor",
    "parse_metrics",
    "parse_sweep",
    "run_sweep",
]

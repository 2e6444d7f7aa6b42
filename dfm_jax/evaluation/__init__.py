"""Evaluation of generators: metrics, feature networks, evaluators, sweeps, demo metrics.

The library behind ``python -m dfm_jax.eval`` and the trainer's evaluations (modules are
imported by name, e.g. ``from dfm_jax.evaluation import runner``):

* ``evaluators``: ``Evaluator`` (one ``config.evals`` entry on a run's setup: sweep
  points, feature networks, references, compiled samplers) and ``TrainingEvaluators``
  (the trainer's periodic evaluations);
* ``runner``: ``run_sweep`` (a checkpoint of a workdir, or imported weights, over a
  sweep; resumable) and ``run_declared`` (every declared evaluator);
* ``point``: one sweep point (class-balanced labels -> samples -> features -> scores);
* ``sweep``: sweep and metric specifications; ``features``: feature extractors and the
  metric registry; ``extraction``: extractors on the mesh; ``scores``: streaming metric
  accumulators; ``metrics``: float64 statistics, Frechet distance, IS, precision/recall;
* ``references``: reference statistics (checking, loading, computing);
  ``results``: ``results.csv`` / ``results.md``, ADM ``.npz``, PNG grids;
* ``fd_fmnist`` and ``demo``: the Fashion-MNIST demo's metric and report.
"""

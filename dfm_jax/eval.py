"""Evaluate a trained model: FID, FDD, IS (and precision/recall, FD-FMNIST) sweeps.

    python -m dfm_jax.eval --config=configs/imagenet512.py --workdir=gs://bucket/in512 \\
        --num_samples=50000 --sweep="cfg=1.0,1.25,1.5;tau=0.7,0.9;steps=30+10,20+20" \\
        --metrics=fid,fdd,is --inception_weights=pt_inception-2015-12-05-6726825d.pth \\
        --dinov2_weights=dinov2_vitl14_pretrain.pth --reference=VIRTUAL_imagenet512.npz \\
        --fdd_reference=in512_dinov2.npz

Sweep: ``key=v1,v2;key=...`` over ``cfg`` (guidance scale), ``tau`` (thresholds,
``/``-separated for three or more scales: ``0.7/0.9``), ``steps`` (per stage,
``+``-separated: ``30+10``; ``40`` for Flow Matching), ``solver`` (``euler``,
``heun``) and ``interval`` (guidance interval ``low-high``); omitted keys take the
config's ``sampling`` values. Metrics: ``fid``, ``is`` (Inception), ``fdd``
(DINOv2), ``pr`` (precision/recall on Inception features; needs reference features
or images, see below), ``fd_fmnist`` (the demo's classifier; no weights needed).

Outputs under ``<workdir>/eval/``: ``results.csv`` and ``results.md`` (one row per
point: step, settings, NFE, metrics, generation and feature-extraction images/s,
seconds), TensorBoard scalars, and optionally ``samples_step<N>_<point>_n<M>.npz``
(ADM format, ``--save_npz``) and ``samples_step<N>_<point>.png`` (``--save_png=K``).
Running the same command again skips the points already in ``results.csv`` for
the same checkpoint step, ``--num_samples``, ``--seed`` and ``--metrics``.

Reference statistics (``--reference``): an ADM reference batch (``mu``/``sigma``
of Inception pool3, and ``arr_0`` images, used for precision/recall), or a file
written by this command from a dataset::

    python -m dfm_jax.eval --config=configs/imagenet512.py --compute_reference=in512_ref.npz \\
        --metrics=fid,fdd,pr --inception_weights=... --dinov2_weights=... \\
        --config.data.source=image_folder --config.data.dir=/data/imagenet \\
        --config.data.resolution=512 [--reference_split=train] [--num_samples=N]

which holds ``mu``/``sigma``/``num_samples`` (FID), ``fdd_mu``/``fdd_sigma``/
``fdd_num_samples`` (FDD) and ``pr_features`` (``--pr_reference_samples``
Inception features), so ``--reference=in512_ref.npz`` serves all three.

An official DFM-SiT checkpoint of the authors' PyTorch reimplementation (a ``.pt``
training checkpoint with "model" and "ema" state dicts) is evaluated with ``--init``
instead of a trained workdir (which then only receives the results)::

    python -m dfm_jax.eval --config=configs/imagenet512_dfm_sit.py --workdir=/tmp/dfm_sit \\
        --init=dfm_sit_imagenet_512px_1k_0400000.pt [--init_key=ema|model] ...

The Fashion-MNIST demo's report (FD-FMNIST of the samples next to train-split
images and noise)::

    python -m dfm_jax.eval --config=configs/demo.py --workdir=workdir/demo --demo_report

``--num_samples`` defaults to 50000 for sweeps, the whole split for
``--compute_reference`` and 500 for ``--demo_report``. The library behind this
command is ``dfm_jax.evaluation`` (``run_sweep``, ``compute_reference``,
``demo_report``). On several hosts run the same command on every host.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Samples per sweep point (50000) / reference images (all) / demo (500)."
)
_SWEEP = flags.DEFINE_string("sweep", "", "Sweep spec, e.g. 'cfg=1.0,1.5;tau=0.9;steps=30+10'.")
_METRICS = flags.DEFINE_string("metrics", "fid,fdd,is", "Comma-separated: fid,fdd,is,pr,fd_fmnist.")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "pytorch-fid Inception weights.")
_DINOV2 = flags.DEFINE_string("dinov2_weights", None, "DINOv2 weights (file or HF directory).")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference .npz (ADM batch or ours).")
_FDD_REFERENCE = flags.DEFINE_string(
    "fdd_reference", None, "DINOv2 reference .npz (default: the fdd_* keys of --reference)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: config's).")
_SEED = flags.DEFINE_integer("seed", None, "Labels and noise seed (default: config.seed).")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Save each point's samples as an ADM .npz.")
_SAVE_PNG = flags.DEFINE_integer("save_png", 0, "Save each point's first N samples as a PNG.")
_IS_SPLITS = flags.DEFINE_integer("is_splits", 10, "Inception Score splits.")
_COMPUTE_REFERENCE = flags.DEFINE_string(
    "compute_reference", None, "Write reference statistics of config.data to this .npz."
)
_REFERENCE_SPLIT = flags.DEFINE_string(
    "reference_split", None, "Dataset split for --compute_reference (default: config's)."
)
_PR_REFERENCE_SAMPLES = flags.DEFINE_integer(
    "pr_reference_samples", 10_000, "Reference features kept for precision/recall."
)
_DEMO_REPORT = flags.DEFINE_bool(
    "demo_report", False, "FD-FMNIST of the samples vs train images and noise (the demo)."
)
_INIT = flags.DEFINE_string(
    "init",
    None,
    "Evaluate this official DFM-SiT PyTorch checkpoint (.pt) instead of a checkpoint of "
    "--workdir, which then only receives the results (dfm_jax.weights.dfm_sit).",
)
_INIT_KEY = flags.DEFINE_enum(
    "init_key", "ema", ["ema", "model"], "The state dict of --init to evaluate."
)
_FD_FMNIST_CACHE = flags.DEFINE_string(
    "fd_fmnist_cache", None, "FD-FMNIST classifier cache (default ~/.cache/dfm_jax)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    if _INIT.value and (_COMPUTE_REFERENCE.value or _DEMO_REPORT.value):
        raise app.UsageError("--init evaluates sweeps only, not --compute_reference/--demo_report")
    parallel.maybe_initialize_distributed()
    # Imports JAX backends only after distributed start-up.
    from dfm_jax import evaluation

    if _COMPUTE_REFERENCE.value:
        _compute_reference(evaluation)
    elif not _WORKDIR.value:
        raise app.UsageError("--workdir is required (unless --compute_reference)")
    elif _DEMO_REPORT.value:
        evaluation.demo_report(
            _CONFIG.value,
            _WORKDIR.value,
            num_samples=_NUM_SAMPLES.value or 500,
            step=_STEP.value,
            batch_size=_BATCH_SIZE.value,
            seed=_SEED.value,
            cache_dir=_FD_FMNIST_CACHE.value,
        )
    else:
        logging.info("Config:\n%s", _CONFIG.value)
        evaluation.run_sweep(
            _CONFIG.value,
            _WORKDIR.value,
            sweep=_SWEEP.value,
            metrics=_METRICS.value,
            num_samples=_NUM_SAMPLES.value or 50_000,
            step=_STEP.value,
            inception_weights=_INCEPTION.value,
            dinov2_weights=_DINOV2.value,
            reference=_REFERENCE.value,
            fdd_reference=_FDD_REFERENCE.value,
            batch_size=_BATCH_SIZE.value,
            seed=_SEED.value,
            save_npz=_SAVE_NPZ.value,
            save_png=_SAVE_PNG.value,
            is_splits=_IS_SPLITS.value,
            fd_fmnist_cache=_FD_FMNIST_CACHE.value,
            init=_INIT.value,
            init_key=_INIT_KEY.value,
        )


def _compute_reference(evaluation) -> None:
    metric_names = evaluation.parse_metrics(_METRICS.value)
    with_reference = [m for m in metric_names if m in evaluation.REFERENCE_METRICS]
    evaluation.check_files(
        with_reference,
        weights={"inception": _INCEPTION.value, "dinov2": _DINOV2.value},
        need_reference=False,
    )
    extractors = evaluation.build_extractors(
        with_reference, inception_weights=_INCEPTION.value, dinov2_weights=_DINOV2.value
    )
    counts = evaluation.compute_reference(
        _CONFIG.value,
        _COMPUTE_REFERENCE.value,
        metric_names,
        extractors,
        split=_REFERENCE_SPLIT.value,
        num_samples=_NUM_SAMPLES.value,
        batch_size=_BATCH_SIZE.value,
        pr_samples=_PR_REFERENCE_SAMPLES.value,
    )
    logging.info("Reference statistics in %s: %s", _COMPUTE_REFERENCE.value, counts)


if __name__ == "__main__":
    app.run(main)

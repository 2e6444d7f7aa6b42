"""Evaluate a trained model: FID, FDD, IS (and precision/recall, FD-FMNIST) sweeps; for
video runs FVD and the per-frame FID and FDD (and the video demo's FVD-FMNIST).

    python -m dfm_jax.eval --config=configs/demo.py --workdir=workdir/demo
    python -m dfm_jax.eval --config=configs/imagenet512.py --workdir=gs://bucket/in512 \\
        --num_samples=50000 --sweep="cfg=1.0,1.25,1.5;tau=0.7,0.9;steps=30+10,20+20" \\
        --metrics=fid,fdd,is --inception_weights=pt_inception-2015-12-05-6726825d.pth \\
        --dinov2_weights=dinov2_vitl14_pretrain.pth --reference=VIRTUAL_imagenet512.npz \\
        --fdd_reference=in512_dinov2.npz

What is evaluated comes from the evaluators the config declares (``config.evals``, see
``dfm_jax.config.EvalSettings``: metrics, sweep, samples, weights, references), so the
first command computes the demo's FD-FMNIST with no other flag; ``--evals`` picks some
of them, and the flags ``--metrics``, ``--sweep``, ``--num_samples``, ``--batch_size``,
``--seed``, ``--is_splits``, ``--inception_weights``, ``--dinov2_weights``,
``--reference`` and ``--fdd_reference`` override their fields. A config that declares
no evaluator gets FID, FDD and IS on 50,000 samples.

Sweep: ``key=v1,v2;key=...`` over ``cfg`` (guidance scale), ``tau`` (thresholds,
``/``-separated for three or more scales: ``0.7/0.9``), ``steps`` (per stage,
``+``-separated: ``30+10``; ``40`` for Flow Matching), ``solver`` (``euler``,
``heun``) and ``interval`` (guidance interval ``low-high``); omitted keys take the
config's ``sampling`` values. Metrics: ``fid``, ``is`` (Inception), ``fdd``
(DINOv2), ``pr`` (precision/recall on Inception features; needs reference features
or images, see below), ``fd_fmnist`` (the demo's classifier; no weights needed).
Video runs: ``fvd`` (I3D Kinetics-400 logits of the first 16 frames, the FVD reference's
network; ``--i3d_weights`` is the TF-Hub ``i3d-kinetics-400`` SavedModel directory),
``fid`` and ``fdd`` over every frame of every clip, ``fvd_fmnist`` (the video demo's
classifier); samples are decoded by the video autoencoder first.

Outputs under ``<workdir>/eval/``: ``results.csv`` and ``results.md`` (one row per
point: step, settings, NFE, metrics, generation and feature-extraction images/s,
seconds), TensorBoard scalars, and optionally ``<stem>_n<M>.npz`` (ADM format,
``--save_npz``; ``arr_0`` holds clips for video runs) and ``<stem>.png`` (``--save_png=K``;
a ``.gif`` of grids for video runs), where ``<stem>`` is
``samples_step<N>_<point>[_seed<S>][_init-<file>-<key>-<hash>]`` (the last part for an
imported ``--init`` checkpoint).
Running the same command again skips the points already in ``results.csv`` for
the same checkpoint step, number of samples, seed and metrics (the points the trainer's
own evaluations scored included).

Reference statistics (``--reference``): an ADM reference batch (``mu``/``sigma``
of Inception pool3, and ``arr_0`` images, used for precision/recall), or a file
written by this command from a dataset::

    python -m dfm_jax.eval --config=configs/imagenet512.py --compute_reference=in512_ref.npz \\
        --metrics=fid,fdd,pr --inception_weights=... --dinov2_weights=... \\
        --config.data.source=image_folder --config.data.dir=/data/imagenet \\
        --config.data.resolution=512 [--reference_split=train] [--num_samples=N]

which holds ``mu``/``sigma``/``num_samples`` (FID), ``fdd_mu``/``fdd_sigma``/
``fdd_num_samples`` (FDD), ``fvd_mu``/... (FVD) and ``pr_features``
(``--pr_reference_samples`` Inception features), so ``--reference=in512_ref.npz``
serves them all. Video configs read their centre clips (Kinetics, a video folder), or
decode a latent dataset with ``config.autoencoder``.

An official DFM-SiT checkpoint of the authors' PyTorch reimplementation (a ``.pt``
training checkpoint with "model" and "ema" state dicts) is evaluated with ``--init``
instead of a trained workdir (which then only receives the results)::

    python -m dfm_jax.eval --config=configs/imagenet512_dfm_sit.py --workdir=/tmp/dfm_sit \\
        --init=dfm_sit_imagenet_512px_1k_0400000.pt [--init_key=ema|model] ...

The Fashion-MNIST demo's report (FD-FMNIST of the samples next to train-split
images and noise)::

    python -m dfm_jax.eval --config=configs/demo.py --workdir=workdir/demo --demo_report

``--num_samples`` defaults to the evaluator's for sweeps, the whole split for
``--compute_reference`` and 500 for ``--demo_report``. The library behind this
command is ``dfm_jax.evaluation`` (``runner.run_declared`` / ``run_sweep``,
``references.compute_reference``, ``demo.demo_report``). On several hosts run the
same command on every host.
"""

from dfm_jax import console  # first: it sets TensorFlow's environment

# isort: split
from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import config as config_lib
from dfm_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_EVALS = flags.DEFINE_list(
    "evals", None, "Evaluators of config.evals to run (default: all declared)."
)
# Overrides of the declared evaluators' fields (dfm_jax.config.EvalSettings); unset flags
# keep the config's values.
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Samples per sweep point / reference images (all) / demo (500)."
)
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep spec, e.g. 'cfg=1.0,1.5;tau=0.9;steps=30+10'.")
_METRICS = flags.DEFINE_list(
    "metrics", None, "Comma-separated: fid,fdd,is,pr,fd_fmnist; video: fvd,fid,fdd,fvd_fmnist."
)
_INCEPTION = flags.DEFINE_string("inception_weights", None, "pytorch-fid Inception weights.")
_DINOV2 = flags.DEFINE_string("dinov2_weights", None, "DINOv2 weights (file or HF directory).")
_I3D = flags.DEFINE_string("i3d_weights", None, "TF-Hub i3d-kinetics-400 SavedModel dir (fvd).")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference .npz (ADM batch or ours).")
_FDD_REFERENCE = flags.DEFINE_string(
    "fdd_reference", None, "DINOv2 reference .npz (default: the fdd_* keys of --reference)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: config's).")
_SEED = flags.DEFINE_integer("seed", None, "Labels and noise seed (default: config.seed).")
_IS_SPLITS = flags.DEFINE_integer("is_splits", None, "Inception Score splits (10).")
# How to run.
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Save each point's samples as an ADM .npz.")
_SAVE_PNG = flags.DEFINE_integer(
    "save_png", 0, "Save each point's first N samples as a PNG grid (clips: an animated GIF)."
)
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
    "demo_report",
    False,
    "FD-FMNIST (video: FVD-FMNIST) of the samples vs real data and noise (the demos).",
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

#: The EvalSettings field each flag overrides.
_OVERRIDES = (
    (_NUM_SAMPLES, "num_samples"),
    (_SWEEP, "sweep"),
    (_METRICS, "metrics"),
    (_INCEPTION, "inception_weights"),
    (_DINOV2, "dinov2_weights"),
    (_I3D, "i3d_weights"),
    (_REFERENCE, "reference"),
    (_FDD_REFERENCE, "fdd_reference"),
    (_BATCH_SIZE, "batch_size"),
    (_SEED, "seed"),
    (_IS_SPLITS, "is_splits"),
)


def _evaluator_overrides() -> dict:
    """The EvalSettings fields that flags set (metrics as a tuple)."""
    out = {field: flag.value for flag, field in _OVERRIDES if flag.value is not None}
    if "metrics" in out:
        out["metrics"] = tuple(m.strip().lower() for m in out["metrics"] if m.strip())
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    if _INIT.value and (_COMPUTE_REFERENCE.value or _DEMO_REPORT.value):
        raise app.UsageError("--init evaluates sweeps only, not --compute_reference/--demo_report")
    settings = config_lib.read(_CONFIG.value)  # the one read of the config
    parallel.maybe_initialize_distributed()
    # Imports JAX backends only after distributed start-up.
    from dfm_jax.evaluation import demo, runner

    if _COMPUTE_REFERENCE.value:
        _compute_reference(settings)
    elif not _WORKDIR.value:
        raise app.UsageError("--workdir is required (unless --compute_reference)")
    elif _DEMO_REPORT.value:
        demo.demo_report(
            settings,
            _WORKDIR.value,
            num_samples=_NUM_SAMPLES.value or 500,
            step=_STEP.value,
            batch_size=_BATCH_SIZE.value,
            seed=_SEED.value,
            cache_dir=_FD_FMNIST_CACHE.value,
        )
    else:
        runner.run_declared(
            settings,
            _WORKDIR.value,
            names=_EVALS.value,
            overrides=_evaluator_overrides(),
            step=_STEP.value,
            save_npz=_SAVE_NPZ.value,
            save_png=_SAVE_PNG.value,
            fd_fmnist_cache=_FD_FMNIST_CACHE.value,
            init=_INIT.value,
            init_key=_INIT_KEY.value,
        )


def _compute_reference(settings) -> None:
    from dfm_jax.evaluation import evaluators, references, sweep

    metric_names = sweep.parse_metrics(_METRICS.value or ("fid", "fdd", "is"))
    with_reference = [m for m in metric_names if m in references.REFERENCE_METRICS]
    references.check_files(
        with_reference,
        weights={"inception": _INCEPTION.value, "dinov2": _DINOV2.value, "i3d": _I3D.value},
        need_reference=False,
    )
    extractors = evaluators.build_extractors(
        with_reference,
        inception_weights=_INCEPTION.value or "",
        dinov2_weights=_DINOV2.value or "",
        i3d_weights=_I3D.value or "",
    )
    counts = references.compute_reference(
        settings,
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
    console.run(main)

"""The demos' sample-quality report: FD-FMNIST (FVD-FMNIST for the video demo) of the
model next to real data and noise.

``make demo`` trains on Fashion-MNIST without internet, so there are no Inception
or DINOv2 weights; the demo measures FD-FMNIST instead (``dfm_jax.evaluation.fd_fmnist``: the
Frechet distance on features of a classifier trained on Fashion-MNIST, against the
statistics of the 10000 test images). A lone number means little, so the report
puts it between two anchors computed the same way, with the same number of images:

* the **train-split images** of ``config.data``: real data the classifier's test
  statistics did not see -- the best a perfect generator can expect at this sample
  count (the test images against themselves score 0 by construction, which is no
  anchor);
* **Gaussian noise** images (clipped to [-1, 1]): what an untrained model is near.

All images are quantised to uint8 first, as the evaluation does with samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.evaluation import fvd_fmnist
from dfm_jax.evaluation.evaluators import load_fd_fmnist, load_fvd_fmnist
from dfm_jax.evaluation.runner import run_sweep
from dfm_jax.utils import viz


def _quantized(images: np.ndarray) -> np.ndarray:
    return viz.from_uint8(viz.to_uint8(images))


def train_images(settings: config_lib.DataSettings, num_images: int, seed: int) -> np.ndarray:
    """A seeded random subset of the data's train split, float32 in [-1, 1]."""
    source = data.make_source(dataclasses.replace(settings, split="train"))
    rng = np.random.default_rng([seed, 0xD3E0])
    indices = np.sort(rng.choice(len(source), size=min(num_images, len(source)), replace=False))
    return np.stack([np.asarray(source[int(i)][data.IMAGE_KEY]) for i in indices])


def demo_report(
    settings: config_lib.Settings,
    workdir: str,
    *,
    num_samples: int = 500,
    step: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    fd=None,
    cache_dir: str | None = None,
    print_report: bool = True,
) -> dict[str, float]:
    """The demo metric of the checkpoint's samples next to its anchors.

    Images (``configs/demo.py``): FD-FMNIST of the samples, of train-split images and of
    noise. Clips (``configs/demo_video.py``): FVD-FMNIST of the samples, of held-out real
    clips, of those clips with their frames shuffled in time (a metric blind to motion
    would not tell them from real ones) and of noise. The model's number is a regular
    ``run_sweep`` point (the config's sampler settings), so it is also recorded in
    ``<workdir>/eval/`` (and a point the trainer's evaluator scored at the same step is
    reused).

    Args:
      settings: the demo's settings (32x32x1 images or (8, 32, 32, 1) clips).
      workdir: the trained run's workdir.
      num_samples: images (clips) of each kind.
      step: the checkpoint step (default: the newest).
      batch_size: generation batch (see ``EvalSettings``).
      seed: default ``config.seed``.
      fd: a ``fd_fmnist.FdFmnist`` (images) or ``fvd_fmnist.FvdFmnist`` (clips); default:
        the cached one in ``cache_dir``, trained on first use (minutes on a CPU).
      print_report: print the comparison.

    Returns:
      ``{"model", <anchors>}`` values (images: ``train_images``, ``noise``; clips:
      ``real_clips``, ``shuffled_frames``, ``noise``), with ``step``, ``num_samples``,
      ``metric`` and the classifier's ``test_accuracy`` (class accuracy for clips).
    """
    video = settings.is_video
    metric = "fvd_fmnist" if video else "fd_fmnist"
    if fd is None:
        fd = (load_fvd_fmnist if video else load_fd_fmnist)(settings.data, cache_dir)
    seed = settings.seed if seed is None else seed
    evaluator = config_lib.EvalSettings(
        metrics=(metric,), num_samples=num_samples, batch_size=batch_size, seed=seed
    )
    rows = run_sweep(
        settings, workdir, evaluator, name="demo", step=step, print_summary=False, **{metric: fd}
    )
    (row,) = rows
    anchors = (
        _clip_anchors(fd, num_samples, seed)
        if video
        else _image_anchors(settings, fd, num_samples, seed)
    )
    report = {
        "metric": metric,
        "model": float(row[metric]),
        **anchors,
        "step": int(row["step"]),
        "num_samples": num_samples,
        "test_accuracy": float(fd.class_accuracy if video else fd.test_accuracy),
    }
    if print_report:
        print(format_report(report, row))
    return report


def _noise(shape, seed: int) -> np.ndarray:
    """The noise anchor (``fvd_fmnist.gaussian_noise``, images or clips), quantised."""
    return _quantized(fvd_fmnist.gaussian_noise(shape, seed))


def _image_anchors(settings: config_lib.Settings, fd, num_samples: int, seed: int) -> dict:
    real = _quantized(train_images(settings.data, num_samples, seed))
    return {"train_images": fd.distance(real), "noise": fd.distance(_noise(real.shape, seed))}


def _clip_anchors(fvd, num_samples: int, seed: int) -> dict:
    real = _quantized(fvd.held_out_clips(num_samples))
    return {
        "real_clips": fvd.distance(real),
        "shuffled_frames": fvd.distance(fvd_fmnist.shuffle_frames(real, seed)),
        "noise": fvd.distance(_noise(real.shape, seed)),
    }


_LABELS = {
    "train_images": "train-split images (real data)",
    "real_clips": "held-out real clips",
    "shuffled_frames": "real clips, frames shuffled in time",
    "noise": "Gaussian noise",
}


def format_report(report: dict[str, float], row: dict[str, str]) -> str:
    """The printed comparison."""
    tau = f", tau {row['tau']}" if row.get("tau") else ""
    setting = f"cfg {row['cfg']}{tau}, steps {row['steps']}, {row['solver']}"
    entries = [(f"model samples (step {report['step']}; {setting})", report["model"])]
    entries += [(label, report[key]) for key, label in _LABELS.items() if key in report]
    width = max(len(label) for label, _ in entries) + 2
    accuracy = f"{100 * report['test_accuracy']:.1f}%"
    if report["metric"] == "fvd_fmnist":
        header = (
            f"FVD-FMNIST, {report['num_samples']} clips each (lower is better): the Frechet "
            "distance on features of a Moving Fashion-MNIST video classifier (garment "
            f"{accuracy}, direction of motion) to held-out test clips"
        )
        footer = "Real clips are the floor; shuffling their frames must cost a lot (motion)."
    else:
        header = (
            f"FD-FMNIST, {report['num_samples']} images each (lower is better): the Frechet "
            f"distance on features of a Fashion-MNIST classifier ({accuracy} test accuracy) "
            "to the 10000 test images"
        )
        footer = (
            "The test images score 0 against themselves by construction; the train images "
            "are the real-data floor at this sample count."
        )
    lines = [f"  {label + ':':<{width}}{value:10.3f}" for label, value in entries]
    return "\n".join([header, *lines, footer])

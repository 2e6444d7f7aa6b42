"""The demo's sample-quality report: FD-FMNIST of the model next to real data and noise.

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
from dfm_jax.evaluation.evaluators import load_fd_fmnist
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
    """FD-FMNIST of the checkpoint's samples, of train-split images and of noise.

    The model's number is a regular ``run_sweep`` point (metric ``fd_fmnist``, the
    config's sampler settings), so it is also recorded in ``<workdir>/eval/`` (and the
    point that the trainer's FD-FMNIST evaluator scored at the same step is reused).

    Args:
      settings: the demo's settings (32x32x1 images; ``configs/demo.py``).
      workdir: the trained run's workdir.
      num_samples: images of each kind.
      step: the checkpoint step (default: the newest).
      batch_size: generation batch (see ``EvalSettings``).
      seed: default ``config.seed``.
      fd: a ``dfm_jax.evaluation.fd_fmnist.FdFmnist`` (default: the cached one in ``cache_dir``,
        trained on first use, a few minutes on a CPU).
      print_report: print the comparison.

    Returns:
      ``{"model", "train_images", "noise"}`` FD-FMNIST values, with ``step``,
      ``num_samples`` and the classifier's ``test_accuracy``.
    """
    fd = fd if fd is not None else load_fd_fmnist(settings.data, cache_dir)
    seed = settings.seed if seed is None else seed
    evaluator = config_lib.EvalSettings(
        metrics=("fd_fmnist",), num_samples=num_samples, batch_size=batch_size, seed=seed
    )
    rows = run_sweep(
        settings, workdir, evaluator, name="demo", step=step, fd_fmnist=fd, print_summary=False
    )
    (row,) = rows
    real = _quantized(train_images(settings.data, num_samples, seed))
    noise_rng = np.random.default_rng([seed, 0x0153])
    noise = _quantized(np.clip(noise_rng.standard_normal(real.shape), -1.0, 1.0))
    report = {
        "model": float(row["fd_fmnist"]),
        "train_images": fd.distance(real),
        "noise": fd.distance(noise),
        "step": int(row["step"]),
        "num_samples": num_samples,
        "test_accuracy": float(fd.test_accuracy),
    }
    if print_report:
        print(format_report(report, row))
    return report


def format_report(report: dict[str, float], row: dict[str, str]) -> str:
    """The printed comparison."""
    tau = f", tau {row['tau']}" if row.get("tau") else ""
    setting = f"cfg {row['cfg']}{tau}, steps {row['steps']}, {row['solver']}"
    entries = [
        (f"model samples (step {report['step']}; {setting})", report["model"]),
        ("train-split images (real data)", report["train_images"]),
        ("Gaussian noise", report["noise"]),
    ]
    width = max(len(label) for label, _ in entries) + 2
    return "\n".join(
        [
            f"FD-FMNIST, {report['num_samples']} images each (lower is better): the Frechet "
            "distance on features of a Fashion-MNIST classifier "
            f"({100 * report['test_accuracy']:.1f}% test accuracy) to the 10000 test images",
            *(f"  {label + ':':<{width}}{value:10.3f}" for label, value in entries),
            "The test images score 0 against themselves by construction; the train images are "
            "the real-data floor at this sample count.",
        ]
    )

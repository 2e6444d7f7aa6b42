"""One sweep point: class-balanced labels -> samples -> features -> metric values.

``make_sampler`` compiles, once per point, the program that generates a batch of
samples from the EMA parameters, decodes them to pixels and quantises them to uint8.
``evaluate_point`` runs it batch by batch on the model's mesh (labels and sample ids as
batch-sharded global arrays, one noise key per batch), runs the ``FeatureFunction`` and
streams each process's rows into fresh metric accumulators; optionally it also streams
the samples into an ADM ``.npz`` and keeps the first few for a PNG grid.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from dfm_jax import parallel
from dfm_jax.evaluation import references, results
from dfm_jax.evaluation.extraction import FeatureFunction
from dfm_jax.evaluation.features import METRICS
from dfm_jax.evaluation.scores import FrechetScore, InceptionScoreStream, PrecisionRecallScore
from dfm_jax.evaluation.sweep import SweepPoint
from dfm_jax.method import generation
from dfm_jax.training import setup as setup_lib
from dfm_jax.utils import viz

#: Model space -> pixels in [-1, 1]: a pytree callable (a ``Codec`` or an
#: ``decoding.FunctionDecoder``), passed to the jitted sampler as an argument.
Decode = Callable[[jax.Array], jax.Array]


def class_balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """``num_samples`` int32 labels, each class ``num_samples // num_classes`` times.

    The remainder goes to ``num_samples % num_classes`` distinct classes drawn with
    ``seed``; the labels are then shuffled with ``seed`` (the Inception Score splits
    the samples in order, so every split must see every class).
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(
            f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}"
        )
    rng = np.random.default_rng([seed, 0xE7A1])
    counts = np.full(num_classes, num_samples // num_classes)
    counts[rng.permutation(num_classes)[: num_samples % num_classes]] += 1
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), counts)
    return rng.permutation(labels)


@dataclasses.dataclass
class PointContext:
    """What every sweep point of one evaluator shares (built once, ``evaluators.Evaluator``).

    Attributes:
      setup: the run's setup (method, mesh).
      features: the feature networks as one program on the mesh.
      make_scores: a factory of fresh metric accumulators.
      labels: ``(num_samples,)`` int32 class-balanced labels.
      batch_size: global generation batch (divisible by the data-parallel devices).
      seed: batch b draws its noise from ``fold_in(key(seed), b)``: every point and every
        checkpoint sees the same noise.
      decode: model space -> pixels in [-1, 1] (a jit argument).
      image_shape: one decoded sample, ``(H, W, C)``.
      eval_dir: where sample files go.
      init: the imported checkpoint evaluated (``results.init_text``; empty for the
        workdir's checkpoints): part of the sample files' names.
    """

    setup: setup_lib.Setup
    features: FeatureFunction
    make_scores: Callable[[], list]
    labels: np.ndarray
    batch_size: int
    seed: int
    decode: Decode
    image_shape: tuple[int, ...]
    eval_dir: str
    init: str = ""


def make_score_factory(
    metric_names,
    extractors,
    function,
    *,
    num_samples,
    is_splits,
    reference,
    fdd_reference,
    fd_fmnist,
    batch_size,
    fvd_fmnist=None,
):
    """Loads every reference once; returns a function making fresh accumulators."""
    loaded = {}
    for name in metric_names:
        metric = METRICS[name]
        dim = extractors[metric.extractor].outputs[metric.output]
        if name in ("fid", "fdd", "fvd"):
            loaded[name] = references.load_frechet_reference(name, dim, reference, fdd_reference)
        elif name in ("fd_fmnist", "fvd_fmnist"):
            demo = fd_fmnist if name == "fd_fmnist" else fvd_fmnist
            loaded[name] = (demo.reference.mean, demo.reference.covariance)
        elif name == "pr":
            ref = references.load_pr_reference(reference, dim)
            if ref.dtype == np.uint8:
                logging.info("Extracting Inception features of %d reference images", len(ref))
                ref = references.extract_host_images(function, ref, batch_size, "inception/pool3")
            loaded[name] = ref
        elif name == "is":
            loaded[name] = dim

    def make_scores():
        scores = []
        for name in metric_names:
            metric = METRICS[name]
            if name == "is":
                score = InceptionScoreStream(metric, num_samples, loaded[name], is_splits)
            elif name == "pr":
                score = PrecisionRecallScore(metric, loaded[name])
            else:
                score = FrechetScore(metric, *loaded[name])
            scores.append(score)
        return scores

    make_scores()  # validates the IS splits before any work
    return make_scores


def make_sampler(ctx: PointContext, point: SweepPoint) -> setup_lib.MeshBound:
    """The compiled ``(params, decode, key, labels) -> uint8 samples`` of one sweep point."""
    generate = generation.make_generate_fn(ctx.setup.method, point)

    def sample(params, decode, key, labels):
        return viz.to_uint8(decode(generate(params, key, labels)))

    return ctx.setup.bind(jax.jit(sample, out_shardings=ctx.features.sharding))


class _SampleFiles:
    """The optional ADM ``.npz`` of all samples (``arr_0`` holds clips for video runs) and
    the sheet of the first ones: a PNG grid, or for clips a GIF of grids (process 0)."""

    def __init__(self, ctx: PointContext, name: str, step: int, save_npz: bool, save_png: int):
        self.ctx, self.save_npz, self.save_png = ctx, save_npz, save_png
        # Another --seed or --init keeps its own files (``results.sample_file_stem``).
        stem = results.sample_file_stem(step, name, ctx.seed, ctx.init)
        self.sheet_stem = os.path.join(ctx.eval_dir, stem)
        self.main = jax.process_index() == 0
        self.npz = None
        if save_npz and self.main:
            count = len(ctx.labels)
            path = os.path.join(ctx.eval_dir, f"{stem}_n{count}.npz")
            self.npz = results.AdmNpzWriter(path, ctx.image_shape, ctx.labels)
        self.kept: list[np.ndarray] = []

    def add(self, images: jax.Array, valid: int) -> None:
        if not (self.save_npz or len(self.kept) * self.ctx.batch_size < self.save_png):
            return
        host = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:valid]
        if self.npz is not None:
            self.npz.write(host)
        self.kept.append(host)

    def close(self) -> None:
        if self.npz is not None:
            self.npz.close()
            logging.info("Saved %d samples to %s", len(self.ctx.labels), self.npz.path)
        if self.save_png and self.main:
            results.save_sample_sheet(self.sheet_stem, np.concatenate(self.kept)[: self.save_png])

    def abort(self) -> None:
        if self.npz is not None:
            self.npz.abort()


def evaluate_point(
    ctx: PointContext,
    point: SweepPoint,
    sampler: setup_lib.MeshBound,
    params: Any,
    step: int,
    *,
    save_npz: bool = False,
    save_png: int = 0,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Generates, extracts and scores one sweep point; returns its metric values and speeds.

    Speeds leave out the first batch (it compiles) when there is more than one.
    ``progress_bar`` shows a tqdm bar on process 0 (off between training steps).
    """
    scores = ctx.make_scores()
    files = _SampleFiles(ctx, point.name, step, save_npz, save_png)
    num_samples, batch_size = len(ctx.labels), ctx.batch_size
    num_batches = -(-num_samples // batch_size)
    timings = np.zeros((num_batches, 2))
    start_time = time.perf_counter()
    progress = tqdm(
        total=num_samples,
        desc=point.name,
        unit="img",
        disable=not progress_bar or jax.process_index() != 0,
    )
    try:
        for b in range(num_batches):
            start = b * batch_size
            valid = min(batch_size, num_samples - start)
            host = parallel.pad_batch(
                {"label": ctx.labels[start : start + valid]}, batch_size, first_id=start
            )
            t0 = time.perf_counter()
            labels = parallel.global_from_host(host["label"], ctx.features.sharding)
            key = jax.random.fold_in(jax.random.key(ctx.seed), b)
            images = sampler(params, ctx.decode, key, labels).block_until_ready()
            t1 = time.perf_counter()
            ids = parallel.global_from_host(host["id"], ctx.features.sharding)
            row_ids, blocks = ctx.features.local_rows(images, ids)
            for score in scores:
                score.update(row_ids, blocks[f"{score.metric.extractor}/{score.metric.output}"])
            timings[b] = (t1 - t0, time.perf_counter() - t1)
            files.add(images, valid)
            progress.update(valid)
            progress.set_postfix(gen_img_s=f"{valid / timings[b, 0]:.1f}")
        values = {name: v for score in scores for name, v in score.result().items()}
        files.close()
    except BaseException:
        files.abort()
        raise
    finally:
        progress.close()
    measured = timings[1:] if num_batches > 1 else timings
    images_measured = num_samples - batch_size if num_batches > 1 else num_samples
    values["gen_images_per_s"] = images_measured / max(measured[:, 0].sum(), 1e-9)
    values["feature_images_per_s"] = images_measured / max(measured[:, 1].sum(), 1e-9)
    values["seconds"] = time.perf_counter() - start_time
    return values

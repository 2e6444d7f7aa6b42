"""One sweep point: class-balanced labels -> samples -> features -> metric values.

``evaluate_point`` generates ``num_samples`` samples batch by batch on the model's
mesh (labels and sample ids as batch-sharded global arrays, one noise key per
batch), quantises them to uint8, runs the ``FeatureFunction`` and streams each
process's rows into fresh metric accumulators; optionally it also streams the
samples into an ADM ``.npz`` and keeps the first few for a PNG grid.
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

from dfm_jax.evaluation import references, results
from dfm_jax.evaluation.extraction import FeatureFunction, global_from_host, to_uint8
from dfm_jax.evaluation.features import METRICS
from dfm_jax.evaluation.scores import FrechetScore, InceptionScoreStream, PrecisionRecallScore
from dfm_jax.evaluation.sweep import SweepPoint
from dfm_jax.method import generation as generate_lib
from dfm_jax.training import setup as setup_lib

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
    """What every sweep point of one run shares."""

    setup: setup_lib.Setup
    params: Any
    features: FeatureFunction
    make_scores: Callable[[], list]
    labels: np.ndarray
    batch_size: int
    seed: int
    decode: Decode
    image_shape: tuple[int, ...]
    eval_dir: str
    step: int
    save_npz: bool
    save_png: int


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
):
    """Loads every reference once; returns a function making fresh accumulators."""
    loaded = {}
    for name in metric_names:
        metric = METRICS[name]
        dim = extractors[metric.extractor].outputs[metric.output]
        if name in ("fid", "fdd"):
            loaded[name] = references.load_frechet_reference(name, dim, reference, fdd_reference)
        elif name == "fd_fmnist":
            loaded[name] = (fd_fmnist.reference.mean, fd_fmnist.reference.covariance)
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


def evaluate_point(ctx: PointContext, point: SweepPoint) -> dict[str, Any]:
    """Generates, extracts and scores one sweep point; returns its metric values and speeds."""
    setup, batch_size = ctx.setup, ctx.batch_size
    generate = generate_lib.make_generate_fn(
        setup.model,
        setup.step_config.decomposition,
        setup.example_shape,
        point.sampling_config(setup.config.sampling),
        null_label=setup.num_classes,
    )
    sharding = ctx.features.sharding

    def sample(params, decode, key, labels):
        return to_uint8(decode(generate(params, key, labels)))

    sample_fn = setup_lib.MeshBound(
        jax.jit(sample, out_shardings=sharding), setup.mesh, setup_lib._rules(setup)
    )
    scores = ctx.make_scores()
    num_samples = len(ctx.labels)
    num_batches = -(-num_samples // batch_size)
    is_main = jax.process_index() == 0
    npz = None
    if ctx.save_npz and is_main:
        path = os.path.join(ctx.eval_dir, f"samples_step{ctx.step}_{point.name}_n{num_samples}.npz")
        npz = results.AdmNpzWriter(path, ctx.image_shape, ctx.labels)
    grid_images = []
    base_key = jax.random.key(ctx.seed)
    timings = np.zeros((num_batches, 2))
    start_time = time.perf_counter()
    progress = tqdm(total=num_samples, desc=point.name, unit="img", disable=not is_main)
    try:
        for b in range(num_batches):
            start = b * batch_size
            valid = min(batch_size, num_samples - start)
            ids = np.full(batch_size, -1, np.int32)
            ids[:valid] = np.arange(start, start + valid)
            labels = np.zeros(batch_size, np.int32)
            labels[:valid] = ctx.labels[start : start + valid]
            t0 = time.perf_counter()
            images = sample_fn(
                ctx.params,
                ctx.decode,
                jax.random.fold_in(base_key, b),
                global_from_host(labels, sharding),
            )
            images.block_until_ready()
            t1 = time.perf_counter()
            row_ids, blocks = ctx.features.local_rows(images, global_from_host(ids, sharding))
            for score in scores:
                score.update(row_ids, blocks[f"{score.metric.extractor}/{score.metric.output}"])
            timings[b] = (t1 - t0, time.perf_counter() - t1)
            if ctx.save_npz or len(grid_images) * batch_size < ctx.save_png:
                host = np.asarray(multihost_utils.process_allgather(images, tiled=True))[:valid]
                if npz is not None:
                    npz.write(host)
                grid_images.append(host)
            progress.update(valid)
            progress.set_postfix(gen_img_s=f"{valid / timings[b, 0]:.1f}")
        values = {}
        for score in scores:
            values.update(score.result())
        if npz is not None:
            npz.close()
            logging.info("Saved %d samples to %s", num_samples, npz.path)
    except BaseException:
        if npz is not None:
            npz.abort()
        raise
    finally:
        progress.close()
    if ctx.save_png and is_main:
        path = os.path.join(ctx.eval_dir, f"samples_step{ctx.step}_{point.name}.png")
        results.save_png_grid(path, np.concatenate(grid_images)[: ctx.save_png])
    # The first batch compiles; measure speed on the others when there are any.
    measured = timings[1:] if num_batches > 1 else timings
    images_measured = num_samples - batch_size if num_batches > 1 else num_samples
    values["gen_images_per_s"] = images_measured / max(measured[:, 0].sum(), 1e-9)
    values["feature_images_per_s"] = images_measured / max(measured[:, 1].sum(), 1e-9)
    values["seconds"] = time.perf_counter() - start_time
    return values

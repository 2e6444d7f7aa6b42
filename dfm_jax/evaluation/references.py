"""Reference statistics: checking, loading and computing them.

One ``.npz`` serves every metric; keys by metric:

=========  =======================================  =========================================
metric     keys                                     notes
=========  =======================================  =========================================
fid        ``mu`` (2048,), ``sigma``, ``num_samples``  ADM reference batches have these too
fdd        ``fdd_mu`` (D,), ``fdd_sigma``,           or ``mu``/``sigma`` of a separate file
           ``fdd_num_samples``                      given as ``--fdd_reference``
fvd        ``fvd_mu`` (400,), ``fvd_sigma``,         I3D of clips (video runs; fid and fdd
           ``fvd_num_samples``                      are then per frame)
pr         ``pr_features`` (M, 2048) float32        or ADM's ``arr_0`` reference images,
                                                    whose Inception features are computed
is         (none)                                    no reference
fd_fmnist  (none)                                    the FD-FMNIST cache's test statistics
fvd_fmnist (none)                                    the FVD-FMNIST cache's test-clip statistics
=========  =======================================  =========================================

``compute_reference`` writes such a file from a dataset (``config.data``), so
``--reference=OUT.npz`` then works for fid, fdd and pr at once.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.evaluation import metrics
from dfm_jax.evaluation.extraction import FeatureFunction
from dfm_jax.evaluation.features import METRICS, FeatureExtractor, needed_extractors
from dfm_jax.evaluation.scores import allgather_rows, frame_rows
from dfm_jax.utils import files, viz

REFERENCE_METRICS = ("fid", "fdd", "fvd", "pr")
_WEIGHT_FLAGS = {
    "inception": "--inception_weights",
    "dinov2": "--dinov2_weights",
    "i3d": "--i3d_weights",
}


def _weights_help(extractor: str) -> str:
    if extractor == "inception":
        from dfm_jax.weights import inception

        return f"pytorch-fid's FID Inception weights, {inception.WEIGHTS_URL}"
    if extractor == "i3d":
        from dfm_jax.weights import i3d

        return f"the I3D SavedModel directory of {i3d.HUB_HANDLE} (or {i3d.KAGGLE_MODEL})"
    from dfm_jax.weights import dinov2

    return f"DINOv2 weights, e.g. ViT-L/14 {dinov2.OFFICIAL_URL} (or {dinov2.HF_URL})"


def check_files(
    metric_names: Sequence[str],
    *,
    weights: Mapping[str, str | None],
    reference: str | None = None,
    fdd_reference: str | None = None,
    injected: Sequence[str] = (),
    need_reference: bool = True,
) -> None:
    """Raises ``FileNotFoundError`` listing every needed file that is unset or missing.

    Args:
      metric_names: the metrics to compute.
      weights: extractor name ("inception", "dinov2") -> weights path or None.
      reference, fdd_reference: the reference files (see the module docstring).
      injected: extractors supplied ready-made (their weights are not needed).
      need_reference: False when computing references (no reference is read).
    """
    problems = []
    for extractor in sorted(needed_extractors(metric_names)):
        if extractor not in _WEIGHT_FLAGS or extractor in injected:
            continue
        flag, path = _WEIGHT_FLAGS[extractor], weights.get(extractor)
        users = [m for m in metric_names if METRICS[m].extractor == extractor]
        if not path:
            problems.append(f"{flag} is required for {users}: {_weights_help(extractor)}")
        elif not os.path.exists(path):
            problems.append(f"{flag}={path} does not exist; get {_weights_help(extractor)}")
    files: dict[tuple[str, str | None], list[str]] = {}
    for name in metric_names if need_reference else ():
        if name in REFERENCE_METRICS:
            use_fdd = name == "fdd" and fdd_reference
            flag = ("--fdd_reference", fdd_reference) if use_fdd else ("--reference", reference)
            files.setdefault(flag, []).append(name)
    for (flag, path), users in files.items():
        if not path:
            problems.append(
                f"{flag} is required for {users}: an .npz of reference statistics (an ADM "
                "reference batch, or one written by --compute_reference)"
            )
        elif not os.path.exists(path):
            problems.append(f"{flag}={path} does not exist")
    if problems:
        raise FileNotFoundError("missing evaluation inputs:\n  " + "\n  ".join(problems))


def _npz_keys(path: str) -> list[str]:
    with np.load(path, allow_pickle=False) as npz:
        return list(npz.files)


def _check_dim(name: str, mu: np.ndarray, dim: int, path: str) -> None:
    if mu.shape[0] != dim:
        raise ValueError(
            f"{name} reference {path} holds {mu.shape[0]}-dimensional statistics but the "
            f"feature extractor gives {dim}; use statistics of the same network"
        )


def load_frechet_reference(
    name: str, dim: int, reference: str | None, fdd_reference: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of metric ``name`` ("fid", "fdd" or "fvd"), checked against ``dim``."""
    if name == "fid":
        mu, sigma = metrics.load_reference_statistics(reference)
        _check_dim(name, mu, dim, reference)
        return mu, sigma
    path = (fdd_reference if name == "fdd" else None) or reference
    keys = _npz_keys(path)
    if f"{name}_mu" in keys:
        mu, sigma = metrics.load_reference_statistics(path, (f"{name}_mu", f"{name}_sigma"))
    elif name == "fdd" and fdd_reference:
        mu, sigma = metrics.load_reference_statistics(path)
    else:
        network = {"fdd": "DINOv2", "fvd": "I3D"}[name]
        separate = "pass --fdd_reference with DINOv2 mu/sigma, or " if name == "fdd" else ""
        raise ValueError(
            f"{path} has no {network} statistics ('{name}_mu'/'{name}_sigma'; keys: "
            f"{sorted(keys)}); {separate}pass a --reference written by --compute_reference "
            f"with {name} in --metrics"
        )
    _check_dim(name, mu, dim, path)
    return mu, sigma


def load_pr_reference(reference: str, dim: int) -> np.ndarray:
    """Reference features for precision/recall: ``pr_features`` or ``arr_0`` images.

    Returns float32 ``(M, dim)`` features, or uint8 ``(M, H, W, C)`` images (ADM
    reference batches) whose features the caller must extract.
    """
    with np.load(reference, allow_pickle=False) as npz:
        if "pr_features" in npz.files:
            features = np.asarray(npz["pr_features"], np.float32)
            if features.ndim != 2 or features.shape[1] != dim:
                raise ValueError(
                    f"{reference}: pr_features {features.shape} must be (M, {dim}) Inception "
                    "pool3 features"
                )
            return features
        if "arr_0" in npz.files:
            images = np.asarray(npz["arr_0"])
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{reference}: arr_0 must be uint8 (M, H, W, C) images, got "
                    f"{images.dtype} {images.shape}"
                )
            return images
        raise ValueError(
            f"{reference} has neither 'pr_features' nor ADM reference images 'arr_0' (keys: "
            f"{sorted(npz.files)}); precision/recall needs reference features: compute them "
            "with --compute_reference and pr in --metrics"
        )


def extract_host_images(
    function: FeatureFunction, images: np.ndarray, batch_size: int, output: str
) -> np.ndarray:
    """Features ``output`` of uint8 host images every process holds, in order, float32."""
    rows = []
    for start in range(0, len(images), batch_size):
        block = images[start : start + batch_size]
        host = parallel.pad_batch({"image": block}, batch_size, first_id=start)
        batch = {k: parallel.global_from_host(v, function.sharding) for k, v in host.items()}
        local_ids, blocks = function.local_rows(batch["image"], batch["id"])
        rows.append((local_ids, blocks[output]))
    # Ids (< 2**24) travel exactly as float32 rows.
    ids = allgather_rows(np.concatenate([r[0] for r in rows])[:, None].astype(np.float32))
    features = allgather_rows(np.concatenate([r[1] for r in rows]))
    return features[np.argsort(ids[:, 0], kind="stable")]


def compute_reference(
    settings: config_lib.Settings,
    output: str,
    metric_names: Sequence[str],
    extractors: Mapping[str, FeatureExtractor],
    *,
    split: str | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    pr_samples: int = 10_000,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, int]:
    """Reference statistics of a dataset split, written to ``output`` (keys above).

    Reads ``config.data`` (with ``split`` if given) through ``data.make_source`` in a
    seeded shuffled order, images quantised to uint8 as samples are. Video sources give
    their centre clips (unless ``data.clip`` says otherwise); a latent dataset is decoded
    with ``config.autoencoder`` first (its weights are then required).

    Args:
      settings: the experiment's settings (``data``, ``mesh``, ``seed``, ``batch_size``).
      output: the ``.npz`` to write.
      metric_names: metrics whose references to compute (fid, fdd, pr; others are
        skipped: they need no reference or bring their own).
      extractors: name -> extractor for the metrics' networks.
      split: the dataset split (default ``config.data.split``).
      num_samples: how many images (default: the whole split).
      batch_size: global batch (default ``config.batch_size``).
      pr_samples: reference features kept for precision/recall.
      mesh: defaults to the one ``config.mesh`` describes.

    Returns:
      Metric -> number of images its reference covers.
    """
    names = _reference_metrics(metric_names)
    mesh = mesh or parallel.create_mesh(settings.mesh.as_dict())
    source, decode = _pixel_source(settings, split, mesh)
    batch_size = int(batch_size or settings.batch_size)
    dp = parallel.data_parallel_size(mesh)
    if batch_size % dp:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {dp} data-parallel devices"
        )
    function = FeatureFunction(extractors, needed_extractors(names), mesh)
    example = jax.ShapeDtypeStruct((1, *source.example_shape), np.float32)
    pixel_shape = tuple(jax.eval_shape(decode, example).shape[1:])
    function.check_input(pixel_shape)
    dims = {m: extractors[METRICS[m].extractor].outputs[METRICS[m].output] for m in names}
    reference = _ReferenceAccumulator(names, dims, pr_samples)
    pixels = _Pixels(source, decode, pixel_shape)
    for blocks in _feature_blocks(function, pixels, batch_size, settings.seed, num_samples):
        reference.update(blocks)
    arrays, counts = reference.result()
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files.atomic_write_bytes(output, buffer.getvalue())
        logging.info("Wrote reference statistics %s to %s", counts, output)
    return counts


def _reference_metrics(metric_names: Sequence[str]) -> list[str]:
    """The metrics of ``metric_names`` that have a reference to compute (fid, fdd, pr)."""
    names = [m for m in metric_names if m in REFERENCE_METRICS]
    skipped = sorted(set(metric_names) - set(names))
    if skipped:
        logging.info(
            "No reference to compute for %s (IS needs none; FD-FMNIST has its own)", skipped
        )
    if not names:
        raise ValueError(f"none of {list(metric_names)} uses reference statistics; use fid/fdd/pr")
    return names


def _pixel_source(
    settings: config_lib.Settings, split: str | None, mesh: jax.sharding.Mesh
) -> tuple[data.Source, Callable[[np.ndarray], np.ndarray]]:
    """The source of the data settings (``split`` if given; video sources' centre clips)
    and the (traceable) function from its examples to pixels in [-1, 1]: the identity,
    or the autoencoder's decoder for a latent dataset."""
    fields = settings.data
    fields = dataclasses.replace(fields, split=split or fields.split, clip=fields.clip or "center")
    source = data.make_source(fields)
    if not isinstance(source, data.ArrayRecordLatentSource):
        return source, lambda examples: examples
    from dfm_jax.training import decoding

    decoding.check_matches_dataset(settings.autoencoder, source)
    codec = decoding.load_codec(settings.autoencoder, mesh, required=True)
    return source, codec.decode


@dataclasses.dataclass(frozen=True)
class _Pixels:
    """A source, the function from its examples to pixels, and the pixels' shape."""

    source: data.Source
    decode: Callable[[Any], Any]
    shape: tuple[int, ...]


def _feature_blocks(
    function: FeatureFunction,
    pixels: _Pixels,
    batch_size: int,
    seed: int,
    num_samples: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's feature rows (``{"<extractor>/<output>": (n, D)}``) of each batch
    of ``pixels.source`` (examples turned into pixels by ``pixels.decode``).

    Every process reads its shard of the source (seeded shuffle) and takes its share
    of the ``num_samples`` images (default: all, up to a multiple of the process
    count); each local batch is padded to ``batch_size / process_count`` rows (id -1)
    and the processes run the same number of global batches.
    """
    processes, process = jax.process_count(), jax.process_index()
    source = pixels.source
    per_process = len(source) // processes
    total = min(int(num_samples or per_process * processes), per_process * processes)
    limit = total // processes + (process < total % processes)
    local_batch = data.local_batch_size(batch_size, processes)
    largest_limit = -(-total // processes)
    num_batches = -(-largest_limit // local_batch)  # the same on every process
    dataset = data.make_dataset(
        source,
        global_batch_size=batch_size,
        seed=seed,
        num_epochs=1,
        shuffle=True,
        drop_remainder=False,
    )
    iterator = iter(dataset)
    seen = 0
    for _ in tqdm(range(num_batches), desc="reference", unit="batch", disable=process != 0):
        images = np.zeros((0, *pixels.shape), np.uint8)
        if limit - seen > 0:
            examples = next(iterator)["image"][: min(local_batch, limit - seen)]
            images = np.asarray(viz.to_uint8(pixels.decode(examples)))
        host = parallel.pad_batch({"image": images}, local_batch, first_id=seen)
        seen += len(images)
        batch = parallel.make_global_batch(host, function.mesh, parallel.BATCH_AXES)
        yield function.local_rows(batch["image"], batch["id"])[1]


class _ReferenceAccumulator:
    """Streams feature blocks into the references of ``names`` (fid, fdd, pr).

    fid/fdd keep float64 ``metrics.RunningStatistics``; pr keeps the first
    ``pr_samples`` Inception pool3 rows (each process up to its share).
    """

    def __init__(self, names: Sequence[str], dims: Mapping[str, int], pr_samples: int):
        self.names, self.dims, self.pr_samples = list(names), dims, pr_samples
        self.stats = {m: metrics.RunningStatistics(dims[m]) for m in names if m != "pr"}
        self.pr_rows: list[np.ndarray] = []
        self.pr_limit = -(-pr_samples // jax.process_count())

    def update(self, blocks: Mapping[str, np.ndarray]) -> None:
        for name, stats in self.stats.items():
            metric = METRICS[name]
            stats.update(frame_rows(blocks[f"{metric.extractor}/{metric.output}"]))
        if "pr" in self.names and sum(len(r) for r in self.pr_rows) < self.pr_limit:
            self.pr_rows.append(frame_rows(blocks["inception/pool3"]))

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """``(arrays of the .npz, metric -> images covered)``; a collective over processes."""
        arrays: dict[str, np.ndarray] = {}
        counts = {}
        for name, local in self.stats.items():
            gathered = metrics.gather_across_processes(local)
            prefix = "" if name == "fid" else f"{name}_"
            arrays[f"{prefix}mu"] = gathered.mean
            arrays[f"{prefix}sigma"] = gathered.covariance
            arrays[f"{prefix}num_samples"] = np.int64(gathered.count)
            counts[name] = gathered.count
        if "pr" in self.names:
            empty = np.zeros((0, self.dims["pr"]), np.float32)
            local = np.concatenate(self.pr_rows)[: self.pr_limit] if self.pr_rows else empty
            arrays["pr_features"] = allgather_rows(local)[: self.pr_samples]
            counts["pr"] = len(arrays["pr_features"])
        return arrays, counts

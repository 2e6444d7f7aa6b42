"""`run(PrepareOptions)`: images -> latent ArrayRecord shards + metadata with per-scale stds.

Steps:

1. Open the source (`readers`), plan the shards (`shards.plan_shards`) and check the output
   directory: a directory holding another preparation is refused unless `overwrite`.
2. Encode this process's unfinished shards: images are read and ADM-centre-cropped by a thread
   pool, batched (with each image's horizontal flip right after it when `flip`), encoded on the
   mesh of this process's devices (`encoding.Encoder`, one batch in flight while the next is
   read), and every shard is written atomically once all its records are back, followed by
   its resume record. Unreadable images are skipped and counted per shard.
3. Process 0 waits for all processes, sums the shard records and writes `metadata.json`
   (atomically), including `scale_stds` for every requested pyramid measured on a seeded
   random subset of the written records (model space, as `ArrayRecordLatentSource` returns
   them).

Several hosts: run the same command on every host with `--out` on a shared file system;
process p writes shards p, p + P, p + 2P, ... and encodes on its own devices only (encoding
needs no communication), so processes never wait for each other until the end.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from dfm_jax import parallel
from dfm_jax.data import latents
from dfm_jax.preparation import encoding, readers, shards, stats

DEFAULT_IMAGES_PER_SHARD = 1024
#: Clips per shard of video sources (a 5 x 64 x 64 x 16 moments record is 2.6 MB).
DEFAULT_CLIPS_PER_SHARD = 64
#: Consecutive unreadable images after which the source is considered broken.
MAX_CONSECUTIVE_FAILURES = 64
#: Skipped image keys listed in the metadata (the count is always exact).
MAX_LISTED_SKIPPED = 1000
_PLAN_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What `python -m dfm_jax.prepare` does; every flag of the CLI is one field.

    Attributes:
      out: output directory (created; a shared file system for several hosts).
      source: "image_folder" (data_dir/<class>/<images>), "tfds", or the video sources
        "video_folder" (data_dir/<class>/<videos>) and "kinetics" (Kinetics-700 as
        distributed: data_dir/<split>/<class>/<clip>.mp4 and the annotation CSVs).
      data_dir: the image or video folder, the Kinetics root, or the TFDS data dir.
      tfds_name, split, image_key, label_key: the TFDS dataset, split and features
        (split also picks the Kinetics split: "train" or "validate").
      resolution: images (every frame of a clip) are ADM-centre-cropped to this square.
      frames: video sources: frames T per clip (the centre clip of every video); the
        video autoencoder needs 1 + 4k (e.g. 17 or 49). 0 for images.
      frame_stride, fps: video sources: decoded frames between clip frames, or a target
        frame rate when fps > 0 (stride = round(video fps / fps)).
      autoencoder: preset of `dfm_jax.models.autoencoder` ("sd-vae-ft-ema", "flux-ae", ...).
      autoencoder_weights: diffusers safetensors file or directory ("" only for "tiny").
      autoencoder_dtype: the encoder's compute dtype ("bfloat16" on accelerators).
      flip: also store each image's horizontal flip, as the record right after it.
      store: "moments" (posterior mean + std), "mean" or "sample" (one posterior draw).
      dtype: storage dtype of latents / moments: float32, bfloat16 or float16.
      images_per_shard: source images per shard (records: twice as many with flip); used when
        num_shards is None (default DEFAULT_IMAGES_PER_SHARD).
      num_shards: the number of shards instead.
      batch_size: images per encoder call on each process (default 16 per local device).
      pyramids: names (`pyramid.metadata_name`) whose per-scale stds go into the metadata.
      stats_examples: records the stds are measured on (a seeded random subset; all if fewer).
      max_examples: use only the first N source images (quick tries; None = all).
      seed: seeds the "sample" draws and the stats subset.
      workers: image-decoding threads (0 = 2 per CPU core, at most 32).
      overwrite: delete an existing dataset in `out` instead of refusing.
      progress: show a tqdm progress bar.
    """

    out: str
    source: str = "image_folder"
    data_dir: str = ""
    tfds_name: str = "imagenet2012"
    split: str = "train"
    image_key: str = "image"
    label_key: str = "label"
    resolution: int = 256
    frames: int = 0
    frame_stride: int = 1
    fps: float = 0.0
    autoencoder: str = "sd-vae-ft-ema"
    autoencoder_weights: str = ""
    autoencoder_dtype: str = "float32"
    flip: bool = False
    store: str = "moments"
    dtype: str = "float32"
    images_per_shard: int | None = None
    num_shards: int | None = None
    batch_size: int | None = None
    pyramids: tuple[str, ...] = stats.DEFAULT_PYRAMIDS
    stats_examples: int = 10_000
    max_examples: int | None = None
    seed: int = 0
    workers: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "pyramids", tuple(self.pyramids))
        if not self.out:
            raise ValueError("--out (the output directory) is required")
        if self.source not in readers.SOURCES:
            raise ValueError(f"--source must be one of {readers.SOURCES}, got {self.source!r}")
        if self.store not in encoding.STORES:
            raise ValueError(f"--store must be one of {encoding.STORES}, got {self.store!r}")
        if self.dtype not in latents.LATENT_DTYPES:
            raise ValueError(f"--dtype must be one of {latents.LATENT_DTYPES}, got {self.dtype!r}")
        if self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}")
        if self.video != (self.frames > 0):
            raise ValueError(
                f"--source={self.source} needs --frames >= 1 (frames per clip)"
                if self.video
                else f"--frames={self.frames} is for video sources {readers.VIDEO_SOURCES}"
            )
        if self.frame_stride < 1 or self.fps < 0:
            raise ValueError("--frame_stride must be >= 1 and --fps >= 0")
        if self.images_per_shard is not None and self.num_shards is not None:
            raise ValueError("give --images_per_shard or --num_shards, not both")
        for name in ("images_per_shard", "num_shards", "batch_size", "max_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be positive, got {value}")
        if self.stats_examples < 0 or self.workers < 0:
            raise ValueError("--stats_examples and --workers must be >= 0")

    @property
    def video(self) -> bool:
        """Whether the source holds videos (clips are encoded by a video autoencoder)."""
        return self.source in readers.VIDEO_SOURCES

    @property
    def clip(self) -> readers.ClipSettings | None:
        """The clip of every video (None for images)."""
        if not self.video:
            return None
        return readers.ClipSettings(self.frames, self.frame_stride, self.fps)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """Summary of a `run` (counts of this run on this process, totals from the metadata).

    Attributes:
      out: the output directory.
      num_shards: shards of the dataset.
      shards_written: shards this process wrote in this run.
      shards_kept: this process's shards that an earlier run had finished (kept, skipped).
      records_written: records this process encoded and wrote in this run.
      skipped_images: unreadable images this process skipped in this run.
      seconds: wall time of the encoding loop (model loading and compilation included).
      images_per_second: records_written / seconds (encoder images, flips included).
      steady_images_per_second: the rate after the first batch came back (without model
        loading and compilation); 0 when there was a single batch.
      metadata: the written `LatentMetadata` (process 0; None elsewhere).
      unit: what a record encodes, "images" or "clips" (the summary's wording).
    """

    out: str
    num_shards: int
    shards_written: int
    shards_kept: int
    records_written: int
    skipped_images: int
    seconds: float
    images_per_second: float
    steady_images_per_second: float
    metadata: latents.LatentMetadata | None
    unit: str = "images"

    def summary(self) -> str:
        """The one-line report the CLI prints."""
        unit = self.unit
        if self.shards_written == 0:
            line = f"prepare: nothing to encode ({self.shards_kept} shards finished earlier, kept)"
        else:
            line = (
                f"prepare: {self.records_written} records in {self.shards_written} new shards "
                f"({self.shards_kept} finished earlier, kept), {self.skipped_images} unreadable "
                f"{unit} skipped, {self.seconds:.1f} s, {self.images_per_second:.3g} {unit}/s "
                f"({self.steady_images_per_second:.3g} {unit}/s after the first batch)"
            )
        if self.metadata is not None:
            line += (
                f"; dataset {self.out}: {self.metadata.num_examples} records in "
                f"{self.num_shards} shards, {self.metadata.extra.get('skipped_images', 0)} "
                f"{unit} skipped in total"
            )
        return line


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _read(reader: readers.ImageReader, index: int):
    try:
        return reader.read(index)
    except readers.ReadError as e:
        return e


def _iter_images(reader: readers.ImageReader, indices: Iterator[int], workers: int, prefetch: int):
    """Yields (index, (pixels, label, key) or ReadError) in order, read by a thread pool."""
    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        queue = collections.deque()
        for index in itertools.islice(indices, prefetch):
            queue.append((index, pool.submit(_read, reader, index)))
        try:
            while queue:
                index, future = queue.popleft()
                for nxt in itertools.islice(indices, 1):
                    queue.append((nxt, pool.submit(_read, reader, nxt)))
                yield index, future.result()
        finally:
            for _, future in queue:
                future.cancel()


# ------------------------------------------------------------------------------------------------
# Encoding and writing shards
# ------------------------------------------------------------------------------------------------


class _ShardBuffer:
    """The records of one shard while they are being encoded."""

    def __init__(self, shard: shards.Shard):
        self.shard = shard
        self.examples: list[dict[str, Any]] = []
        self.encoded = 0
        self.skipped: list[str] = []
        self.read_done = False

    @property
    def complete(self) -> bool:
        return self.read_done and self.encoded == len(self.examples)


class _ShardWriter:
    """Streams this process's pending shards through the encoder and writes them."""

    def __init__(
        self,
        reader: readers.ImageReader,
        encoder: encoding.Encoder,
        state: shards.ShardState,
        flip: bool,
        workers: int,
        progress: tqdm.tqdm,
    ):
        self.reader, self.encoder, self.state = reader, encoder, state
        self.copies = (False, True) if flip else (False,)
        self.workers = workers
        self.progress = progress
        self.open: list[_ShardBuffer] = []
        self.shards_written = 0
        self.records_written = 0
        self.skipped_images = 0
        self._consecutive_failures = 0
        #: (time, records encoded) when the first batch came back (it includes compilation).
        self.first_batch: tuple[float, int] | None = None

    def _records(self, pending: Sequence[shards.Shard]):
        """Yields (buffer, position, pixels, id) per record; (None, ...) at each shard's end."""
        indices = (i for shard in pending for i in range(shard.start, shard.stop))
        images = _iter_images(
            self.reader, indices, self.workers, prefetch=2 * self.encoder.batch_size
        )
        for shard in pending:
            self.state.remove_stale_temporaries(shard)
            buffer = _ShardBuffer(shard)
            self.open.append(buffer)
            for _ in range(shard.start, shard.stop):
                index, result = next(images)
                if isinstance(result, readers.ReadError):
                    self._skip(buffer, result)
                    continue
                self._consecutive_failures = 0
                pixels, label, key = result
                for flipped in self.copies:
                    position = len(buffer.examples)
                    buffer.examples.append(
                        {"label": np.int32(label), "key": key, "flip": np.bool_(flipped)}
                    )
                    record_id = index * len(self.copies) + int(flipped)
                    flipped_pixels = np.flip(pixels, axis=-2) if flipped else pixels  # along W
                    yield buffer, position, flipped_pixels, record_id
            buffer.read_done = True
            yield None, 0, None, 0
        images.close()

    def _skip(self, buffer: _ShardBuffer, error: readers.ReadError) -> None:
        logging.warning("prepare: skipping unreadable image %s", error)
        buffer.skipped.append(error.key)
        self.skipped_images += 1
        self._consecutive_failures += 1
        self.progress.update(len(self.copies))
        self.progress.set_postfix(skipped=self.skipped_images, refresh=False)
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"prepare: {MAX_CONSECUTIVE_FAILURES} consecutive images are unreadable (last: "
                f"{error}); the source looks broken"
            )

    def _collect(self, handle, batch: list[tuple[_ShardBuffer, int]]) -> None:
        outputs = self.encoder.fetch(handle)
        for j, (buffer, position) in enumerate(batch):
            example = buffer.examples[position]
            for name, values in outputs.items():
                example[name] = values[j]
            buffer.encoded += 1
        self.progress.update(len(batch))
        if self.first_batch is None:
            self.first_batch = (time.perf_counter(), len(batch))

    def _write_complete(self) -> None:
        for buffer in [b for b in self.open if b.complete]:
            path = self.state.shard_path(buffer.shard)
            count = latents.write_shard(path, buffer.examples)
            self.state.write_record(buffer.shard, count, buffer.skipped)
            self.shards_written += 1
            self.records_written += count
            self.open.remove(buffer)

    def run(self, pending: Sequence[shards.Shard]) -> None:
        batch: list[tuple[_ShardBuffer, int]] = []
        pixels: list[np.ndarray] = []
        ids: list[int] = []
        in_flight = None

        def submit():
            nonlocal in_flight, batch, pixels, ids
            handle = self.encoder.submit(np.stack(pixels), np.asarray(ids, np.uint32))
            if in_flight is not None:
                self._collect(*in_flight)
            in_flight = (handle, batch)
            batch, pixels, ids = [], [], []

        for buffer, position, image, record_id in self._records(pending):
            if buffer is not None:
                batch.append((buffer, position))
                pixels.append(image)
                ids.append(record_id)
                if len(batch) == self.encoder.batch_size:
                    submit()
            self._write_complete()
        if batch:
            submit()
        if in_flight is not None:
            self._collect(*in_flight)
        self._write_complete()
        if self.open:  # unreachable unless a record went missing
            raise RuntimeError(
                f"prepare: shards left unfinished: {[b.shard.name for b in self.open]}"
            )


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fingerprint(options: PrepareOptions, reader: readers.ImageReader, plan, codec_config) -> dict:
    return {
        "version": _PLAN_VERSION,
        "source": reader.describe(),
        "num_images": plan[-1].stop,
        "num_shards": len(plan),
        "resolution": options.resolution,
        **({"clip": dataclasses.asdict(options.clip)} if options.video else {}),
        "autoencoder": codec_config.name,
        "autoencoder_dtype": codec_config.dtype,
        "flip": options.flip,
        "store": options.store,
        "dtype": options.dtype,
        "sample_seed": options.seed if options.store == "sample" else None,
    }


def _load_codec(options: PrepareOptions):
    from dfm_jax.models import autoencoder

    return autoencoder.Codec.load(
        options.autoencoder, options.autoencoder_weights, dtype=options.autoencoder_dtype
    )


def _write_metadata(
    options: PrepareOptions,
    reader: readers.ImageReader,
    plan: Sequence[shards.Shard],
    state: shards.ShardState,
    codec_config,
    latent_shape: tuple[int, ...],
    pyramids: dict,
) -> latents.LatentMetadata:
    records = {}
    for shard in plan:
        record = state.read_record(shard)
        if record is None:
            raise RuntimeError(
                f"prepare: shard {shard.name} is not finished (did another process fail?); "
                "rerun the same command to complete the dataset"
            )
        records[shard.index] = record
    skipped = [key for r in records.values() for key in r["skipped"]]
    num_examples = sum(r["records"] for r in records.values())
    if not num_examples:
        raise RuntimeError(
            f"prepare: none of the {plan[-1].stop} images could be read (e.g. "
            f"{skipped[:3]}); no dataset written"
        )
    extra = {
        "tool": "dfm_jax.prepare",
        "class_names": list(reader.class_names),
        "source": reader.describe(),
        "resolution": options.resolution,
        "crop": "ADM centre crop (BOX halving, BICUBIC resize, centre crop)"
        + (" of every frame of the centre clip" if options.video else ""),
        **({"clip": dataclasses.asdict(options.clip)} if options.video else {}),
        "flip": options.flip,
        "record_order": (
            "source order, each example followed by its horizontal flip"
            if options.flip
            else "source order"
        ),
        "store": options.store,
        "autoencoder_weights": options.autoencoder_weights,
        "autoencoder_dtype": codec_config.dtype,
        "num_images": plan[-1].stop,
        "skipped_images": len(skipped),
        "skipped_keys": skipped[:MAX_LISTED_SKIPPED],
        "num_shards": len(plan),
    }
    metadata = latents.LatentMetadata(
        latent_shape=latent_shape,
        dtype=options.dtype,
        num_classes=reader.num_classes,
        num_examples=num_examples,
        autoencoder=codec_config.name,
        scaling_factor=float(codec_config.scaling_factor),
        shift_factor=float(codec_config.shift_factor),
        moments=options.store == "moments",
        extra=extra,
    )
    latents.write_metadata(options.out, metadata)  # readable now; the stds follow
    source = latents.ArrayRecordLatentSource(options.out, latent_sample=False)
    indices = stats.sample_indices(len(source), options.stats_examples, options.seed)
    scale_stds = stats.measure_scale_stds(source, pyramids, indices) if len(indices) else {}
    extra["scale_stds_measured_on"] = {
        "records": len(indices),
        "latents": "posterior means" if options.store == "moments" else "stored latents",
        "space": "model space (z - shift_factor) * scaling_factor",
        "statistic": "std over all elements of each scale",
    }
    metadata = dataclasses.replace(metadata, scale_stds=scale_stds, extra=extra)
    latents.write_metadata(options.out, metadata)
    return metadata


def run(options: PrepareOptions, codec=None) -> PrepareResult:
    """Prepares (or completes) the latent dataset `options.out`; see the module docstring.

    Args:
      options: the settings.
      codec: an autoencoder `Codec` to use instead of loading `options.autoencoder` (tests,
        benchmarks with random weights); its config's name is recorded as the autoencoder.
    """
    codec_config, latent_shape = _autoencoder_config(options, codec)
    pyramids = stats.parse_pyramids(options.pyramids, latent_shape)
    _check_weights(options, codec)
    reader, plan = _open_source(options)
    state = shards.ShardState(options.out)
    _claim_output(options, state, _fingerprint(options, reader, plan, codec_config))

    process, process_count = jax.process_index(), jax.process_count()
    own = [s for s in plan if shards.owned_by(s, process, process_count)]
    pending = [s for s in own if state.read_record(s) is None]
    logging.info(
        "prepare: %d images -> %d shards in %s; this process: %d shards, %d finished earlier",
        plan[-1].stop,
        len(plan),
        options.out,
        len(own),
        len(own) - len(pending),
    )
    start = time.perf_counter()
    writer = _encode_shards(options, reader, state, pending, codec) if pending else None
    end = time.perf_counter()
    _barrier("dfm_jax.prepare.shards")

    metadata = None
    if process == 0:
        metadata = _write_metadata(
            options, reader, plan, state, codec_config, latent_shape, pyramids
        )
    _barrier("dfm_jax.prepare.metadata")
    result = _summarise(options, plan, len(own) - len(pending), writer, start, end, metadata)
    logging.info("%s", result.summary())
    return result


def _autoencoder_config(options: PrepareOptions, codec) -> tuple[Any, tuple[int, ...]]:
    """The autoencoder's config (`codec`'s, else the preset's) and the latent shape:
    `(h, w, c)` for images, `(t, h, w, c)` for clips of a video autoencoder."""
    from dfm_jax.models import autoencoder

    codec_config = (
        codec.config
        if codec is not None
        else autoencoder.preset_config(options.autoencoder, dtype=options.autoencoder_dtype)
    )
    video_codec = hasattr(codec_config, "latent_frames")
    if video_codec != options.video:
        kind = "videos" if options.video else "images"
        fitting = autoencoder.VIDEO_PRESET_NAMES if options.video else sorted(autoencoder.PRESETS)
        raise ValueError(
            f"--autoencoder={codec_config.name} does not encode {kind}, which "
            f"--source={options.source} holds; use one of {list(fitting)}"
        )
    f = codec_config.downsample_factor
    if options.resolution % f:
        raise ValueError(
            f"--resolution {options.resolution} is not divisible by the downsampling factor {f} "
            f"of autoencoder {codec_config.name!r}"
        )
    latent_shape = (options.resolution // f, options.resolution // f, codec_config.latent_channels)
    if not options.video:
        return codec_config, latent_shape
    r = codec_config.temporal_compression_ratio
    if (options.frames - 1) % r:
        raise ValueError(
            f"--frames={options.frames}: the causal video autoencoder {codec_config.name!r} "
            f"encodes 1 + {r}k frames into 1 + k latent frames; use e.g. {1 + 4 * r} or "
            f"{1 + 12 * r}"
        )
    return codec_config, (codec_config.latent_frames(options.frames), *latent_shape)


def _check_weights(options: PrepareOptions, codec) -> None:
    """Raises `FileNotFoundError` when the autoencoder must be loaded but has no weights file."""
    from dfm_jax.models import autoencoder, cogvideox

    weights = options.autoencoder_weights
    random_init = options.autoencoder in ("tiny", "tiny-video")
    if codec is None and (weights or not random_init) and not os.path.exists(weights):
        published = {**autoencoder.WEIGHTS_SOURCES, **cogvideox.VIDEO_WEIGHTS_SOURCES}
        raise FileNotFoundError(
            f"autoencoder {options.autoencoder!r} needs weights: --autoencoder_weights="
            f"{weights!r} does not exist. Pass the diffusers-layout "
            "diffusion_pytorch_model.safetensors (or its directory), from "
            f"{published.get(options.autoencoder, 'its diffusers release')}."
        )


def _open_source(options: PrepareOptions) -> tuple[readers.ImageReader, list[shards.Shard]]:
    """The image reader and the shard plan of its first `max_examples` images."""
    reader = readers.make_reader(
        options.source,
        options.data_dir,
        options.resolution,
        tfds_name=options.tfds_name,
        split=options.split,
        image_key=options.image_key,
        label_key=options.label_key,
        clip=options.clip,
    )
    num_images = (
        len(reader) if options.max_examples is None else min(len(reader), options.max_examples)
    )
    images_per_shard = options.images_per_shard
    if options.num_shards is None and images_per_shard is None:
        images_per_shard = DEFAULT_CLIPS_PER_SHARD if options.video else DEFAULT_IMAGES_PER_SHARD
    return reader, shards.plan_shards(num_images, images_per_shard, options.num_shards)


def _claim_output(options: PrepareOptions, state: shards.ShardState, fingerprint: dict) -> None:
    """Process 0 clears (`overwrite`) and records the plan; the others then check it."""
    if jax.process_index() == 0:
        os.makedirs(options.out, exist_ok=True)
        if options.overwrite:
            removed = state.clear()
            if removed:
                logging.info(
                    "prepare: --overwrite removed %d files from %s", len(removed), options.out
                )
        state.check_or_write_plan(fingerprint)
    _barrier("dfm_jax.prepare.plan")
    if jax.process_index() != 0:
        state.check_or_write_plan(fingerprint, write=False)


def _encode_shards(
    options: PrepareOptions,
    reader: readers.ImageReader,
    state: shards.ShardState,
    pending: Sequence[shards.Shard],
    codec,
) -> _ShardWriter:
    """Encodes and writes the `pending` shards on this process's devices."""
    codec = codec if codec is not None else _load_codec(options)
    mesh = parallel.create_mesh({"data": -1}, jax.local_devices())
    per_device = 2 if options.video else 16
    batch_size = options.batch_size or per_device * jax.local_device_count()
    encoder = encoding.Encoder(codec, mesh, batch_size, options.store, options.dtype, options.seed)
    total = sum(s.stop - s.start for s in pending) * (2 if options.flip else 1)
    workers = options.workers or min(32, 2 * (os.cpu_count() or 1))
    with tqdm.tqdm(
        total=total,
        unit="clip" if options.video else "img",
        desc="prepare",
        disable=not options.progress,
        smoothing=0.1,
    ) as progress:
        writer = _ShardWriter(reader, encoder, state, options.flip, workers, progress)
        writer.run(pending)
    return writer


def _summarise(
    options: PrepareOptions,
    plan: Sequence[shards.Shard],
    shards_kept: int,
    writer: _ShardWriter | None,
    start: float,
    end: float,
    metadata: latents.LatentMetadata | None,
) -> PrepareResult:
    """The `PrepareResult` of an encoding loop that ran from `start` to `end` (perf_counter)."""
    seconds = end - start
    steady = 0.0
    if writer is not None and writer.first_batch is not None:
        first_time, first_records = writer.first_batch
        if writer.records_written > first_records and end > first_time:
            steady = (writer.records_written - first_records) / (end - first_time)
    written = writer.records_written if writer else 0
    return PrepareResult(
        out=options.out,
        num_shards=len(plan),
        shards_written=writer.shards_written if writer else 0,
        shards_kept=shards_kept,
        records_written=written,
        skipped_images=writer.skipped_images if writer else 0,
        seconds=seconds,
        images_per_second=written / seconds if written else 0.0,
        steady_images_per_second=steady,
        metadata=metadata,
        unit="clips" if options.video else "images",
    )

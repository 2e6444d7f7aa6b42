"""Latent datasets in ArrayRecord shards: writer, metadata and Grain reader.

A latent dataset is a directory::

    latents/
      metadata.json                      LatentMetadata (below)
      latents-00000-of-00004.array_record
      ...

Each ArrayRecord record is one example in the `record_format` encoding (named numpy arrays,
no pickle) with either

- "latent": the autoencoder latent, (H, W, C) or (T, H, W, C), float32 / bfloat16 / float16,
- or "mean" and "std": the moments of the autoencoder's diagonal Gaussian posterior (same
  shape), from which a latent is drawn at read time,

plus "label" (int32 scalar) and any extra fields (e.g. "key", the source file name), which the
reader ignores.

Records hold the autoencoder's raw latents. The reader returns model-space latents
`(z - shift_factor) * scaling_factor` under the key "image" (the same key as pixel sources),
so a model never needs to know the source; decoding applies the inverse
`x / scaling_factor + shift_factor`. `scale_stds` in the metadata are measured in model space.

When records hold moments and `latent_sample=True`, every read draws a fresh latent
`mean + std * eps` with the per-example RNG that Grain's sampler derives from the pipeline
seed and the example's position in the stream, so the draws are reproducible and a resumed
run draws exactly what an uninterrupted one would (`SampleLatent`).

A record that cannot be read (a corrupt shard) or decodes to the wrong fields or shape
is reported with its shard file and its index in that shard (`BadRecordError`). With
`bad_records="stop"` (the default, `config.data.bad_records`) the run stops; with
`"skip"` the next readable record is returned in its place and the source counts the
skipped ones (`skipped`, logged with each).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module

from dfm_jax.data import common, record_format
from dfm_jax.utils import errors, files

METADATA_FILENAME = "metadata.json"
SHARD_SUFFIX = ".array_record"
_FORMAT_NAME = "dfm_jax.latents"
_FORMAT_VERSION = 1
#: Storage dtypes allowed for latents and moments.
LATENT_DTYPES = ("float32", "bfloat16", "float16")
#: What a source does with a bad record (`config.data.bad_records`).
BAD_RECORD_CHOICES = ("stop", "skip")
#: With "skip", how many following records are tried before giving up.
_MAX_SKIPPED_IN_A_ROW = 64


class BadRecordError(record_format.RecordFormatError, errors.RunFault):
    """A latent record that cannot be read or has the wrong fields or shape."""


def shard_filename(index: int, count: int, prefix: str = "latents") -> str:
    """The conventional shard name, e.g. "latents-00003-of-00016.array_record"."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class LatentMetadata:
    """What `metadata.json` records about a latent dataset.

    Attributes:
      latent_shape: shape of one latent, (H, W, C) or (T, H, W, C).
      dtype: storage dtype of latents / moments (one of LATENT_DTYPES).
      num_classes: number of classes; labels lie in [0, num_classes).
      num_examples: total records over all shards.
      autoencoder: name of the autoencoder that produced the latents (e.g. "flux-ae").
      scaling_factor: model-space latent = (z - shift_factor) * scaling_factor.
      shift_factor: see scaling_factor.
      moments: True when records hold "mean"/"std" instead of "latent".
      scale_stds: per-scale standard deviations of model-space latents, keyed by a pyramid
        name (e.g. "laplacian-32-64"); each value lists one entry per scale, coarsest first
        (a float, or a per-channel list of floats).
      extra: free-form provenance (source dataset, split, resolution, tool version, ...).
    """

    latent_shape: tuple[int, ...]
    dtype: str
    num_classes: int
    num_examples: int
    autoencoder: str = ""
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    moments: bool = False
    scale_stds: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(int(d) for d in self.latent_shape))
        if len(self.latent_shape) not in (3, 4) or min(self.latent_shape) < 1:
            raise ValueError(
                f"latent_shape must be (H, W, C) or (T, H, W, C) with positive sizes, got "
                f"{self.latent_shape}"
            )
        if self.dtype not in LATENT_DTYPES:
            raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {self.dtype!r}")
        if self.num_classes < 1 or self.num_examples < 0:
            raise ValueError(
                f"need num_classes >= 1 and num_examples >= 0, got {self.num_classes}, "
                f"{self.num_examples}"
            )
        if not self.scaling_factor:
            raise ValueError("scaling_factor must be non-zero")
        if not isinstance(self.scale_stds, Mapping):
            raise ValueError(
                f"scale_stds must be a dict keyed by pyramid name, got {self.scale_stds!r}"
            )

    def to_json(self) -> str:
        """The metadata as a JSON document (with a format name and version)."""
        body = dataclasses.asdict(self)
        body["latent_shape"] = list(self.latent_shape)
        return json.dumps({"format": _FORMAT_NAME, "version": _FORMAT_VERSION, **body}, indent=2)

    @classmethod
    def from_json(cls, text: str, path: str = "<string>") -> LatentMetadata:
        """Parses `to_json` output; raises ValueError naming `path` when it is not valid."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(body, dict) or body.pop("format", None) != _FORMAT_NAME:
            raise ValueError(f"{path}: not a {_FORMAT_NAME} metadata file")
        version = body.pop("version", None)
        if version != _FORMAT_VERSION:
            raise ValueError(f"{path}: metadata version {version} (supported: {_FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"{path}: unknown metadata fields {unknown}")
        try:
            return cls(**body)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from e


def write_metadata(directory: str | os.PathLike, metadata: LatentMetadata) -> str:
    """Writes `directory/metadata.json` atomically (`files.atomic_write_text`); returns its path."""
    path = os.path.join(os.fspath(directory), METADATA_FILENAME)
    files.atomic_write_text(path, metadata.to_json())
    return path


def read_metadata(directory: str | os.PathLike) -> LatentMetadata:
    """Reads `directory/metadata.json`; DataNotFoundError when it is missing."""
    path = os.path.join(os.fspath(directory), METADATA_FILENAME)
    if not os.path.isfile(path):
        raise common.DataNotFoundError(
            f"no {METADATA_FILENAME} in {os.fspath(directory)!r}: not a latent dataset. Create "
            "one with `python -m dfm_jax.prepare`, or set --config.data.dir to its directory."
        )
    with open(path, encoding="utf-8") as f:
        return LatentMetadata.from_json(f.read(), path)


def _check_example(example: Mapping[str, Any], position: int) -> None:
    has_latent = "latent" in example
    has_moments = "mean" in example or "std" in example
    if has_latent == has_moments:
        raise ValueError(
            f"example {position}: needs either 'latent' or both 'mean' and 'std', got fields "
            f"{sorted(example)}"
        )
    if has_moments and not ("mean" in example and "std" in example):
        raise ValueError(f"example {position}: 'mean' and 'std' must come together")
    if "label" not in example:
        raise ValueError(f"example {position}: missing 'label'")
    arrays = [example[k] for k in ("latent", "mean", "std") if k in example]
    for array in arrays:
        name = record_format.dtype_name(np.asarray(array).dtype)
        if name not in LATENT_DTYPES:
            raise ValueError(f"example {position}: latent dtype {name} not in {LATENT_DTYPES}")
    if has_moments and np.shape(example["mean"]) != np.shape(example["std"]):
        raise ValueError(
            f"example {position}: mean {np.shape(example['mean'])} and std "
            f"{np.shape(example['std'])} differ in shape"
        )


def write_shard(path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]) -> int:
    """Writes examples to one ArrayRecord shard atomically; returns the number written.

    Each example is a dict with "latent" (or "mean" and "std"), "label" and optional extra
    fields; arrays are stored with their own dtype (latents: float32, bfloat16 or float16).
    The shard is written under a temporary name and renamed into place (`files.AtomicPath`),
    so readers never see a partial shard.
    """
    count = 0
    with files.AtomicPath(path) as tmp:
        writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
        try:
            for example in examples:
                _check_example(example, count)
                record = dict(example)
                record["label"] = np.asarray(record["label"], np.int32)
                writer.write(record_format.encode(record))
                count += 1
        finally:
            writer.close()
    return count


def shard_paths(directory: str | os.PathLike) -> list[str]:
    """The sorted `*.array_record` shards in `directory`."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(directory)), "*" + SHARD_SUFFIX)))


class SampleLatent(grain.transforms.RandomMap):
    """Draws `image = mean + std * eps`, eps ~ N(0, I), with Grain's per-example RNG.

    Input: {"mean", "std", "label"} from `ArrayRecordLatentSource(latent_sample=True)` on a
    moments dataset; output: {"image", "label"}.
    """

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
        if rng is None:
            raise ValueError("SampleLatent needs a seeded sampler (Grain passed rng=None)")
        mean, std = element["mean"], element["std"]
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        return common.make_example(mean + std * eps, element[common.LABEL_KEY])


class ArrayRecordLatentSource(common.Source):
    """Reads a latent dataset written by `write_shard` + `write_metadata`.

    Args:
      directory: the dataset directory (shards + metadata.json).
      latent_sample: for moments datasets, draw a latent per read (via `operations`, see
        `SampleLatent`); False returns the posterior mean. Ignored for "latent" datasets.

    Attributes:
      metadata: the `LatentMetadata`.
      paths: the shard files.
      class_names: ``metadata.extra["class_names"]`` when it names every class, else None.
    """

    def __init__(
        self, directory: str | os.PathLike, latent_sample: bool = True, bad_records: str = "stop"
    ):
        if bad_records not in BAD_RECORD_CHOICES:
            raise ValueError(f"bad_records: one of {BAD_RECORD_CHOICES}, got {bad_records!r}")
        self.bad_records = bad_records
        self.skipped = 0
        self.directory = os.fspath(directory)
        self.metadata = read_metadata(self.directory)
        self.paths = shard_paths(self.directory)
        if not self.paths:
            raise common.DataNotFoundError(
                f"latent dataset {self.directory!r} has {METADATA_FILENAME} but no "
                f"*{SHARD_SUFFIX} shards"
            )
        self._starts = [0]  # the global index of each shard's first record
        for path in self.paths:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                self._starts.append(self._starts[-1] + reader.num_records())
                reader.close()
            except Exception as e:  # a shard whose index (footer) cannot be read
                raise BadRecordError(
                    f"latent shard {os.path.basename(path)} in {self.directory} cannot be "
                    f"opened: {e}"
                ) from None
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self._source) != self.metadata.num_examples:
            raise ValueError(
                f"latent dataset {self.directory!r}: shards hold {len(self._source)} records, "
                f"{METADATA_FILENAME} says {self.metadata.num_examples}"
            )
        self.sample = bool(latent_sample and self.metadata.moments)
        self.num_classes = self.metadata.num_classes
        self.example_shape = self.metadata.latent_shape
        names = self.metadata.extra.get("class_names")  # written by dfm_jax.prepare
        if isinstance(names, list) and len(names) == self.num_classes:
            self.class_names = tuple(str(name) for name in names)
        self._scale = np.float32(self.metadata.scaling_factor)
        self._shift = np.float32(self.metadata.shift_factor)

    def scale_stds(self, pyramid_name: str) -> tuple[Any, ...] | None:
        """The metadata's per-scale stds for `pyramid_name`, or None (logged) when absent."""
        stds = self.metadata.scale_stds.get(pyramid_name)
        if stds is None:
            logging.warning(
                "%s has no per-scale stds for pyramid %r; it has them for %s.",
                self,
                pyramid_name,
                sorted(self.metadata.scale_stds) or "no pyramid",
            )
            return None
        return tuple(stds)

    @property
    def operations(self) -> tuple[grain.transforms.RandomMap, ...]:
        return (SampleLatent(),) if self.sample else ()

    def __len__(self) -> int:
        return len(self._source)

    def _field(self, record: dict[str, Any], name: str, index: int) -> np.ndarray:
        if name not in record:
            raise record_format.RecordFormatError(
                f"{self.directory}: record {index} has no {name!r} field (fields "
                f"{sorted(record)}; metadata moments={self.metadata.moments})"
            )
        array = np.asarray(record[name], np.float32)
        if array.shape != self.example_shape:
            raise record_format.RecordFormatError(
                f"{self.directory}: record {index} field {name!r} has shape {array.shape}, "
                f"metadata says {self.example_shape}"
            )
        return array

    def where(self, index: int) -> tuple[str, int]:
        """The shard file name of global record ``index`` and its index in that shard."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return os.path.basename(self.paths[shard]), index - self._starts[shard]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        try:
            return self._read(index)
        except Exception as e:
            error = self._bad_record(index, e)
            if self.bad_records == "stop":
                raise error from e
            first_error = error
        for offset in range(1, min(_MAX_SKIPPED_IN_A_ROW, len(self))):
            self.skipped += 1
            logging.warning("%s; skipped (%d bad records so far)", first_error, self.skipped)
            try:
                return self._read((index + offset) % len(self))
            except Exception as e:
                first_error = self._bad_record((index + offset) % len(self), e)
        raise BadRecordError(
            f"{first_error}; and every record up to {_MAX_SKIPPED_IN_A_ROW} after it is bad"
        )

    def _bad_record(self, index: int, error: Exception) -> BadRecordError:
        shard, position = self.where(index)
        message = str(error)
        if isinstance(error, record_format.RecordFormatError):
            message = message.removeprefix(f"{self.directory}: ")
        else:
            message = f"cannot be read ({type(error).__name__}: {' '.join(message.split())})"
        return BadRecordError(
            f"{self.directory}: bad record {position} of shard {shard} (example {index}): "
            f"{message}. Set config.data.bad_records='skip' to skip bad records"
            if self.bad_records == "stop"
            else f"{self.directory}: bad record {position} of shard {shard} (example {index}): "
            f"{message}"
        )

    def _read(self, index: int) -> dict[str, np.ndarray]:
        record = record_format.decode(self._source[index])
        label = np.asarray(record["label"], np.int32)
        if not self.metadata.moments:
            latent = (self._field(record, "latent", index) - self._shift) * self._scale
            return common.make_example(latent, label)
        mean = (self._field(record, "mean", index) - self._shift) * self._scale
        if not self.sample:
            return common.make_example(mean, label)
        std = self._field(record, "std", index) * np.abs(self._scale)
        return {"mean": mean, "std": std, common.LABEL_KEY: label}

    def __repr__(self) -> str:
        return (
            f"ArrayRecordLatentSource(directory={self.directory!r}, "
            f"num_examples={len(self)}, latent_sample={self.sample})"
        )

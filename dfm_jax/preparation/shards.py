"""Shard plan and resume state of a dataset preparation.

The source's images (index order) are split into contiguous ranges, one per shard; shard i
holds the readable images of its range in order, each followed by its horizontal flip when
flips are on. Shard i is written by process `i % process_count`.

Next to the shards, `prepare_state/` holds

- `plan.json`: the run's fingerprint (source, resolution, autoencoder and its dtype,
  storage, flips, shard ranges, ...). A rerun with a different fingerprint is refused
  (unless --overwrite), so one directory never mixes two datasets;
- `<shard name>.json`, written atomically right after its shard: the shard's record count
  and the keys of the images skipped as unreadable. A shard counts as finished when both
  files exist and the shard holds the recorded number of records; finished shards are
  skipped by a rerun, anything else is (re)written. Shards themselves are written under a
  temporary name and renamed (`latents.write_shard`), so a partial shard never appears.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

from array_record.python import array_record_module

from dfm_jax.data import latents
from dfm_jax.utils import files

STATE_DIRNAME = "prepare_state"
PLAN_FILENAME = "plan.json"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One output shard: source images [start, stop)."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return latents.shard_filename(self.index, self.count)


def plan_shards(
    num_images: int, images_per_shard: int | None = None, num_shards: int | None = None
) -> list[Shard]:
    """Contiguous, near-equal ranges of source images, one per shard.

    Give either `num_shards` or `images_per_shard` (then ceil(num_images / images_per_shard)
    shards); ranges differ in length by at most one image.
    """
    if num_images < 1:
        raise ValueError("the source has no images")
    if (num_shards is None) == (images_per_shard is None):
        raise ValueError("give exactly one of num_shards and images_per_shard")
    if num_shards is None:
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard must be positive, got {images_per_shard}")
        num_shards = -(-num_images // images_per_shard)
    if not 1 <= num_shards <= num_images:
        raise ValueError(
            f"num_shards must be in [1, {num_images}] (the image count), got {num_shards}"
        )
    bounds = [num_images * i // num_shards for i in range(num_shards + 1)]
    return [Shard(i, num_shards, bounds[i], bounds[i + 1]) for i in range(num_shards)]


def owned_by(shard: Shard, process_index: int, process_count: int) -> bool:
    """Whether `process_index` writes `shard` (round-robin over processes)."""
    return shard.index % process_count == process_index


class ShardState:
    """The `prepare_state/` files of one output directory."""

    def __init__(self, out: str | os.PathLike):
        self.out = os.fspath(out)
        self.dir = os.path.join(self.out, STATE_DIRNAME)

    # -- plan -------------------------------------------------------------------------------------

    @property
    def plan_path(self) -> str:
        return os.path.join(self.dir, PLAN_FILENAME)

    def read_plan(self) -> dict[str, Any] | None:
        if not os.path.isfile(self.plan_path):
            return None
        with open(self.plan_path, encoding="utf-8") as f:
            return json.load(f)

    def check_or_write_plan(self, fingerprint: dict[str, Any], write: bool = True) -> None:
        """Refuses an output directory that holds another dataset; records the plan if new.

        Raises:
          FileExistsError: the plan differs, or the directory has a dataset but no plan.
        """
        fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as stored
        existing = self.read_plan()
        if existing is not None:
            if existing != fingerprint:
                keys = sorted(set(existing) | set(fingerprint))
                diff = [
                    f"{k}: {existing.get(k)!r} -> {fingerprint.get(k)!r}"
                    for k in keys
                    if existing.get(k) != fingerprint.get(k)
                ]
                raise FileExistsError(
                    f"{self.out!r} holds a different preparation ({'; '.join(diff)}); pass "
                    "--overwrite to replace it, or choose another --out"
                )
            return
        found = self.dataset_files()
        if found:
            raise FileExistsError(
                f"{self.out!r} already holds {os.path.basename(found[0])!r} (and "
                f"{len(found) - 1} more dataset files) not written by this preparation; pass "
                "--overwrite to replace them, or choose another --out"
            )
        if write:
            os.makedirs(self.dir, exist_ok=True)
            files.atomic_write_bytes(
                self.plan_path, json.dumps(fingerprint, indent=2, sort_keys=True).encode()
            )

    def dataset_files(self) -> list[str]:
        """metadata.json, shards and temporary shards in the output directory."""
        metadata = os.path.join(self.out, latents.METADATA_FILENAME)
        paths = [metadata] if os.path.exists(metadata) else []
        escaped = glob.escape(self.out)
        paths += sorted(glob.glob(os.path.join(escaped, "*" + latents.SHARD_SUFFIX)))
        temporaries = "*" + latents.SHARD_SUFFIX + files.TEMPORARY_MARKER + "*"
        paths += sorted(glob.glob(os.path.join(escaped, temporaries)))
        return paths

    def clear(self) -> list[str]:
        """Deletes the dataset files and the state (for --overwrite); returns what it deleted."""
        removed = self.dataset_files()
        for path in removed:
            os.remove(path)
        if os.path.isdir(self.dir):
            shutil.rmtree(self.dir)
            removed.append(self.dir)
        return removed

    # -- shards -----------------------------------------------------------------------------------

    def shard_path(self, shard: Shard) -> str:
        return os.path.join(self.out, shard.name)

    def _record_path(self, shard: Shard) -> str:
        return os.path.join(self.dir, shard.name + ".json")

    def read_record(self, shard: Shard) -> dict[str, Any] | None:
        """The finished-shard record, or None when the shard is not finished."""
        path = self._record_path(shard)
        if not os.path.isfile(path) or not os.path.isfile(self.shard_path(shard)):
            return None
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if (record.get("start"), record.get("stop")) != (shard.start, shard.stop):
            return None
        try:
            reader = array_record_module.ArrayRecordReader(self.shard_path(shard))
            try:
                num_records = reader.num_records()
            finally:
                reader.close()
        except (OSError, RuntimeError, ValueError):
            return None
        return record if num_records == record.get("records") else None

    def write_record(self, shard: Shard, records: int, skipped: list[str]) -> None:
        """Marks `shard` finished (call after its shard file is in place)."""
        body = {"start": shard.start, "stop": shard.stop, "records": records, "skipped": skipped}
        os.makedirs(self.dir, exist_ok=True)
        files.atomic_write_bytes(self._record_path(shard), json.dumps(body).encode())

    def remove_stale_temporaries(self, shard: Shard) -> None:
        """Deletes temporary files a killed run left behind for `shard`."""
        pattern = glob.escape(self.shard_path(shard)) + files.TEMPORARY_MARKER + "*"
        for path in glob.glob(pattern):
            os.remove(path)

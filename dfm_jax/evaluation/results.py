"""Evaluation outputs: ``results.csv`` / ``results.md``, ADM sample files, PNG grids.

``<workdir>/eval/results.csv`` has one row per evaluated sweep point with the
columns ``COLUMNS`` (metrics a run did not compute are empty); ``results.md`` is
the same table in Markdown, regenerated from the CSV after every point. Both are
written atomically (a temporary file, then a rename), so an interrupted run
leaves complete files, and the next run skips the points whose ``KEY_COLUMNS``
(checkpoint step, imported checkpoint, number of samples, seed, metric set and
sampler settings) already have a row. ``init`` is empty for the workdir's own checkpoints and
``<path>:<key>`` for an imported one (``init_text``); a ``results.csv`` written before
the column existed reads it as empty.

Throughput columns: ``gen_images_per_s`` is samples per second of generation
(sampling, decoding, uint8 quantisation), ``feature_images_per_s`` of feature
extraction plus the host-side metric accumulation; both leave out the first
batch, which compiles, when there is more than one. ``seconds`` is the point's
wall time, compilation and the final metric computation included.

Paths go through ``etils.epath``, so the workdir may be a ``gs://`` bucket.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from dfm_jax.evaluation.features import METRIC_COLUMNS
from dfm_jax.utils import files, viz

KEY_COLUMNS = (
    "step",
    "init",
    "num_samples",
    "seed",
    "metrics",
    "cfg",
    "tau",
    "steps",
    "solver",
    "interval",
)
THROUGHPUT_COLUMNS = ("gen_images_per_s", "feature_images_per_s", "seconds")
COLUMNS = (*KEY_COLUMNS, "nfe", *METRIC_COLUMNS, *THROUGHPUT_COLUMNS)
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"

_HEADERS = {
    "num_samples": "samples",
    "gen_images_per_s": "gen img/s",
    "feature_images_per_s": "feat img/s",
    "seconds": "s",
    "is_std": "IS std",
    "is": "IS",
    "fid": "FID",
    "fdd": "FDD",
    "fd_fmnist": "FD-FMNIST",
    "fvd_fmnist": "FVD-FMNIST",
}


def format_value(column: str, value: Any) -> str:
    """The text of a value in ``results.csv``."""
    if value is None or value == "":
        return ""
    if isinstance(value, float | np.floating):
        if column == "seconds":
            return f"{value:.1f}"
        if column in THROUGHPUT_COLUMNS:
            return f"{value:.4g}"
        return f"{value:.6g}"
    return str(value)


def init_text(path: str | None, key: str) -> str:
    """The ``init`` column: ``""`` for workdir checkpoints, ``<path>:<key>`` for imported ones."""
    return f"{path}:{key}" if path else ""


def sample_file_stem(step: int, point_name: str, seed: int, init: str) -> str:
    """The file name, without extension, of one point's sample files.

    ``samples_step<N>_<point>`` for the workdir's checkpoints with seed 0, then
    ``_seed<S>`` for another seed and, for an imported checkpoint (``init`` as
    ``init_text`` writes it), ``_init-<file stem>-<key>-<6 hex digits of the path>``, so
    that evaluating a second imported file, or the other state dict of the same one,
    never overwrites the first one's samples.
    """
    stem = f"samples_step{step}_{point_name}"
    if seed:
        stem += f"_seed{seed}"
    if init:
        path, _, key = init.rpartition(":")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])
        digest = hashlib.sha1(path.encode()).hexdigest()[:6]
        stem += f"_init-{name}-{key}-{digest}"
    return stem


def row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The identity of a result row (what resuming compares)."""
    return tuple(format_value(c, row.get(c, "")) for c in KEY_COLUMNS)


def read_results(eval_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of ``eval_dir/results.csv`` (empty when absent)."""
    path = epath.Path(eval_dir) / RESULTS_CSV
    if not path.exists():
        return []
    with path.open("r") as f:
        return [dict(row) for row in csv.DictReader(f)]


def write_results(eval_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes ``rows`` to ``results.csv`` and the Markdown table to ``results.md``."""
    extra = sorted({c for row in rows for c in row} - set(COLUMNS))
    columns = [*COLUMNS, *extra]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: format_value(c, row.get(c, "")) for c in columns})
    directory = epath.Path(eval_dir)
    files.atomic_write_bytes(directory / RESULTS_CSV, buffer.getvalue().encode())
    table = markdown_table([{c: format_value(c, row.get(c, "")) for c in columns} for row in rows])
    header = "# Evaluation results\n\nGenerated from results.csv by dfm_jax.eval.\n\n"
    files.atomic_write_bytes(directory / RESULTS_MD, (header + table).encode())


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of result rows: the sweep columns, then the filled metric columns."""
    shown = ["step", "init", "num_samples", "cfg", "tau", "steps", "solver", "interval", "nfe"]
    shown += [c for c in METRIC_COLUMNS if any(row.get(c, "") != "" for row in rows)]
    shown += list(THROUGHPUT_COLUMNS)
    for optional in ("init", "tau"):  # shown when some row has one
        if not any(row.get(optional, "") for row in rows):
            shown.remove(optional)
    lines = [
        "| " + " | ".join(_HEADERS.get(c, c) for c in shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(c, row.get(c, "")) for c in shown) + " |")
    return "\n".join(lines) + "\n"


class AdmNpzWriter:
    """Streams samples into an ADM-format ``.npz``: ``arr_0`` uint8 images, ``arr_1`` labels.

    The archive is the layout of ``np.savez`` (stored, not compressed; zip64), so
    ``np.load`` and ADM's evaluator read it, but the images are written batch by
    batch and never held in memory together. It is written under a temporary name
    and renamed into place by ``close()``; ``abort()`` removes it.

    Args:
      path: the output file.
      image_shape: one image's ``(H, W, C)``.
      labels: all ``N`` labels, int.
    """

    def __init__(self, path: str | os.PathLike, image_shape: Sequence[int], labels: np.ndarray):
        self._target = files.AtomicPath(path)
        self.path, self.temporary = self._target.path, self._target.temporary
        self.labels = np.asarray(labels, np.int64)
        self.shape = (len(self.labels), *(int(s) for s in image_shape))
        self.written = 0
        self._file = self.temporary.open("wb")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._entry = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._entry, header)

    def write(self, images: np.ndarray) -> None:
        """Appends ``(n, H, W, C)`` uint8 images."""
        images = np.ascontiguousarray(images, np.uint8)
        if images.shape[1:] != self.shape[1:] or self.written + len(images) > self.shape[0]:
            raise ValueError(
                f"cannot append images {images.shape} to {self.shape} ({self.written} written)"
            )
        self._entry.write(images.tobytes())
        self.written += len(images)

    def close(self) -> None:
        """Finishes the archive and moves it into place."""
        if self.written != self.shape[0]:
            raise ValueError(f"wrote {self.written} of {self.shape[0]} images")
        self._entry.close()
        with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, self.labels, allow_pickle=False)
        self._zip.close()
        self._file.close()
        self._target.commit()

    def abort(self) -> None:
        for closable in (self._entry, self._zip, self._file):
            with contextlib.suppress(ValueError, OSError):
                closable.close()
        self._target.discard()


def save_sample_sheet(stem: str | os.PathLike, samples: np.ndarray, columns: int | None = None):
    """Writes uint8 images ``(N, H, W, C)`` as one PNG grid ``<stem>.png``, or clips
    ``(N, T, H, W, C)`` as an animated GIF of such grids ``<stem>.gif`` (frame t shows
    frame t of every clip); ``columns`` default sqrt N. Returns the path written."""
    samples = np.asarray(samples, np.uint8)
    if columns is None:
        columns = max(1, int(np.ceil(np.sqrt(len(samples)))))
    if samples.ndim == 5:
        frames = [
            viz.image_grid(viz.from_uint8(samples[:, t]), columns=columns)
            for t in range(samples.shape[1])
        ]
        path = f"{os.fspath(stem)}.gif"
        viz.save_gif(path, np.stack(frames))
        return path
    grid = viz.image_grid(viz.from_uint8(samples), columns=columns)
    path = f"{os.fspath(stem)}.png"
    files.atomic_write_bytes(path, viz.png_bytes(grid))
    return path


def summary_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The Markdown table of ``rows`` (printed at the end of a sweep)."""
    rows = list(rows)
    return markdown_table(rows) if rows else "(no results)\n"

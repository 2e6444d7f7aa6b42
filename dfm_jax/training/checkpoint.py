"""Orbax checkpoints of the train state, the data-iterator state and the config.

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items:

* ``state``:  the sharded ``TrainState`` pytree (params, EMA, optimizer, step);
* ``data``:   the Grain iterator state, so a resumed run sees the same batches;
* ``config``: the run's config as JSON (for reading, never for resuming logic).

Saves are asynchronous (training continues while the arrays are written) and
atomic (Orbax writes to a temporary directory and renames it when complete), so
a ``kill -9`` at any moment leaves the last complete checkpoint readable.

Faults (``docs/reliability.md``):

* **Newest readable checkpoint wins.** ``restore_newest`` (the trainer) and
  ``newest_readable`` (evaluation) try the steps newest first; a checkpoint that fails
  to read (corrupt or missing files, truncated metadata, a tree that does not match the
  model) is logged with its step and the reason and the next older one is tried. The
  trainer renames an unreadable step aside to ``<step>.corrupt-<UTC time>`` (never
  deletes it; evaluation only skips it, it never writes into a workdir); when no step
  is readable, ``NoReadableCheckpointError`` lists what was tried.
* **A failed save** (a full disk, a read-only or vanished directory), which Orbax may
  report only at the next save or at ``wait``/``close`` since saves are asynchronous,
  becomes ``CheckpointSaveError`` naming the step, the path, the space the state needs
  and the space free; the earlier checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dfm_jax.utils import errors

#: Infix of a step directory renamed aside because it could not be read.
CORRUPT_MARKER = ".corrupt-"

#: errno values of a save that cannot succeed until the user frees space or permissions.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}


class NoReadableCheckpointError(errors.RunFault):
    """The workdir has (or had) checkpoints, but none of them could be read."""


class CheckpointSaveError(errors.RunFault):
    """A checkpoint could not be written (full disk, read-only or missing directory)."""


def _reason(error: BaseException) -> str:
    """One line for why a checkpoint could not be read."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(error).__name__}: {text}"


def _storage_error(error: BaseException) -> OSError | None:
    """The OSError of a full or unwritable disk behind ``error`` (its causes included)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return error
        text = str(error)
        for code in _STORAGE_ERRNOS:  # tensorstore reports C++ errors as text
            if os.strerror(code) in text:
                return OSError(code, text)
        error = error.__cause__ or error.__context__
    return None


def _all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (one collective with several processes)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).min())


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one training run.

    Args:
      directory: where step directories live (local path, relative or absolute, or
        ``gs://``).
      max_to_keep: number of most recent checkpoints kept.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        directory = os.fspath(directory)
        # Orbax needs absolute paths; remote paths (gs://...) are absolute already.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data", "config"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the newest save

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        config: dict | None = None,
    ) -> bool:
        """Starts saving ``state`` (and the iterator state and config) at ``step``.

        Returns whether a save was started (False when that step already exists).
        """
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
        pending = self._pending
        self._pending = (step, _nbytes(state))
        with self._save_errors(pending):  # the previous save's error surfaces here
            self._manager.wait_until_finished()
        with self._save_errors(self._pending):
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            logging.info("Saving checkpoint of step %d to %s", step, self.directory)
        return saved

    def _save_errors(self, pending: tuple[int, int] | None):
        """Turns a storage error of the save of ``pending`` (step, bytes) into a clear one."""
        return _SaveErrors(self, pending)

    def _save_error(self, pending: tuple[int, int] | None, error: OSError) -> CheckpointSaveError:
        step, needed = pending if pending else (None, 0)
        what = f"checkpoint of step {step}" if step is not None else "a checkpoint"
        message = f"could not save {what} to {self.directory}: {error.strerror or error}"
        kept = [s for s in _step_dirs(self.directory) if s != step]
        # Many small arrays take up to twice their bytes on disk: the newest checkpoint
        # written is the better estimate when there is one.
        if kept:
            needed = max(needed, _local_size(os.path.join(self.directory, str(kept[-1]))))
        if needed:
            message += f"; a checkpoint needs about {needed / 2**20:.1f} MiB"
        try:
            free = shutil.disk_usage(self.directory).free
            message += f", {free / 2**20:.1f} MiB are free there"
        except OSError:
            pass
        message += (
            f". The earlier checkpoints {kept} are intact; free space (or fix the "
            "permissions) and rerun the same command to resume from the newest."
            if kept
            else ". No earlier checkpoint exists; free space and rerun the same command."
        )
        return CheckpointSaveError(message)

    def restore(
        self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None
    ) -> tuple[Any, int]:
        """Restores the state into the shardings of ``abstract_state``.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``
            set (e.g. from ``jax.eval_shape`` plus the run's shardings); the
            restored arrays are placed directly with those shardings.
          data_iterator: a Grain iterator whose state is restored in place.
          step: which step; defaults to the latest.

        Returns:
          ``(state, step)``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("Restored checkpoint of step %d from %s", step, self.directory)
        return restored["state"], step

    def restore_newest(
        self, abstract_state: Any, data_iterator: Any | None = None, *, rename: bool = True
    ) -> tuple[Any, int]:
        """The newest readable checkpoint; unreadable newer ones are renamed aside.

        ``rename=False`` only skips them (a directory this run does not own).

        Raises:
          NoReadableCheckpointError: no step could be read (the message lists each
            step tried and why it failed), or only renamed-aside ones are left.
        """

        def read(step):
            return self.restore(abstract_state, data_iterator, step=step)

        return self._newest(read, rename=rename)

    def newest_readable(
        self, abstract_fields: dict[str, Any], steps: Sequence[int] | None = None
    ) -> tuple[dict[str, Any], int]:
        """``restore_fields`` of the newest readable step (of ``steps``); nothing is renamed.

        Evaluation uses it on workdirs that may be training, so it only skips.
        """

        def read(step):
            return self.restore_fields(abstract_fields, step), step

        return self._newest(read, rename=False, steps=steps)

    def _newest(self, read: Callable[[int], tuple[Any, int]], *, rename: bool, steps=None):
        steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
        tried = []
        for step in steps:
            try:
                result, error = read(step), None
            except Exception as e:  # any failure to read means: try the next older step
                result, error = None, e
            if _all_processes(error is None):
                if tried:
                    logging.warning(
                        "Resuming from step %d, the newest readable checkpoint in %s",
                        step,
                        self.directory,
                    )
                return result
            reason = _reason(error) if error is not None else "unreadable on another process"
            aside = self._set_aside(step) if rename else None
            where = f"; renamed to {aside}" if aside else ""
            logging.warning(
                "Checkpoint of step %d in %s is unreadable (%s)%s; trying the next older one",
                step,
                self.directory,
                reason,
                where,
            )
            tried.append(f"step {step}: {reason}{where}")
        aside = self.set_aside()
        if not tried and not aside:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        lines = "; ".join(tried) if tried else "no step left to try"
        raise NoReadableCheckpointError(
            f"no readable checkpoint in {self.directory} ({lines})"
            + (f"; set aside: {aside}" if aside else "")
            + ". Nothing was deleted: restore a step directory from a backup (or rename one "
            "back), or start a new run in another workdir."
        )

    def set_aside(self) -> list[str]:
        """The names of the step directories renamed aside as unreadable."""
        try:
            return sorted(p.name for p in epath.Path(self.directory).glob(f"*{CORRUPT_MARKER}*"))
        except OSError:
            return []

    def _set_aside(self, step: int) -> str | None:
        """Renames step ``step``'s directory to ``<step>.corrupt-<UTC time>`` (process 0)."""
        name = None
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            source = epath.Path(self.directory) / str(step)
            target = source.parent / f"{step}{CORRUPT_MARKER}{stamp}"
            suffix = 1
            while target.exists():
                target = source.parent / f"{step}{CORRUPT_MARKER}{stamp}-{suffix}"
                suffix += 1
            try:
                source.rename(target)
                name = target.name
            except OSError as e:
                logging.warning("Could not rename %s aside: %s", source, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"dfm_jax checkpoint set aside {step}")
        self._manager.reload()
        return name

    def restore_fields(self, abstract_fields: dict[str, Any], step: int) -> dict[str, Any]:
        """Restores only some top-level fields of the saved state, e.g. the EMA parameters.

        ``abstract_fields`` maps field names of the saved ``TrainState`` (e.g.
        ``{"ema_params": abstract_state.ema_params}``) to abstract pytrees with shardings;
        nothing else is read, so evaluating a big model does not hold its optimizer state.
        """
        path = os.path.join(self.directory, str(step), "state")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_fields)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=abstract_fields, restore_args=restore_args, partial_restore=True
                ),
            )
        logging.info("Restored %s of step %d from %s", sorted(abstract_fields), step, path)
        return restored

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete (``CheckpointSaveError``)."""
        with self._save_errors(self._pending):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # a failed save is reported by wait() already
                logging.warning("Closing the checkpoint manager of %s: %s", self.directory, e)


class _SaveErrors:
    """Context manager of ``Checkpointer._save_errors``."""

    def __init__(self, checkpointer: Checkpointer, pending):
        self.checkpointer, self.pending = checkpointer, pending

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, CheckpointSaveError):
            return False
        storage = _storage_error(error)
        if storage is None:
            return False
        raise self.checkpointer._save_error(self.pending, storage) from error


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype"))  # fmt: skip


def _local_size(path: str) -> int:
    """Bytes of the files under a local ``path`` (0 for remote or unreadable paths)."""
    if "://" in path:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _step_dirs(directory: str) -> list[int]:
    """The step-named directories in ``directory`` (complete checkpoints; local or remote)."""
    try:
        return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
    except OSError:
        return []


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying the given shardings (restore targets)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )

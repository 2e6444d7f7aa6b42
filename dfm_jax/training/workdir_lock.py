"""One trainer per workdir: a lock file naming its holder, and a writability check.

``WorkdirLock(workdir)`` is taken by ``loop.run`` before anything is written and released
in a ``finally``. The lock is ``<workdir>/train.lock``, a JSON document with the
holder's host, pid, start time (UTC) and command line, created atomically (written
under a temporary name, then hard-linked into place, which fails when a lock exists),
so a reader never sees a partial lock. A second trainer on the same workdir stops at
once with ``WorkdirLockedError`` naming the holder. A lock left by a process that no
longer exists on this host is taken over with a warning; a lock of another host is
never taken over (its liveness cannot be checked): the message says to delete it once
that run is gone. With several processes, process 0 takes the lock and the decision is
shared with the others, as ``PreemptionWatcher`` shares SIGTERM. Evaluation never takes
the lock (it only reads the workdir).

``check_writable(workdir)`` creates the workdir and a probe file in it, so a read-only
(or otherwise unwritable) workdir is refused at start, not at the first checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dfm_jax.utils import errors

LOCK_NAME = "train.lock"


class WorkdirLockedError(errors.RunFault):
    """Another trainer holds the workdir's lock."""


class UnwritableWorkdirError(errors.RunFault):
    """The workdir cannot be written (read-only file system, permissions)."""


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` if needed and writes and deletes a probe file in it."""
    path = epath.Path(workdir)
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe")
        probe.unlink()
    except OSError as e:
        raise UnwritableWorkdirError(
            f"the workdir {workdir} is not writable ({e.strerror or e}): a run needs to write "
            "checkpoints there; pass a writable --workdir (or remount it read-write)"
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    """``pid 123 on host h since <time> (python -m dfm_jax.main ...)``."""
    command = " ".join(holder.get("command", [])) or "?"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
        f"{holder.get('started', '?')} ({command})"
    )


class WorkdirLock:
    """The lock of one workdir (``acquire``, ``release``; also a context manager)."""

    def __init__(self, workdir: str):
        self.workdir = os.fspath(workdir)
        self.path = epath.Path(self.workdir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": list(sys.argv),
            "token": self.token,
        }

    def read(self) -> dict | None:
        """The holder's record, or None when there is no lock (an unreadable one: {})."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        """Writes the lock atomically; False when one exists already."""
        if "://" in self.workdir:  # object stores have no exclusive create: best effort
            if self.path.exists():
                return False
            self.path.write_text(json.dumps(self._record()))
            return True
        temporary = self.path.parent / f"{LOCK_NAME}.tmp-{os.getpid()}-{self.token}"
        temporary.write_text(json.dumps(self._record(), indent=1))
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()

    def _try_acquire(self) -> str | None:
        """Takes the lock on this process; the reason when it cannot."""
        for _ in range(3):
            if self._create():
                return None
            holder = self.read()
            if holder is None:  # released in between
                continue
            if not holder:
                return (
                    f"{self.path} exists but cannot be read; if no trainer uses this workdir, "
                    "delete it"
                )
            same_host = holder.get("host") == socket.gethostname()
            pid = int(holder.get("pid", -1))
            if same_host and pid > 0 and not _alive(pid):
                logging.warning(
                    "Taking over the lock %s left by %s, which no longer runs",
                    self.path,
                    describe(holder),
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            where = "" if same_host else " (another host: delete the lock once that run is gone)"
            return (
                f"another trainer uses the workdir {self.workdir}: {describe(holder)}{where}. "
                "Wait for it to finish, stop it, or pass another --workdir "
                "(python -m dfm_jax.eval may read a workdir while it trains)"
            )
        return f"could not take the lock {self.path} (it keeps changing)"

    def acquire(self) -> None:
        """Takes the lock (process 0) or raises ``WorkdirLockedError`` on every process."""
        reason = self._try_acquire() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(reason is None))
            if not int(ok) and reason is None:
                reason = f"process 0 could not take the lock {self.path} (see its log)"
        if reason is not None:
            raise WorkdirLockedError(reason)
        self.held = jax.process_index() == 0
        if self.held:
            logging.info("Took the workdir lock %s", self.path)

    def release(self) -> None:
        """Deletes the lock if this process holds it (and it is still this process's)."""
        if not self.held:
            return
        self.held = False
        holder = self.read()
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            logging.warning("The workdir lock %s was replaced by %s", self.path, holder)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

"""Atomic file writes: a temporary file next to the target, then a rename into place.

Readers never see a partial file under the final name: a write that fails (or a
process that is killed) leaves the previous file, if any, untouched. Paths go
through ``etils.epath``, so they may be local or ``gs://`` (on an object store the
rename is a copy and a delete, which still never exposes a partial object).

Temporary files are named ``<name>.tmp-<pid>-<uuid hex>`` (``TEMPORARY_MARKER``) in
the target's directory, so concurrent writers never share one, and code cleaning
up after killed runs can glob for ``<name>.tmp-*``.

- ``atomic_write_bytes(path, payload)`` writes a whole payload;
- ``AtomicPath(path)`` is for streaming writers that need a path to write to: a
  context manager yielding the temporary path, renamed onto ``path`` when the
  block succeeds and deleted when it raises (or ``commit()`` / ``discard()``).
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from typing import IO, Any

from etils import epath

TEMPORARY_MARKER = ".tmp-"


def temporary_path(path: str | os.PathLike) -> epath.Path:
    """A fresh temporary path next to ``path``: ``<name>.tmp-<pid>-<uuid hex>``."""
    path = epath.Path(path)
    return path.parent / f"{path.name}{TEMPORARY_MARKER}{os.getpid()}-{uuid.uuid4().hex}"


def remove_if_exists(path: str | os.PathLike) -> None:
    """Deletes the file ``path`` if there is one."""
    path = epath.Path(path)
    with contextlib.suppress(FileNotFoundError):
        if path.exists():
            path.unlink()


def sync(file: IO[Any]) -> None:
    """Flushes ``file`` and, for a local file, its data to the disk (``os.fsync``)."""
    file.flush()
    with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):
        os.fsync(file.fileno())


class AtomicPath:
    """A temporary path for ``path``; ``commit()`` renames it into place, ``discard()`` deletes it.

    As a context manager it yields the temporary path and commits when the block
    exits normally, discards when it raises::

        with files.AtomicPath(out) as temporary:
            write_somehow(os.fspath(temporary))

    The parent directory of ``path`` is created if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = temporary_path(self.path)

    def commit(self) -> None:
        """Moves the temporary file onto ``path`` (deleting it if that fails)."""
        try:
            self.temporary.replace(self.path)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Deletes the temporary file (if it was created)."""
        remove_if_exists(self.temporary)

    def __enter__(self) -> epath.Path:
        return self.temporary

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Writes ``payload`` to ``path`` atomically (temporary file, sync, rename)."""
    with AtomicPath(path) as temporary, temporary.open("wb") as f:
        f.write(payload)
        sync(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode("utf-8"))

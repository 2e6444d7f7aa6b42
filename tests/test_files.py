"""Tests for dfm_jax.utils.files: atomic writes leave either the old or the new file."""

import glob
import os

import pytest

from dfm_jax.utils import files


def test_atomic_write_bytes_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    files.atomic_write_bytes(path, b"first")
    files.atomic_write_bytes(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["out.bin"]


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fail(file):
        file.flush()  # the new bytes are on the disk, under some name
        raise OSError("disk full")

    monkeypatch.setattr(files, "sync", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(path, b"new, never complete")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_commits_on_success_and_discards_on_error(tmp_path):
    path = tmp_path / "stream.txt"
    with files.AtomicPath(path) as temporary:
        assert not path.exists()
        temporary.write_text("streamed")
    assert path.read_text() == "streamed"

    with pytest.raises(RuntimeError), files.AtomicPath(path) as temporary:
        temporary.write_text("partial")
        raise RuntimeError("writer died")
    assert path.read_text() == "streamed"
    assert os.listdir(tmp_path) == ["stream.txt"]


def test_temporary_names_match_the_cleanup_glob(tmp_path):
    """``preparation.shards`` deletes leftovers of killed runs by globbing ``<name>.tmp-*``."""
    target = tmp_path / "latents-00000-of-00001.array_record"
    first, second = files.temporary_path(target), files.temporary_path(target)
    assert first != second and first.parent == tmp_path
    first.write_bytes(b"leftover")
    assert glob.glob(glob.escape(str(target)) + ".tmp-*") == [os.fspath(first)]

"""segclip.runtime._atomic: a failed write leaves the old file and no temp file."""

from __future__ import annotations

import os

import pytest

from segclip.runtime._atomic import atomic_open, atomic_write_bytes


def test_replaces_with_usual_permissions(tmp_path):
    path = atomic_write_bytes(tmp_path / "f.bin", b"new")
    assert path.read_bytes() == b"new"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def test_failure_keeps_old_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

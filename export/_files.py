"""Atomic file and directory writes: a reader sees the old content or the complete new one.

Files: temp file beside the target, fsync, `os.replace`. Directories: the bundle is built in a
hidden temp directory beside the target and swapped in by renames (`swap_directory`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segclip.runtime._atomic import _UMASK, atomic_write_bytes


def atomic_write_json(path: Path, payload: dict[str, Any]) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def make_staging_dir(target: Path) -> Path:
    """A hidden, empty directory beside `target` (same filesystem, so renames are atomic), with
    the permissions a plain `mkdir` would give (mkdtemp makes it 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_UMASK)
    return staging


def swap_directory(staging: Path, target: Path) -> None:
    """Move the finished `staging` directory to `target`, replacing an existing one.

    POSIX has no atomic exchange of two non-empty directories, so an existing target is first
    renamed aside, then `staging` takes its name, then the old one is deleted; if the second rename
    fails the old directory is put back. `target` never holds a mixture of old and new files.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def file_size_text(n_bytes: int) -> str:
    """Human-readable size: 1.2 MB, 340 kB, 12 B."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"

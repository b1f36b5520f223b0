"""Helpers of the benchmark tests (a uniquely named module: tests/ folders share sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the helpers under test import as bench._stats etc.
    sys.path.insert(0, str(ROOT))

QUICK = ["--threads", "1", "--warmup", "1", "--min-iters", "2", "--min-seconds", "0",
         "--max-seconds", "0.5"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python bench/<script> args...` from the repo root; fails the test on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc

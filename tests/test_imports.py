"""Import-direction contract (docs/architecture.md): `segclip` and `segclip.runtime` load
without
torch. Each check runs in a fresh interpreter, from a directory outside the repository, so it sees
the installed package mapping (`segclip.runtime` -> runtime/) and nothing already imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("module", ["segclip", "segclip.runtime"])
def test_import_does_not_load_torch(module: str, tmp_path: Path) -> None:
    result = run_python(f"import sys, {module}; assert 'torch' not in sys.modules, "
                        f"sorted(m for m in sys.modules if m.startswith('torch'))[:5]", tmp_path)
    assert result.returncode == 0, result.stderr


def test_config_works_without_torch(tmp_path: Path) -> None:
    result = run_python("import sys, segclip\n"
                        "assert segclip.ModelConfig.preset('tiny').num_centers == 8\n"
                        "assert segclip.__version__\n"
                        "assert 'torch' not in sys.modules\n", tmp_path)
    assert result.returncode == 0, result.stderr


def test_lazy_names_resolve(tmp_path: Path) -> None:
    result = run_python(
        "import segclip\n"
        "from segclip.checkpoint import load_checkpoint\n"
        "from segclip.model import SegCLIP\n"
        "assert segclip.SegCLIP is SegCLIP and segclip.load_checkpoint is load_checkpoint\n"
        "assert callable(segclip.tokenize) and callable(segclip.save_checkpoint)\n"
        "try:\n"
        "    segclip.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert str(e) == \"module 'segclip' has no attribute 'no_such_name'\", e\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n", tmp_path)
    assert result.returncode == 0, result.stderr

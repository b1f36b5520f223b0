"""The runtime never imports torch (DESIGN.md "Layout and packages"), checked in a subprocess."""

from __future__ import annotations

import subprocess
import sys

MODULES = ["segclip.runtime", "segclip.runtime.contract", "segclip.runtime.errors",
           "segclip.runtime.assign", "segclip.runtime.images", "segclip.runtime.labels",
           "segclip.runtime.tokenizer", "segclip.runtime.visualize", "segclip.runtime.windows"]


def test_runtime_modules_do_not_import_torch():
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not leaked, leaked\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr

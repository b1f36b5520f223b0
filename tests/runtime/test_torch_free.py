"""The runtime never imports torch (docs/architecture.md "Layout and packages"), checked in a
subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODULES = ["segclip.runtime", "segclip.runtime.contract", "segclip.runtime.errors",
           "segclip.runtime.assign", "segclip.runtime.images", "segclip.runtime.labels",
           "segclip.runtime.tokenizer", "segclip.runtime.visualize", "segclip.runtime.windows",
           "segclip.runtime.bundle", "segclip.runtime.backends",
           "segclip.runtime.backends.base", "segclip.runtime.backends.onnxruntime",
           "segclip.runtime.embeddings", "segclip.runtime.segmenter", "segclip.runtime.runner",
           "segclip.runtime.cli"]
LEAKED = ("leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
          "assert not leaked, leaked\n")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_runtime_modules_do_not_import_torch():
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n" + LEAKED)
    result = run(code)
    assert result.returncode == 0, result.stderr


def test_segmenting_does_not_import_torch(tiny_bundle: Path):
    code = ("import sys\nimport numpy as np\nfrom segclip.runtime import Segmenter\n"
            f"seg = Segmenter({str(tiny_bundle)!r}, device='auto')\n"
            "result = seg.segment(np.zeros((70, 90, 3), np.uint8), ['cat', 'dog'])\n"
            "assert result.label_map.shape == (70, 90)\n" + LEAKED)
    result = run(code)
    assert result.returncode == 0, result.stderr


def test_gpu_modules_are_not_imported_on_the_cpu_path(tiny_bundle: Path):
    code = ("import sys\nfrom segclip.runtime import Segmenter\n"
            f"Segmenter({str(tiny_bundle)!r}, device='cpu')\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cupy')\n"
            "               or m in ('segclip.runtime.backends.tensorrt',\n"
            "                        'segclip.runtime.assign_cuda', 'segclip.runtime._cuda'))\n"
            "assert not heavy, heavy\n")
    result = run(code)
    assert result.returncode == 0, result.stderr

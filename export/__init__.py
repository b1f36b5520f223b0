"""segclip.export: PyTorch checkpoint -> bundle (ONNX, TensorRT) (docs/architecture.md "Bundle
contract").

Names are imported on first use so that `segclip-export --help` and the error paths stay fast.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "export_bundle": "segclip.export.bundle",
    "export_model": "segclip.export.bundle",
    "verify_bundle": "segclip.export.bundle",
    "ParityReport": "segclip.export.parity",
    "ImageParity": "segclip.export.parity",
    "summary_table": "segclip.export.manifest",
    "read_manifest": "segclip.export.manifest",
    "build_engines": "segclip.export.tensorrt_build",
    "ExportError": "segclip.export.errors",
    "ParityError": "segclip.export.errors",
    "EngineBuildError": "segclip.export.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segclip.export' has no attribute {name!r}")

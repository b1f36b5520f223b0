"""segclip.runtime: the torch-free inference side of SegCLIP (docs/architecture.md "Layout and
packages").

numpy, pillow, onnxruntime and `tokenizers` only; TensorRT lives in one backend module that is
imported on demand. Nothing under this package may import torch (tested). The public names are
loaded on first use, so `import segclip.runtime` stays cheap:

    from segclip.runtime import Segmenter
    result = Segmenter("bundle/", device="cpu").segment("cat.jpg", ["cat", "dog"])
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Segmenter": "segclip.runtime.segmenter",
    "SegmentResult": "segclip.runtime.segmenter",
    "Bundle": "segclip.runtime.bundle",
    "create_backend": "segclip.runtime.backends",
    "LabelTruncatedWarning": "segclip.runtime.embeddings",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segclip.runtime' has no attribute {name!r}")

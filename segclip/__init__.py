"""segclip: open-vocabulary semantic segmentation (SegCLIP) — training, export and runtime.

This module stays light: torch is imported only when a torch-backed name is first used, so that
`import segclip` and `import segclip.runtime` work without torch.
"""

from __future__ import annotations

from typing import Any

from segclip._version import __version__
from segclip.config import ModelConfig
from segclip.errors import SegclipError

_LAZY = {
    "SegCLIP": "segclip.model",
    "ImageOutput": "segclip.model",
    "LossWeights": "segclip.model",
    "load_checkpoint": "segclip.checkpoint",
    "save_checkpoint": "segclip.checkpoint",
    "tokenize": "segclip.text",
}

__all__ = ["ModelConfig", "SegclipError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segclip' has no attribute {name!r}")

"""segclip.runtime: the torch-free inference side of SegCLIP (DESIGN.md "Layout and packages").

numpy, pillow, onnxruntime and `tokenizers` only; TensorRT lives in one backend module that is
imported on demand. Nothing under this package may import torch (tested).
"""

from __future__ import annotations

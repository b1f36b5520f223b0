"""What every inference backend offers the `Segmenter` (docs/architecture.md "Bundle contract").

A backend runs the bundle's two towers: `run_image` on a batch of CLIP-normalised windows and
`run_text` on token ids. It is safe to call from several threads at once (ONNX Runtime sessions
are; the TensorRT backend keeps one execution context and stream per thread). A backend on a GPU
may also offer `label_windows`, which keeps the soft assignment on the device and runs the CUDA
label-assignment kernel, copying back only the label map.
Legend: B windows, S window side, L regions, D embedding width, h x w patch grid, T labels,
C context length, H x W output pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from segclip.runtime.errors import EngineError, NonFiniteOutputError


@dataclass(frozen=True)
class ImageOutputs:
    """Outputs of the image tower for a batch of windows (host arrays, float32)."""

    global_: np.ndarray  # (B, D) L2-normalised
    regions: np.ndarray  # (B, L, D) L2-normalised
    assign: np.ndarray  # (B, L, h, w) soft assignment


@runtime_checkable
class Backend(Protocol):
    """The two towers of a bundle behind one engine (ONNX Runtime or TensorRT)."""

    name: str  # "onnxruntime" or "tensorrt"
    device: str  # "cpu" or "cuda"
    provider: str  # what actually runs the graphs, e.g. "CPUExecutionProvider", "TensorRT 10.9"
    max_batch: int | None  # most windows per run_image call (None: no limit)

    def run_image(self, batch: np.ndarray) -> ImageOutputs:
        """(B, 3, S, S) float32 windows -> global (B, D), regions (B, L, D), assign (B, L, h, w)."""
        ...

    def run_text(self, tokens: np.ndarray) -> np.ndarray:
        """(T, C) int64 token ids -> (T, D) float32 L2-normalised label embeddings."""
        ...

    def info(self) -> dict[str, Any]:
        """What runs where: backend, device, provider, files, precision (for results/JSON)."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory (the backend is unusable afterwards)."""
        ...


# region labels from (global (n, D), regions (n, L, D)) -> (n, L) uint16
RegionLabeler = Callable[[np.ndarray, np.ndarray], np.ndarray]


class DeviceLabeling(Protocol):
    """Optional: image tower + label assignment with the assignment kept on the GPU."""

    def label_windows(self, windows: np.ndarray, labeler: RegionLabeler,
                      resized_hw: tuple[int, int], window: int,
                      out_hw: tuple[int, int]) -> tuple[np.ndarray, dict[str, float]]:
        """(n, 3, S, S) windows -> ((H, W) uint16 label map, {"image": ms, "assign": ms})."""
        ...


def check_image_outputs(outputs: ImageOutputs, batch: int, source: str) -> ImageOutputs:
    """Refuse outputs off the contract (wrong rank, batch or non-finite values)."""
    glob, regions, assign = outputs.global_, outputs.regions, outputs.assign
    if (glob.ndim != 2 or regions.ndim != 3 or assign.ndim != 4 or
            not glob.shape[0] == regions.shape[0] == assign.shape[0] == batch or
            regions.shape[1] != assign.shape[1] or regions.shape[2] != glob.shape[1]):
        raise EngineError(f"{source} returned global {glob.shape}, regions {regions.shape}, "
                          f"assign {assign.shape} for a batch of {batch}; expected (B, D), "
                          f"(B, L, D), (B, L, h, w): the engine is off the bundle contract, "
                          f"re-export the bundle")
    for name, values in (("global", glob), ("regions", regions), ("assign", assign)):
        if not np.isfinite(values).all():
            raise NonFiniteOutputError(f"{source} returned non-finite {name} values (NaN or "
                                       f"inf); the engine is broken or its precision does not "
                                       f"suit this model: rebuild or re-export it, or run "
                                       f"another variant")
    return outputs


def check_text_output(text: np.ndarray, count: int, dim: int, source: str) -> np.ndarray:
    if text.shape != (count, dim):
        raise EngineError(f"{source} returned text embeddings of shape {text.shape} for {count} "
                          f"labels; expected ({count}, {dim}): re-export the bundle")
    if not np.isfinite(text).all():
        raise EngineError(f"{source} returned non-finite text embeddings; the engine is broken "
                          f"(rebuild or re-export it)")
    return text


def concat_outputs(parts: Sequence[ImageOutputs]) -> ImageOutputs:
    if len(parts) == 1:
        return parts[0]
    return ImageOutputs(np.concatenate([p.global_ for p in parts]),
                        np.concatenate([p.regions for p in parts]),
                        np.concatenate([p.assign for p in parts]))

"""Calibration windows for post-training quantisation (docs/architecture.md "Bundle contract";
docs/openvino.md "ov-int8").

Default: scenes of the synthetic shapes world (segclip/data/synth.py, evaluation split) rendered
at the window side S. Or a user folder of images, preprocessed exactly as the runtime does
(short side resized to S, S x S windows, CLIP normalisation with the bundle's mean/std).
Legend: N windows, S window side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segclip.export.errors import ExportError

DEFAULT_SAMPLES = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 CLIP-normalised."""
    pixels = image.astype(np.float32) / 255.0  # (H, W, 3)
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, H, W)


def synthetic_windows(count: int, size: int, mean: Sequence[float], std: Sequence[float],
                      seed: int = 0) -> np.ndarray:
    """(count, 3, size, size) float32: evaluation-split scenes of the synthetic world."""
    from segclip.data.synth import SynthConfig, make_scene

    config = SynthConfig(seed=seed, size=size)
    return np.stack([_normalise(make_scene(config, "eval", i).image, mean, std)
                     for i in range(count)])


def folder_windows(folder: Path, count: int, size: int, mean: Sequence[float],
                   std: Sequence[float]) -> np.ndarray:
    """(<= count, 3, size, size) float32: the windows of the images in `folder`, sorted by name,
    as the runtime cuts them."""
    from segclip.runtime.errors import ImageError
    from segclip.runtime.images import load_image, preprocess

    if not folder.is_dir():
        raise ExportError(f"--calibration {folder} is not a folder of images; pass a folder, or "
                          f"leave --calibration out to calibrate on generated shapes")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ExportError(f"--calibration {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    windows: list[np.ndarray] = []
    for path in paths:
        try:
            prepared = preprocess(load_image(path), size, mean, std)
        except ImageError as e:
            raise ExportError(f"--calibration: {e}") from e
        windows.extend(prepared.windows)  # (3, S, S) each
        if len(windows) >= count:
            break
    return np.stack(windows[:count]).astype(np.float32)  # (N, 3, S, S)


def calibration_windows(folder: Path | None, count: int, size: int, mean: Sequence[float],
                        std: Sequence[float]) -> tuple[np.ndarray, str]:
    """(windows, description) for quantisation: `folder`'s images, else synthetic scenes."""
    if count < 1:
        raise ExportError(f"--samples must be >= 1, got {count}")
    if folder is None:
        return (synthetic_windows(count, size, mean, std),
                f"{count} generated synthetic-shapes scenes (segclip.data.synth, eval split, "
                f"seed 0) at {size} px")
    windows = folder_windows(folder, count, size, mean, std)
    return windows, f"{len(windows)} windows of the images in {folder}"

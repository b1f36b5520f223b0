"""Two-tap linear interpolation along one axis, with PyTorch `align_corners=False` semantics.

`F.interpolate(mode="bilinear", align_corners=False)` (no antialias) and cv2 `INTER_LINEAR` sample
output index i at source coordinate (i + 0.5) * in / out - 0.5, clamp it below at 0, and blend
the samples floor(c) and min(floor(c) + 1, in - 1). Bilinear = this along H, then along W.
Used by the label assignment (paper §2.5: interpolate the mapping to image size) and the
short-side resize (docs/official-implementation.md §4 preprocessing). Legend: N output samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Taps:
    """Where each output sample along one axis reads, and how it blends the two reads."""

    lo: np.ndarray  # (N,) int64 lower source index
    hi: np.ndarray  # (N,) int64 upper source index (== lo at the far edge)
    frac: np.ndarray  # (N,) float32 weight of `hi`; `lo` gets 1 - frac


def source_coordinates(out_size: int, in_size: int) -> np.ndarray:
    """(N,) float64 source coordinate of each output sample, before clamping."""
    return (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5


def taps_from_coordinates(coordinates: np.ndarray, in_size: int) -> Taps:
    """Taps reading `in_size` samples at float64 `coordinates`, clamped as PyTorch clamps them."""
    coordinates = np.maximum(coordinates, 0.0)
    lo = np.minimum(np.floor(coordinates).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(coordinates - lo, 0.0, 1.0).astype(np.float32)
    return Taps(lo=lo, hi=hi, frac=frac)


def linear_taps(out_size: int, in_size: int) -> Taps:
    """Taps resampling `in_size` samples to `out_size` (up or down, no antialiasing)."""
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be >= 1, got out_size={out_size}, in_size={in_size}")
    return taps_from_coordinates(source_coordinates(out_size, in_size), in_size)


def blend(array: np.ndarray, taps: Taps, axis: int) -> np.ndarray:
    """Resample float `array` along `axis` with `taps` (result float32)."""
    shape = [1] * array.ndim
    shape[axis] = -1
    frac = taps.frac.reshape(shape)
    out = np.take(array, taps.lo, axis=axis).astype(np.float32, copy=False)
    out *= 1.0 - frac  # lower * (1 - frac) + upper * frac, in place (the same float32 ops)
    upper = np.take(array, taps.hi, axis=axis).astype(np.float32, copy=False)
    upper *= frac
    out += upper
    return out

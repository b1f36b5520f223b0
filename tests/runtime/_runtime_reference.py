"""Slow, literal references for the runtime's label assignment (tests only; torch allowed here).

`naive_window_values` follows the fused definition of `segclip.runtime.assign` ("Windows") one
output pixel at a time; `torch_*` call `F.interpolate(mode="bilinear", align_corners=False)`.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear_at(grid: np.ndarray, y: float, x: float) -> np.ndarray:
    """(L,) values of the (L, h, w) `grid` at continuous (y, x), PyTorch clamping."""
    h, w = grid.shape[1:]
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    top = grid[:, y0, x0] * (1 - fx) + grid[:, y0, x1] * fx
    bottom = grid[:, y1, x0] * (1 - fx) + grid[:, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _starts(size: int, window: int) -> list[int]:
    count = -(-size // window)
    return [i * window for i in range(count - 1)] + [size - window]


def naive_window_values(assign: np.ndarray, resized_hw: tuple[int, int], window: int,
                        out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel: owning window, interpolated (L,) values (float64).

    Returns: values (L, H, W), window row of each output row (H,), window column (W,).
    """
    assign = assign.astype(np.float64)
    n, regions, h, w = assign.shape
    resized_h, resized_w = resized_hw
    ys, xs = _starts(resized_h, window), _starts(resized_w, window)
    assert n == len(ys) * len(xs)
    height, width = out_hw
    values = np.zeros((regions, height, width))
    row_tiles = np.zeros(height, dtype=np.int64)
    col_tiles = np.zeros(width, dtype=np.int64)
    for y in range(height):
        centre_y = (y + 0.5) * resized_h / height
        ty = min(int(centre_y // window), len(ys) - 1)
        row_tiles[y] = ty
        py = (centre_y - ys[ty]) * h / window - 0.5
        for x in range(width):
            centre_x = (x + 0.5) * resized_w / width
            tx = min(int(centre_x // window), len(xs) - 1)
            col_tiles[x] = tx
            px = (centre_x - xs[tx]) * w / window - 0.5
            values[:, y, x] = bilinear_at(assign[ty * len(xs) + tx], py, px)
    return values, row_tiles, col_tiles


def torch_upsample(assign: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(L, h, w) -> (L, H, W) with torch's bilinear interpolation (align_corners=False)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(assign, dtype=np.float32))[None]
    return F.interpolate(tensor, size=tuple(out_hw), mode="bilinear",
                         align_corners=False)[0].numpy()


def torch_stitched_values(assign: np.ndarray, resized_hw: tuple[int, int],
                          window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each window upsampled to S x S by torch, pasted on the tiles it owns (output = resized)."""
    n, regions = assign.shape[:2]
    resized_h, resized_w = resized_hw
    ys, xs = _starts(resized_h, window), _starts(resized_w, window)
    values = np.zeros((regions, resized_h, resized_w), dtype=np.float32)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            up = torch_upsample(assign[iy * len(xs) + ix], (window, window))
            own_y = np.arange(iy * window, min((iy + 1) * window, resized_h))
            own_x = np.arange(ix * window, min((ix + 1) * window, resized_w))
            values[:, own_y[:, None], own_x[None, :]] = up[:, (own_y - y0)[:, None],
                                                           (own_x - x0)[None, :]]
    row_tiles = np.minimum(np.arange(resized_h) // window, len(ys) - 1)
    col_tiles = np.minimum(np.arange(resized_w) // window, len(xs) - 1)
    return values, row_tiles, col_tiles


def assert_labels_match(fused: np.ndarray, values: np.ndarray, row_tiles: np.ndarray,
                        col_tiles: np.ndarray, table: np.ndarray, tol: float = 1e-5) -> None:
    """`fused` equals the reference labels, except where the reference is tied within `tol`.

    Args:
        values: (L, H, W) reference interpolated assignments.
        table: (ny, nx, L) region labels per window.
    """
    best = values.argmax(axis=0)
    tables = table[row_tiles[:, None], col_tiles[None, :]]  # (H, W, L)
    reference = np.take_along_axis(tables, best[..., None], axis=-1)[..., 0]
    assert fused.shape == reference.shape and fused.dtype == np.uint16
    for y, x in zip(*np.nonzero(fused != reference)):
        candidates = values[:, y, x][tables[y, x] == fused[y, x]]
        assert candidates.size, f"pixel {(y, x)}: label {fused[y, x]} is no region's label"
        gap = values[:, y, x].max() - candidates.max()
        assert gap <= tol, f"pixel {(y, x)}: fused {fused[y, x]} vs {reference[y, x]}, gap {gap}"

"""Per-label scores of a segmentation (docs/architecture.md "Label assignment").

A pixel's probability is P[window, region, label] of the region it is assigned to (step 3 of the
label assignment) for the label that region got; a label's score is the mean of that over the
label's pixels. The pixel -> region map comes from the same fused assignment as the label map
(a table of region indices instead of labels), and is reduced in row chunks, so no [T,H,W] or
[L,H,W] tensor exists. Legend: n windows, L regions, T labels, H x W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segclip.runtime.assign import assign_windows, window_taps
from segclip.runtime.windows import window_grid

ROWS_PER_CHUNK = 256  # rows of the label map reduced at once (bounds the temporaries)


def region_label_probability(scores: np.ndarray, table: np.ndarray) -> np.ndarray:
    """P of each region for the label it got (0 for background regions).

    Args:
        scores: (n, L, T) region scores (`assign.region_scores`).
        table: (n, L) uint16 region labels (`assign.region_labels`), 0 = background.

    Returns:
        (n, L) float64.
    """
    index = np.maximum(table.astype(np.int64) - 1, 0)[..., None]  # (n, L, 1)
    chosen = np.take_along_axis(scores, index, axis=-1)[..., 0]  # (n, L)
    return np.where(table > 0, chosen, 0.0).astype(np.float64)


def label_scores(assign: np.ndarray, probability: np.ndarray, label_map: np.ndarray,
                 num_labels: int, resized_hw: Sequence[int], window: int,
                 confidence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean probability of each label over its pixels, and optionally a per-pixel map.

    Args:
        assign: (n, L, h, w) soft assignment per window (as for `assign.assign_windows`).
        probability: (n, L) `region_label_probability`.
        label_map: (H, W) uint16 label map made from the same windows.
        num_labels: T.
        confidence: (n, L) a value per region (e.g. its max probability over the labels) to
            spread over its pixels as an (H, W) float32 map.

    Returns:
        (T,) float64 scores (0 for a label with no pixels), and the map or None.
    """
    num, regions = probability.shape
    height, width = label_map.shape
    region_table = np.broadcast_to(np.arange(regions, dtype=np.uint16), (num, regions))
    region_map = assign_windows(assign, region_table, resized_hw, window,
                                (height, width))  # (H, W) region index of each pixel
    _, grid_x = window_grid(int(resized_hw[0]), int(resized_hw[1]), window)
    row_tiles, _ = window_taps(height, int(resized_hw[0]), window, assign.shape[2])  # (H,)
    col_tiles, _ = window_taps(width, int(resized_hw[1]), window, assign.shape[3])  # (W,)
    flat = probability.reshape(-1)  # (n * L,)
    spread = None if confidence is None else np.asarray(confidence, np.float32).reshape(-1)
    sums = np.zeros(num_labels + 1, np.float64)
    pixel_map = None if spread is None else np.empty((height, width), np.float32)
    for top in range(0, height, ROWS_PER_CHUNK):
        rows = slice(top, top + ROWS_PER_CHUNK)
        windows = row_tiles[rows, None] * grid_x + col_tiles[None, :]  # (r, W) window index
        cells = windows * regions + region_map[rows]  # (r, W) index into (n * L)
        sums += np.bincount(label_map[rows].ravel(), weights=flat[cells].ravel(),
                            minlength=num_labels + 1)
        if pixel_map is not None:
            pixel_map[rows] = spread[cells]
    counts = np.bincount(label_map.ravel(), minlength=num_labels + 1)  # (T + 1,)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return means[1:], pixel_map

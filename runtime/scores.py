"""The label map and per-label scores of a segmentation, from one assignment pass
(docs/architecture.md "Label assignment").

A pixel's probability is P[window, region, label] of the region it is assigned to (step 3 of the
label assignment) for the label that region got; a label's score is the mean of that over the
label's pixels. Step 3 runs once, for the (window, region) cell of every pixel
(`assign.window_cells`); the label map is a look-up of the cells' labels, and the scores only
need how many pixels each cell has: sum over a label's pixels of P = sum over its cells of
pixels x P. No [T, H, W] or [L, H, W] tensor exists. Legend: n windows, L regions, T labels,
H x W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segclip.runtime.assign import window_cells


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


def labels_and_scores(assign: np.ndarray, table: np.ndarray, probability: np.ndarray,
                      num_labels: int, resized_hw: Sequence[int], window: int,
                      out_hw: Sequence[int], confidence: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The label map, its pixel count per value, the mean probability of each label over its
    pixels, and optionally a per-pixel map.

    Args:
        assign: (n, L, h, w) soft assignment per window (as for `assign.assign_windows`).
        table: (n, L) uint16 region labels (`assign.region_labels`).
        probability: (n, L) `region_label_probability`.
        num_labels: T.
        out_hw: (H, W) output size.
        confidence: (n, L) a value per region (e.g. its max probability over the labels) to
            spread over its pixels as an (H, W) float32 map.

    Returns:
        (H, W) uint16 label map (= `assign.assign_windows(assign, table, ...)`), (T + 1,) int64
        pixels per value (background first), (T,) float64 scores (0 for a label with no
        pixels), and the map or None.
    """
    cells = window_cells(assign, resized_hw, window, out_hw)  # (H, W) i * L + l
    flat = np.asarray(table, dtype=np.uint16).reshape(-1)  # (n * L,) label of each cell
    label_map = np.take(flat, cells)  # (H, W) uint16
    pixels = np.bincount(cells.reshape(-1), minlength=flat.size).astype(np.float64)  # (n * L,)
    counts = np.bincount(flat, weights=pixels, minlength=num_labels + 1)  # (T + 1,)
    sums = np.bincount(flat, weights=pixels * np.asarray(probability).reshape(-1),
                       minlength=num_labels + 1)  # (T + 1,)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    pixel_map = None
    if confidence is not None:
        pixel_map = np.take(np.asarray(confidence, np.float32).reshape(-1), cells)  # (H, W)
    return label_map, counts.astype(np.int64), means[1:], pixel_map

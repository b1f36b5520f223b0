"""segclip.runtime.scores: the label map, per-label mean probability and the confidence map from
one cell pass, against a naive per-pixel reference (interpolate every region's assignment,
argmax, look up P) and against `assign_windows`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _runtime_reference import naive_window_values

from segclip.runtime import Segmenter
from segclip.runtime.assign import assign_windows, region_labels, region_scores, window_cells
from segclip.runtime.scores import labels_and_scores, region_label_probability
from segclip.runtime.windows import window_grid


def _unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def _naive(assign, scores, table, resized_hw, window, out_hw):
    """Per pixel: the argmax region of its window, that region's label and P for it."""
    values, row_tiles, col_tiles = naive_window_values(assign, resized_hw, window, out_hw)
    _, grid_x = window_grid(*resized_hw, window)
    height, width = out_hw
    labels = np.zeros(out_hw, np.int64)
    prob = np.zeros(out_hw)
    best = np.zeros(out_hw)
    for y in range(height):
        for x in range(width):
            win = row_tiles[y] * grid_x + col_tiles[x]
            region = int(np.argmax(values[:, y, x]))
            labels[y, x] = table[win, region]
            best[y, x] = scores[win, region].max()
            prob[y, x] = scores[win, region, labels[y, x] - 1] if labels[y, x] else 0.0
    num_labels = scores.shape[-1]
    means = np.array([prob[labels == t].mean() if (labels == t).any() else 0.0
                      for t in range(1, num_labels + 1)])
    return labels, means, best


@pytest.mark.parametrize("out_hw,resized_hw", [((37, 53), (32, 46)), ((20, 20), (16, 16)),
                                               ((70, 24), (56, 16))])
def test_scores_match_the_naive_reference(out_hw, resized_hw):
    rng = np.random.default_rng(sum(out_hw))
    window, regions, grid, dim, num_labels = 16, 4, 4, 8, 5
    num = int(np.prod(window_grid(*resized_hw, window)))
    logits = rng.normal(size=(num, regions, grid, grid)) * 3
    assign = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assign = assign.astype(np.float32)
    scores = region_scores(_unit(rng.normal(size=(num, regions, dim))),
                           _unit(rng.normal(size=(num, dim))),
                           _unit(rng.normal(size=(num_labels, dim))), 30.0, 3)  # (n, L, T)
    table = region_labels(scores, 0.3)
    label_map, pixels, means, confidence = labels_and_scores(
        assign, table, region_label_probability(scores, table), num_labels, resized_hw, window,
        out_hw, scores.max(axis=-1))
    labels, expected, best = _naive(assign, scores, table, resized_hw, window, out_hw)
    np.testing.assert_array_equal(pixels, np.bincount(labels.ravel(), minlength=num_labels + 1))
    np.testing.assert_array_equal(label_map, labels)  # random floats: no exact ties
    assert label_map.dtype == np.uint16
    np.testing.assert_array_equal(label_map,
                                  assign_windows(assign, table, resized_hw, window, out_hw))
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(confidence, best, rtol=1e-5, atol=1e-7)
    assert means.shape == (num_labels,) and confidence.shape == out_hw
    assert ((means >= 0) & (means <= 1)).all()


def test_absent_label_scores_zero():
    scores = np.array([[[0.9, 0.1, 0.0]]], np.float32)  # (1, 1, 3)
    table = region_labels(scores, 0.5)
    assign = np.ones((1, 1, 2, 2), np.float32)
    label_map, pixels, means, confidence = labels_and_scores(
        assign, table, region_label_probability(scores, table), 3, (16, 16), 16, (4, 4))
    np.testing.assert_array_equal(pixels, [0, 16, 0, 0])
    assert confidence is None
    np.testing.assert_array_equal(label_map, np.ones((4, 4), np.uint16))
    np.testing.assert_allclose(means, [0.9, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("regions", [5, 40_000])  # n * L = 10 (uint16 cells), 80,000 (uint32)
def test_window_cells_look_up_to_assign_windows(regions):
    """Cell i * L + l of every pixel, looked up in any region-label table, is `assign_windows`
    with that table: the literal per-pixel argmax of the interpolated region maps."""
    rng = np.random.default_rng(regions)
    resized_hw, window, out_hw, grid = (16, 30), 16, (21, 37), 3
    num = int(np.prod(window_grid(*resized_hw, window)))
    assign = rng.random((num, regions, grid, grid), dtype=np.float32)  # (n, L, h, w)
    cells = window_cells(assign, resized_hw, window, out_hw)
    assert cells.dtype == (np.uint16 if num * regions <= 1 << 16 else np.uint32)
    values, row_tiles, col_tiles = naive_window_values(assign, resized_hw, window, out_hw)
    _, grid_x = window_grid(*resized_hw, window)
    windows = row_tiles[:, None] * grid_x + col_tiles[None, :]  # (H, W)
    np.testing.assert_array_equal(cells // regions, windows)
    if regions < 100:  # random floats: no ties closer than float32 rounding among few regions
        np.testing.assert_array_equal(cells % regions, values.argmax(axis=0))
    table = rng.integers(0, 7, (num, regions), dtype=np.uint16)  # (n, L) labels 0..6
    np.testing.assert_array_equal(table.reshape(-1)[cells],
                                  assign_windows(assign, table, resized_hw, window, out_hw))


def test_segmenter_reports_scores_and_confidence(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (48, 70, 3), dtype=np.uint8)
    labels = ["red circle", "blue square", "green triangle"]
    with Segmenter(tiny_bundle, device="cpu", confidence=True) as seg:
        result = seg.segment(image, labels, threshold=0.0)
    assert list(result.scores) == labels
    for name in labels:
        present = result.counts[name] > 0
        assert (result.scores[name] > 0) == present
        assert 0.0 <= result.scores[name] <= 1.0
    assert result.confidence is not None and result.confidence.shape == (48, 70)
    labelled = result.label_map > 0
    # a pixel's label probability never exceeds its region's best probability
    for value, name in enumerate(labels, start=1):
        mask = result.label_map == value
        if mask.any():
            assert result.scores[name] <= result.confidence[mask].mean() + 1e-6
    assert labelled.any()
    assert result.to_json()["scores"].keys() == set(labels)

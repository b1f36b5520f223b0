"""segclip.runtime.assign: fused label assignment vs literal references (tie-tolerant 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
from _runtime_reference import (
    assert_labels_match,
    naive_window_values,
    torch_stitched_values,
    torch_upsample,
)

from segclip.runtime.assign import (
    assign_pixels,
    assign_windows,
    region_labels,
    region_scores,
    window_taps,
)
from segclip.runtime.windows import window_grid


def _unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def _soft_assign(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random softmax-over-regions maps (..., L, h, w) float32, like the engine's `assign`."""
    logits = rng.normal(size=shape).astype(np.float32) * 3
    exp = np.exp(logits - logits.max(axis=-3, keepdims=True))
    return (exp / exp.sum(axis=-3, keepdims=True)).astype(np.float32)


def official_scores(regions, global_, text, scale, top_k):
    """Literal torch transcription of the official region scores (docs/official-implementation.md
    §4 steps 3-5)."""
    torch = pytest.importorskip("torch")
    regions, global_, text = (torch.from_numpy(a) for a in (regions, global_, text))
    logits = scale * regions @ text.T  # (L, T)
    prior = logits.softmax(dim=-1)
    average = (scale * global_ @ text.T).softmax(dim=-1)  # (T,)
    top = average.topk(min(top_k, text.shape[0]), dim=-1)
    mask = torch.zeros_like(average).scatter_add_(-1, top.indices, torch.ones_like(top.values))
    logits = logits.masked_fill(~mask.bool()[None, :], float("-inf"))
    return (logits.softmax(dim=-1) * prior).numpy()


@pytest.mark.parametrize("num_labels", [1, 3, 5, 6, 100])
@pytest.mark.parametrize("top_k", [1, 5])
def test_region_scores_match_official(num_labels, top_k):
    rng = np.random.default_rng(num_labels * 10 + top_k)
    regions, global_ = _unit(rng.normal(size=(8, 16))), _unit(rng.normal(size=16))
    text = _unit(rng.normal(size=(num_labels, 16)))
    ours = region_scores(regions, global_, text, 100.0, top_k)
    expected = official_scores(regions, global_, text, 100.0, top_k)
    assert ours.shape == (8, num_labels) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    kept = (ours > 0).any(axis=0).sum()
    assert kept <= min(top_k, num_labels)


def test_region_scores_batched_over_windows():
    rng = np.random.default_rng(1)
    regions, global_ = _unit(rng.normal(size=(3, 4, 8))), _unit(rng.normal(size=(3, 8)))
    text = _unit(rng.normal(size=(7, 8)))
    batched = region_scores(regions, global_, text, 50.0)
    for i in range(3):
        np.testing.assert_allclose(batched[i], region_scores(regions[i], global_[i], text, 50.0),
                                   rtol=1e-6)


def test_region_scores_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        region_scores(np.ones((1, 2)), np.ones(2), np.ones((1, 2)), 1.0, top_k=0)
    with pytest.raises(ValueError, match=r"text must be \(T, D\) with T >= 1 and D = 2"):
        region_scores(np.ones((1, 2)), np.ones(2), np.ones((0, 2)), 1.0)


def test_region_labels_threshold_uses_min_with_max_score():
    scores = np.array([[0.9, 0.05], [0.2, 0.3], [0.6, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(region_labels(scores, 0.5), [1, 0, 1])
    np.testing.assert_array_equal(region_labels(scores, 0.0), [1, 2, 1])
    # threshold above every score: cutoff = max P, so only the best region stays foreground
    np.testing.assert_array_equal(region_labels(scores, 1.5), [1, 0, 0])
    assert region_labels(scores, 0.5).dtype == np.uint16


def test_region_labels_single_label():
    np.testing.assert_array_equal(region_labels(np.array([[0.2], [0.7]]), 0.8), [0, 1])


def test_region_labels_batched_uses_each_windows_max():
    scores = np.array([[[0.9, 0.05], [0.2, 0.3]], [[0.1, 0.3], [0.2, 0.25]]], dtype=np.float32)
    labels = region_labels(scores, 0.8)
    np.testing.assert_array_equal(labels, [[1, 0], [2, 0]])
    for window in range(2):
        np.testing.assert_array_equal(labels[window], region_labels(scores[window], 0.8))


def test_region_labels_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"scores must be \(\.\.\., L, T\)"):
        region_labels(np.zeros(3), 0.5)


SIZES = [(1, 1), (1, 7), (5, 1), (3, 3), (7, 13), (14, 14), (16, 9), (29, 41), (64, 47),
         (100, 37), (224, 224), (301, 119)]


@pytest.mark.parametrize("seed", range(8))
def test_assign_pixels_matches_torch_interpolate(seed):
    torch = pytest.importorskip("torch")
    del torch
    rng = np.random.default_rng(seed)
    for _ in range(12):
        regions = int(rng.integers(1, 17))
        grid = tuple(int(v) for v in rng.integers(1, 17, size=2))
        out_hw = SIZES[int(rng.integers(len(SIZES)))]
        assign = _soft_assign(rng, regions, *grid)
        labels = rng.integers(0, [1, 5, 100][seed % 3] + 1, size=regions).astype(np.uint16)
        fused = assign_pixels(assign, labels, out_hw, chunk_elements=int(rng.integers(1, 5000)))
        values = torch_upsample(assign, out_hw)
        zeros_h, zeros_w = np.zeros(out_hw[0], np.int64), np.zeros(out_hw[1], np.int64)
        assert_labels_match(fused, values, zeros_h, zeros_w, labels[None, None, :])


@pytest.mark.parametrize("case", [(1, 14, 14, 1, 1), (1, 3, 5, 20, 11), (4, 2, 2, 9, 9),
                                  (8, 14, 14, 5, 3), (3, 14, 14, 61, 90)])
def test_assign_pixels_edge_cases_match_naive(case):
    regions, h, w, height, width = case
    rng = np.random.default_rng(sum(case))
    assign = _soft_assign(rng, regions, h, w)
    labels = np.arange(1, regions + 1, dtype=np.uint16)
    fused = assign_pixels(assign, labels, (height, width))
    values, rows, cols = naive_window_values(assign[None], (h, w), h, (height, width)) \
        if h == w else (torch_upsample(assign, (height, width)), np.zeros(height, np.int64),
                        np.zeros(width, np.int64))
    assert_labels_match(fused, values, rows, cols, labels[None, None, :])


def test_assign_pixels_constant_region_wins_everywhere():
    assign = np.zeros((3, 4, 4), dtype=np.float32)
    assign[2] = 1.0
    out = assign_pixels(assign, np.array([7, 8, 9]), (5, 6))
    assert out.dtype == np.uint16 and (out == 9).all()


def test_assign_pixels_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"assign must be \(L, h, w\)"):
        assign_pixels(np.zeros((2, 3)), np.zeros(2), (4, 4))
    with pytest.raises(ValueError, match="output size must be at least 1x1, got 0x4"):
        assign_pixels(np.zeros((2, 3, 3)), np.zeros(2), (0, 4))


def _random_windows(rng, resized_hw, window, regions, grid, num_labels):
    grid_y, grid_x = window_grid(*resized_hw, window)
    count = grid_y * grid_x
    assign = _soft_assign(rng, count, regions, grid, grid)
    labels = rng.integers(0, num_labels + 1, size=(count, regions)).astype(np.uint16)
    return assign, labels, labels.reshape(grid_y, grid_x, regions)


@pytest.mark.parametrize("seed", range(6))
def test_assign_windows_matches_naive_per_pixel(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(4):
        window = int(rng.integers(4, 12))
        short, long = window, int(rng.integers(window, 3 * window + 3))
        resized_hw = (short, long) if rng.random() < 0.5 else (long, short)
        out_hw = tuple(int(v) for v in rng.integers(1, 40, size=2))
        regions, grid = int(rng.integers(1, 17)), int(rng.integers(1, 8))
        assign, labels, table = _random_windows(rng, resized_hw, window, regions, grid,
                                                [1, 5, 100][seed % 3])
        fused = assign_windows(assign, labels, resized_hw, window, out_hw,
                               chunk_elements=int(rng.integers(1, 3000)))
        values, rows, cols = naive_window_values(assign, resized_hw, window, out_hw)
        assert_labels_match(fused, values, rows, cols, table)


@pytest.mark.parametrize("resized_hw", [(14, 14), (14, 15), (14, 27), (14, 28), (29, 14),
                                        (43, 14)])
def test_assign_windows_matches_torch_when_not_resized(resized_hw):
    pytest.importorskip("torch")
    rng = np.random.default_rng(sum(resized_hw))
    assign, labels, table = _random_windows(rng, resized_hw, 14, 8, 7, 5)
    fused = assign_windows(assign, labels, resized_hw, 14, resized_hw)
    values, rows, cols = torch_stitched_values(assign, resized_hw, 14)
    assert_labels_match(fused, values, rows, cols, table)


def test_assign_windows_single_window_equals_assign_pixels():
    rng = np.random.default_rng(7)
    assign = _soft_assign(rng, 1, 8, 14, 14)
    labels = rng.integers(0, 6, size=(1, 8)).astype(np.uint16)
    windows = assign_windows(assign, labels, (224, 224), 224, (480, 640))
    single = assign_pixels(assign[0], labels[0], (480, 640))
    assert (windows != single).mean() < 1e-4  # equal up to float rounding of the coordinates


def test_assign_windows_overlap_belongs_to_earlier_window():
    # resized width 15, window 10: windows start at 0 and 5; columns 5..9 overlap
    assign = np.zeros((2, 2, 2, 2), dtype=np.float32)
    assign[0, 0], assign[1, 1] = 1.0, 1.0  # window 0 -> region 0, window 1 -> region 1
    labels = np.array([[1, 2], [3, 4]], dtype=np.uint16)
    out = assign_windows(assign, labels, (10, 15), 10, (10, 15))
    assert (out[:, :10] == 1).all() and (out[:, 10:] == 4).all()


def test_window_taps_stay_inside_owning_window():
    tiles, taps = window_taps(out_size=97, resized=50, window=14, grid=7)
    assert tiles.min() == 0 and tiles.max() == 3
    assert ((taps.lo // 7) == tiles).all() and ((taps.hi // 7) == tiles).all()
    assert (taps.frac >= 0).all() and (taps.frac <= 1).all()


def test_assign_windows_rejects_wrong_window_count():
    with pytest.raises(ValueError, match=r"n = 1x2 windows for a 14x20 image and window 14"):
        assign_windows(np.zeros((1, 2, 3, 3)), np.zeros((1, 2)), (14, 20), 14, (14, 20))


def test_assign_windows_memory_is_chunked():
    """Peak memory is the output plus O(L * rows_per_chunk * W), never an (L, H, W) array."""
    import tracemalloc

    rng = np.random.default_rng(3)
    assign, labels, _ = _random_windows(rng, (14, 28), 14, 8, 7, 3)
    full = 8 * 600 * 1200 * 4  # bytes of a float32 (L, H, W) array: 23 MB
    tracemalloc.start()
    try:
        out = assign_windows(assign, labels, (14, 28), 14, (600, 1200), chunk_elements=1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (600, 1200)
    assert peak < out.nbytes + full // 10

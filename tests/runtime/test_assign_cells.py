"""segclip.runtime.assign by grid cells (`_cell_labels`): bit-equal to the direct per-pixel path
(`_direct_labels`, ties included), tie-tolerant equal to the literal reference, bounded memory.

Inputs are adversarial for the cell shortcuts: exact ties (quantised, float16), near-ties of one
or two float32 ulps (which break the shortcut without its rounding margin), every cell uniform,
every cell mixed, L = 1, many regions, single-pixel outputs, overlapping windows, downscaling.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from _runtime_reference import assert_labels_match, naive_window_values

from segclip.runtime import assign as assign_module
from segclip.runtime._interp import linear_taps
from segclip.runtime.assign import assign_pixels, assign_windows
from segclip.runtime.windows import window_grid

PATTERNS = ["smooth", "random", "flat", "quantised", "float16", "ulp", "dominant", "checker"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-3, keepdims=True))
    return (exp / exp.sum(axis=-3, keepdims=True)).astype(np.float32)


def make_assign(rng: np.random.Generator, pattern: str, *shape: int) -> np.ndarray:
    """(..., L, h, w) float32 soft assignment of the named kind."""
    regions, grid_h, grid_w = shape[-3:]
    if pattern == "smooth":  # blobs: large uniform areas, mixed cells along borders
        yy, xx = np.mgrid[0:grid_h, 0:grid_w]
        centres = rng.uniform(0, max(grid_h, grid_w), shape[:-2] + (2,))  # (..., L, 2)
        dist = (yy - centres[..., :1, None]) ** 2 + (xx - centres[..., 1:, None]) ** 2
        return _softmax(-dist / max(grid_h, grid_w) + 0.3 * rng.normal(size=shape))
    if pattern == "random":  # i.i.d. logits: a border at almost every node
        return _softmax(3 * rng.normal(size=shape))
    if pattern == "flat":  # every region within ~1 % of the others: all candidates everywhere
        return _softmax(0.01 * rng.normal(size=shape))
    if pattern == "quantised":  # exact ties between regions at many nodes and pixels
        return (np.round(_softmax(2 * rng.normal(size=shape)) * 4) / 4).astype(np.float32)
    if pattern == "float16":  # an fp16 engine's output
        return _softmax(3 * rng.normal(size=shape)).astype(np.float16).astype(np.float32)
    if pattern == "ulp":  # the same map for every region, each node moved by <= 2 ulps
        base = _softmax(3 * rng.normal(size=shape[:-3] + (2, grid_h, grid_w)))[..., :1, :, :]
        base = np.repeat(base, regions, axis=-3)  # (..., L, h, w)
        steps = rng.integers(-2, 3, size=base.shape) * np.spacing(base)
        return (base + steps).astype(np.float32)
    if pattern == "dominant":  # one region far ahead at every node: every cell uniform
        logits = rng.normal(size=shape)
        logits[..., int(rng.integers(regions)), :, :] += 20
        return _softmax(logits)
    if pattern == "checker":  # the winner changes at every node: every cell mixed
        yy, xx = np.mgrid[0:grid_h, 0:grid_w]
        logits = rng.normal(size=shape)
        logits += 20 * (np.arange(regions)[:, None, None] == (yy + xx) % regions)
        return _softmax(logits)
    raise ValueError(pattern)


def both_paths(monkeypatch: pytest.MonkeyPatch,
               call: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`call()` through the cell path (checked to have run) and through the direct path."""
    calls = []
    real = assign_module._cell_labels

    def spy(*args: object) -> np.ndarray:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(assign_module, "_cell_labels", spy)
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 0)
    cells = call()
    assert len(calls) == 1, "the cell path did not run"
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 1 << 62)
    direct = call()
    assert len(calls) == 1, "the direct path ran the cell path"
    return cells, direct


OUT_SIZES = [(1, 1), (1, 37), (23, 1), (3, 5), (13, 13), (61, 47), (100, 31), (224, 224)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("regions", [1, 2, 8, 64])
def test_assign_pixels_cells_equal_direct(monkeypatch, pattern, regions):
    rng = np.random.default_rng(PATTERNS.index(pattern) * 100 + regions)
    for out_hw in OUT_SIZES:
        grid = tuple(int(v) for v in rng.integers(1, 15, size=2))
        assign = make_assign(rng, pattern, regions, *grid)
        identity = np.arange(1, regions + 1, dtype=np.uint16)  # every region distinguishable
        repeats = rng.integers(0, 4, size=regions).astype(np.uint16)  # labels shared, 0 too
        chunk = int(rng.choice([1, 97, 1 << 21]))
        for labels in (identity, repeats):
            cells, direct = both_paths(monkeypatch, lambda labels=labels: assign_pixels(
                assign, labels, out_hw, chunk_elements=chunk))
            assert cells.dtype == np.uint16 and cells.shape == out_hw
            np.testing.assert_array_equal(cells, direct, err_msg=f"{grid} -> {out_hw}")


def _windows(rng: np.random.Generator, pattern: str, window: int, regions: int, grid: int
             ) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """A slid image whose last window overlaps its neighbour (long side not a multiple of S)."""
    long = int(rng.integers(window + 1, 3 * window)) | 1
    if long % window == 0:
        long += 1
    resized_hw = (window, long) if rng.random() < 0.5 else (long, window)
    count = int(np.prod(window_grid(*resized_hw, window)))
    assign = make_assign(rng, pattern, count, regions, grid, grid)
    labels = rng.integers(0, 6, size=(count, regions)).astype(np.uint16)
    return resized_hw, assign, labels


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("regions", [1, 3, 8])
def test_assign_windows_cells_equal_direct(monkeypatch, pattern, regions):
    rng = np.random.default_rng(7 + PATTERNS.index(pattern) * 10 + regions)
    for out_hw in [(1, 1), (2, 90), (37, 29), (150, 210), (300, 97)]:
        window, grid = int(rng.integers(6, 40)), int(rng.integers(1, 10))
        resized_hw, assign, labels = _windows(rng, pattern, window, regions, grid)
        chunk = int(rng.choice([1, 333, 1 << 21]))
        cells, direct = both_paths(monkeypatch, lambda: assign_windows(
            assign, labels, resized_hw, window, out_hw, chunk_elements=chunk))
        np.testing.assert_array_equal(cells, direct, err_msg=f"{resized_hw}, S={window}")


@pytest.mark.parametrize("pattern", ["smooth", "random", "quantised", "float16", "checker"])
def test_cells_match_naive_reference(monkeypatch, pattern):
    """The literal float64 reference, with the existing tie rule (`assert_labels_match`)."""
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 0)
    rng = np.random.default_rng(PATTERNS.index(pattern))
    for _ in range(3):
        window, regions, grid = int(rng.integers(5, 12)), int(rng.integers(1, 10)), 5
        resized_hw, assign, labels = _windows(rng, pattern, window, regions, grid)
        out_hw = tuple(int(v) for v in rng.integers(1, 45, size=2))
        fused = assign_windows(assign, labels, resized_hw, window, out_hw)
        values, rows, cols = naive_window_values(assign, resized_hw, window, out_hw)
        grid_y, grid_x = window_grid(*resized_hw, window)
        assert_labels_match(fused, values, rows, cols, labels.reshape(grid_y, grid_x, regions))


def _classified(assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uniform, candidate) of one window's cells, as `_cell_labels` classifies them."""
    down = np.minimum(np.arange(assign.shape[1]) + 1, assign.shape[1] - 1)
    right = np.minimum(np.arange(assign.shape[2]) + 1, assign.shape[2] - 1)
    _, uniform, candidate = assign_module._classify_cells(assign, down, right,
                                                          assign_module._margin(assign))
    return uniform, candidate


def test_cell_classification_extremes():
    rng = np.random.default_rng(11)
    uniform, candidate = _classified(make_assign(rng, "dominant", 8, 14, 14))
    assert uniform.all() and (candidate.sum(axis=0) == 1).all()
    uniform, _ = _classified(make_assign(rng, "checker", 3, 14, 14))
    assert uniform.sum() == 1 and uniform[-1, -1]  # only the corner cell, which is one node
    uniform, _ = _classified(make_assign(rng, "ulp", 8, 14, 14))
    assert not uniform.any()  # no winner is clear of the margin
    uniform, candidate = _classified(make_assign(rng, "random", 1, 5, 5))
    assert uniform.all() and candidate.all()  # L = 1


def test_rounding_margin_is_needed(monkeypatch):
    """Without the margin, near-tied (ulp) inputs change labels: the inputs above can fail."""
    rng = np.random.default_rng(5)
    cases = [make_assign(rng, "ulp", 3, 6, 6) for _ in range(20)]
    labels = np.arange(1, 4, dtype=np.uint16)
    results = [both_paths(monkeypatch, lambda a=a: assign_pixels(a, labels, (61, 47)))
               for a in cases]  # (cells, direct) per case
    assert all(np.array_equal(cells, direct) for cells, direct in results)
    monkeypatch.setattr(assign_module, "ROUNDING_MARGIN", 0.0)
    monkeypatch.setattr(assign_module, "UNDERFLOW_MARGIN", 0.0)
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 0)
    unguarded = [assign_pixels(a, labels, (61, 47)) for a in cases]
    assert any(not np.array_equal(u, direct) for u, (_, direct) in zip(unguarded, results))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e35])
def test_non_finite_or_huge_input_takes_the_direct_path(monkeypatch, bad):
    rng = np.random.default_rng(2)
    assign = make_assign(rng, "random", 4, 6, 6)
    assign[2, 3, 3] = bad
    labels = np.arange(1, 5, dtype=np.uint16)
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 0)
    monkeypatch.setattr(assign_module, "_cell_labels", None)  # calling it would raise
    out = assign_pixels(assign, labels, (40, 40))
    taps, zeros = linear_taps(40, 6), np.zeros(40, np.int64)
    expected = assign_module._direct_labels(assign, taps, taps, zeros, zeros,
                                            labels[None, None, :], 1 << 21)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("pattern", ["smooth", "random", "flat", "checker"])
def test_cell_path_memory_is_bounded(monkeypatch, pattern):
    """Peak = the label map plus O(L * rows_per_chunk * W): never an (L, H, W) array."""
    monkeypatch.setattr(assign_module, "DIRECT_WORK_PER_GRID_ROW", 0)
    rng = np.random.default_rng(3)
    cases = [(make_assign(rng, pattern, 2, 8, 7, 7), (14, 28), 14, (600, 1200)),
             (make_assign(rng, pattern, 1, 8, 2, 2), (14, 14), 14, (3000, 400))]
    for assign, resized_hw, window, out_hw in cases:
        labels = rng.integers(0, 4, size=assign.shape[:2]).astype(np.uint16)
        full = 8 * out_hw[0] * out_hw[1] * 4  # bytes of a float32 (L, H, W) array
        tracemalloc.start()
        try:
            out = assign_windows(assign, labels, resized_hw, window, out_hw,
                                 chunk_elements=1 << 16)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert out.shape == out_hw
        assert peak < out.nbytes + full // 10, (out_hw, peak)

"""Fused label assignment (docs/architecture.md "Label assignment", paper §2.5,
docs/official-implementation.md §4 steps
3-7).

Per window, from the image engine's `global` [D], `regions` [L, D], `assign` [L, h, w] and the
label embeddings `text` [T, D]:

1. `region_scores`: G = scale * regions @ text.T; P_pre = softmax_T(G); keep the top-k labels by
   global @ text.T (k = min(top_k, T)), mask the others to -inf; P = softmax_T(masked G) * P_pre.
2. `region_labels`: label of region l = argmax_t P[l, t] + 1, or 0 (background) when
   max_t P[l, t] < min(threshold, max P) (the official code takes max P over the whole [L, T]).
3. `assign_pixels` / `assign_windows`: each output pixel takes the label of the region with the
   largest bilinearly interpolated (align_corners=False) soft assignment.

Step 3 is computed per grid cell, never materialising an [L, H, W] (or [T, H, W]) array. Every
output pixel lies in one cell of the patch grid (the 2 x 2 nodes its taps read), and its L values
are convex combinations of the cell's corner values with weights shared by all regions. So:

- a cell whose corner winner is the same region k at all four corners, beating every other
  region there by more than `_margin` (M = max |assign|), is uniform: region k wins at every
  pixel of it, and the whole cell is labelled by a look-up;
- in the other (mixed) cells, a region whose largest corner value is more than the margin below
  another region's smallest corner value can never win: only the remaining candidates are
  interpolated, with the same float32 arithmetic (`_lerp`, columns then rows) as the direct
  per-pixel path `_direct_labels`.

The margin makes this exact, ties included. Each float32 interpolated value is within 10 u M of
the exact bilinear value with the same float32 weights (u = 2^-24; a 1-D lerp rounds three times,
adding at most 5 u M, and the second lerp adds 5 u M to the first's error), so a region more than
20 u M behind another in exact arithmetic is strictly behind it after rounding too; the margin is
32 u M. Hence the label map equals `_direct_labels` (argmax over all L float32 values, first
region on ties) bit for bit, and `_direct_labels` itself runs where that is faster (small
outputs) or the bound does not hold (non-finite or huge inputs). Mixed cells are interpolated per
grid row in chunks of output rows: peak memory is the (H, W) label map, an (H, Ws) look-up and
O(L * rows_per_chunk * W) floats.

Windows (the fused definition). The image (H x W) was resized to (Hr x Wr), short side S, and
covered by S x S windows (`segclip.runtime.windows`). Along each axis, an output pixel i has its
centre at r = (i + 0.5) * Hr / H in resized coordinates and belongs to the tile floor(r / S)
(clamped to the last window): every window owns the S-wide tile it would cover unshifted, so where
the shifted last window overlaps its neighbour, the earlier window wins. Within the owning window
(start y0) the pixel samples the patch grid once, bilinearly, at p = (r - y0) * h / S - 0.5: its
centre mapped through both coordinate transforms (original -> resized, window -> patch grid),
with PyTorch's edge clamping at the window's border. For a single window this is mathematically
`F.interpolate(assign, (H, W), mode="bilinear", align_corners=False)`. The official
protocol instead averages window score maps where windows overlap and resamples scores (not
assignments) a second time; the two differ only in the overlap strip and along label borders.

Legend: L regions, T labels, D embedding width, h x w patch grid, H x W output pixels,
n windows, ny x nx window grid, r rows in a chunk, Hs x Ws the grid of all windows
(the mosaic), K candidate regions, Wm output columns in mixed cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segclip.runtime._interp import Taps, linear_taps, taps_from_coordinates
from segclip.runtime.contract import DEFAULT_TOP_K
from segclip.runtime.windows import window_grid, window_starts

CHUNK_ELEMENTS = 1 << 21  # L * rows * W floats per chunk (8 MiB float32 per temporary)
ROUNDING_MARGIN = 2.0 ** -19  # 32 u: > 2 x the 10 u M error bound of an interpolated value
UNDERFLOW_MARGIN = 2.0 ** -140  # covers subnormal results, whose error is absolute
MAX_MAGNITUDE = 2.0 ** 100  # larger |assign| (or NaN / inf) takes the direct path
# Below this many interpolated values (L * H * W) per grid row, `_direct_labels` is faster than
# `_cell_labels` (1 thread, bench/assign.py's window: they cross near 130² from 14², L = 8).
DIRECT_WORK_PER_GRID_ROW = 1 << 13
MAX_LABELS = np.iinfo(np.uint16).max  # label maps are uint16; 0 is background


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf entries get probability 0."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def region_scores(regions: np.ndarray, global_: np.ndarray, text: np.ndarray,
                  logit_scale: float, top_k: int = DEFAULT_TOP_K) -> np.ndarray:
    """Label probabilities of each region, masked to the image's top-k labels.

    Args:
        regions: (..., L, D) L2-normalised region embeddings (leading axes: windows).
        global_: (..., D) L2-normalised global image embedding.
        text: (T, D) L2-normalised label embeddings.
        logit_scale: the multiplier itself (exp of the learned parameter, <= 100).
        top_k: labels kept by the global mask; min(top_k, T) are kept.

    Returns:
        (..., L, T) float32 P = softmax(masked G) * softmax(G), G = scale * regions @ text.T.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    regions = np.asarray(regions, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32)
    if text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != regions.shape[-1]:
        raise ValueError(f"text must be (T, D) with T >= 1 and D = {regions.shape[-1]} (the "
                         f"regions' width), got shape {text.shape}")
    # einsum, not `@`: these products are tiny, and a multi-threaded BLAS call costs more in
    # thread wake-ups (ms on a busy machine) than the arithmetic (us).
    logits = logit_scale * np.einsum("...ld,td->...lt", regions, text)  # (..., L, T)
    prior = _softmax(logits)  # (..., L, T)
    global_logits = np.einsum("...d,td->...t", np.asarray(global_, dtype=np.float32),
                              text)  # (..., T)
    k = min(top_k, text.shape[0])
    order = np.argsort(-global_logits, axis=-1, kind="stable")[..., :k]  # (..., k)
    keep = np.zeros(global_logits.shape, dtype=bool)  # (..., T)
    np.put_along_axis(keep, order, True, axis=-1)
    masked = np.where(keep[..., None, :], logits, -np.inf)  # (..., L, T)
    return (_softmax(masked) * prior).astype(np.float32)


def region_labels(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Label of each region: argmax + 1, or 0 when its best score < min(threshold, max score).

    Args:
        scores: (..., L, T) region scores (`region_scores`); leading axes are windows, and each
            window's cutoff uses its own max score.

    Returns:
        (..., L) uint16 labels in 0..T.
    """
    scores = np.asarray(scores)
    if scores.ndim < 2 or scores.shape[-1] < 1 or scores.shape[-2] < 1:
        raise ValueError(f"scores must be (..., L, T) with L, T >= 1, got shape {scores.shape}")
    if scores.shape[-1] > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels fit a uint16 label map, got "
                         f"{scores.shape[-1]}")
    best = scores.max(axis=-1)  # (..., L)
    cutoff = np.minimum(threshold, best.max(axis=-1, keepdims=True))  # (..., 1)
    labels = scores.argmax(axis=-1) + 1  # (..., L)
    return np.where(best < cutoff, 0, labels).astype(np.uint16)


def _lerp(lower: np.ndarray, upper: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """lower + (upper - lower) * frac, in place in `upper` (a fresh gather) to spare temporaries."""
    np.subtract(upper, lower, out=upper)
    upper *= frac
    upper += lower
    return upper


def _direct_labels(source: np.ndarray, rows: Taps, cols: Taps, row_tiles: np.ndarray,
                  col_tiles: np.ndarray, table: np.ndarray, chunk_elements: int) -> np.ndarray:
    """Per output pixel: interpolate the L maps of `source`, argmax, look the region label up.

    The literal fused definition; `_cell_labels` equals it.

    Args:
        source: (L, Hs, Ws) float32 soft assignment (window maps stacked into one mosaic).
        rows, cols: taps into Hs / Ws for each output row (H) / column (W).
        row_tiles, col_tiles: (H,), (W,) window row / column owning each output row / column.
        table: (ny, nx, L) uint16 (or uint32) region labels per window; the map has its dtype.
    """
    num_regions = source.shape[0]
    height, width = rows.lo.shape[0], cols.lo.shape[0]
    out = np.empty((height, width), dtype=table.dtype)  # (H, W)
    step = max(1, chunk_elements // (num_regions * width))
    col_frac = cols.frac[None, None, :]  # (1, 1, W)
    for start in range(0, height, step):
        stop = min(start + step, height)
        lo, hi = rows.lo[start:stop], rows.hi[start:stop]  # (r,)
        needed, local = np.unique(np.concatenate([lo, hi]), return_inverse=True)
        rows_needed = source[:, needed]  # (L, k, Ws)
        band = _lerp(rows_needed[:, :, cols.lo], rows_needed[:, :, cols.hi], col_frac)  # (L, k, W)
        top, bottom = local[:stop - start], local[stop - start:]  # (r,), (r,)
        values = _lerp(band[:, top], band[:, bottom], rows.frac[start:stop, None])  # (L, r, W)
        best = values.argmax(axis=0)  # (r, W)
        tiles = row_tiles[start:stop, None]  # (r, 1)
        out[start:stop] = table[tiles, col_tiles[None, :], best]  # (r, W)
    return out


def _cell_partner(taps: Taps, tiles: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per grid node along one axis: the upper tap read with it as lower tap, and its window.

    Both are functions of the lower tap (taps clamp inside the owning window); nodes that are
    no output's lower tap keep themselves and window 0 (never read).
    """
    partner, owner = np.arange(size), np.zeros(size, np.int64)  # (size,), (size,)
    partner[taps.lo], owner[taps.lo] = taps.hi, tiles
    assert (partner[taps.lo] == taps.hi).all() and (owner[taps.lo] == tiles).all()
    return partner, owner


def _margin(source: np.ndarray) -> float | None:
    """Gap beyond which float32 rounding cannot reorder two regions (module docstring), or None
    when `source` is non-finite or too large for the error bound (then the direct path runs)."""
    magnitude = float(np.abs(source).max())
    if not magnitude < MAX_MAGNITUDE:  # also NaN
        return None
    return magnitude * ROUNDING_MARGIN + UNDERFLOW_MARGIN


def _classify_cells(source: np.ndarray, down: np.ndarray, right: np.ndarray,
                    margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corner winner, uniformity and candidate regions of every grid cell.

    Returns:
        (Hs, Ws) int64 winner at the upper-left node, (Hs, Ws) bool uniform (that region wins
        the whole cell), (L, Hs, Ws) bool candidates (regions that may win somewhere in it).
    """
    num_regions = source.shape[0]
    node = source.argmax(axis=0)  # (Hs, Ws)
    if num_regions > 1:
        top = np.partition(source, num_regions - 2, axis=0)[-2:]  # (2, Hs, Ws) 2nd, 1st
        sure = top[1].astype(np.float64) - top[0] > margin  # (Hs, Ws) winner clear of others
    else:
        sure = np.ones(node.shape, dtype=bool)  # (Hs, Ws)
    down_node, right_node = node[down], node[:, right]  # (Hs, Ws)
    uniform = (sure & sure[down] & sure[:, right] & sure[down][:, right] & (node == down_node)
               & (node == right_node) & (node == down_node[:, right]))  # (Hs, Ws)
    low, high = source.copy(), source.copy()  # (L, Hs, Ws) over the 4 corners
    for corner in (source[:, down], source[:, :, right], source[:, down][:, :, right]):
        np.minimum(low, corner, out=low)
        np.maximum(high, corner, out=high)
    floor = low.max(axis=0).astype(np.float64) - margin  # (Hs, Ws)
    return node, uniform, high >= floor


def _fused_labels(source: np.ndarray, rows: Taps, cols: Taps, row_tiles: np.ndarray,
                  col_tiles: np.ndarray, table: np.ndarray, chunk_elements: int) -> np.ndarray:
    """Step 3: `_cell_labels`, or `_direct_labels` (the same labels) for small outputs, where
    the cell path's per-grid-row overhead outweighs what it saves, and for non-finite input.

    Args:
        source: (L, Hs, Ws) float32 soft assignment (window maps stacked into one mosaic).
        rows, cols: taps into Hs / Ws for each output row (H) / column (W); lower taps are
            non-decreasing.
        row_tiles, col_tiles: (H,), (W,) window row / column owning each output row / column.
        table: (ny, nx, L) uint16 (or uint32) region labels per window.
    """
    margin = _margin(source)
    grid_rows = min(source.shape[1], rows.lo.size)
    work = source.shape[0] * rows.lo.size * cols.lo.size  # L * H * W interpolated values
    if margin is None or work < DIRECT_WORK_PER_GRID_ROW * grid_rows:
        return _direct_labels(source, rows, cols, row_tiles, col_tiles, table, chunk_elements)
    return _cell_labels(source, rows, cols, row_tiles, col_tiles, table, chunk_elements, margin)


def _cell_labels(source: np.ndarray, rows: Taps, cols: Taps, row_tiles: np.ndarray,
                 col_tiles: np.ndarray, table: np.ndarray, chunk_elements: int,
                 margin: float) -> np.ndarray:
    """`_direct_labels`, bit for bit, by grid cells (module docstring): uniform cells by look-up,
    mixed cells by interpolating their candidate regions only, per grid row in row chunks.

    Args: as `_fused_labels`, and `margin` from `_margin(source)`.
    """
    assert (np.diff(rows.lo) >= 0).all() and (np.diff(cols.lo) >= 0).all()
    down, row_owner = _cell_partner(rows, row_tiles, source.shape[1])  # (Hs,), (Hs,)
    right, col_owner = _cell_partner(cols, col_tiles, source.shape[2])  # (Ws,), (Ws,)
    node, uniform, candidate = _classify_cells(source, down, right, margin)
    cell_label = table[row_owner[:, None], col_owner[None, :], node]  # (Hs, Ws)
    out = np.take(np.take(cell_label, rows.lo, axis=0), cols.lo, axis=1)  # (H, W)
    mixed_cols = ~uniform[:, cols.lo]  # (Hs, W) output columns in mixed cells, per grid row
    starts = np.searchsorted(rows.lo, np.arange(source.shape[1]), "left")  # (Hs,)
    stops = np.searchsorted(rows.lo, np.arange(source.shape[1]), "right")  # (Hs,)
    for i in np.nonzero((stops > starts) & mixed_cols.any(axis=1))[0]:
        keep = np.nonzero(candidate[:, i][:, ~uniform[i]].any(axis=1))[0]  # (K,)
        picked = np.nonzero(mixed_cols[i])[0]  # (Wm,)
        pair = np.take(source[:, [i, down[i]]], keep, axis=0)  # (K, 2, Ws)
        band = _lerp(np.take(pair, cols.lo[picked], axis=2), np.take(pair, cols.hi[picked], axis=2),
                     cols.frac[picked])  # (K, 2, Wm), C-contiguous (take, not fancy indexing)
        top, rise = band[:, 0], band[:, 1] - band[:, 0]  # (K, Wm) each
        labels = np.ascontiguousarray(table[row_owner[i], col_tiles[picked]][:, keep].T)  # (K, Wm)
        where = slice(None) if picked.size == out.shape[1] else picked
        step = max(1, chunk_elements // (keep.size * picked.size))
        for start in range(starts[i], stops[i], step):
            stop = min(start + step, stops[i])
            out[start:stop, where] = _argmax_labels(top, rise, rows.frac[start:stop, None],
                                                    labels)
    return out


def _argmax_labels(top: np.ndarray, rise: np.ndarray, frac: np.ndarray,
                   labels: np.ndarray) -> np.ndarray:
    """Label of the first region with the largest `top + rise * frac` (`_lerp`'s arithmetic).

    A running maximum over the K regions: numpy's argmax over a short leading axis is slow.

    Args:
        top, rise: (K, Wm) float32 lerp base and slope per candidate and column.
        frac: (r, 1) float32 row weights; labels: (K, Wm) uint16 (or uint32).

    Returns:
        (r, Wm) labels of `labels`' dtype.
    """
    best = rise[0] * frac  # (r, Wm)
    best += top[0]
    out = np.empty(best.shape, dtype=labels.dtype)  # (r, Wm)
    out[:] = labels[0]
    value, better = np.empty_like(best), np.empty(best.shape, dtype=bool)  # (r, Wm) each
    for k in range(1, top.shape[0]):
        np.multiply(rise[k], frac, out=value)
        value += top[k]
        np.greater(value, best, out=better)  # strict: ties keep the earlier region
        np.maximum(best, value, out=best)
        np.copyto(out, labels[k], where=better)
    return out


def _check_output_size(out_hw: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in out_hw)
    if height < 1 or width < 1:
        raise ValueError(f"output size must be at least 1x1, got {height}x{width}")
    return height, width


def assign_pixels(assign: np.ndarray, region_label: np.ndarray, out_hw: Sequence[int],
                  chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Label map of one window resampled to `out_hw` (equals F.interpolate + argmax + look-up).

    Args:
        assign: (L, h, w) float soft assignment of the patches to the regions.
        region_label: (L,) label of each region (`region_labels`).
        out_hw: (H, W) output size; up- and downscaling both use 2-tap bilinear sampling.

    Returns:
        (H, W) uint16 labels, 0 = background, i = i-th label.
    """
    assign = np.asarray(assign, dtype=np.float32)
    if assign.ndim != 3 or np.asarray(region_label).shape != (assign.shape[0],):
        raise ValueError(f"assign must be (L, h, w) and region_label (L,), got {assign.shape} "
                         f"and {np.asarray(region_label).shape}")
    height, width = _check_output_size(out_hw)
    table = np.asarray(region_label, dtype=np.uint16)[None, None, :]  # (1, 1, L)
    rows, cols = linear_taps(height, assign.shape[1]), linear_taps(width, assign.shape[2])
    zeros_h, zeros_w = np.zeros(height, np.int64), np.zeros(width, np.int64)
    return _fused_labels(assign, rows, cols, zeros_h, zeros_w, table, chunk_elements)


def window_taps(out_size: int, resized: int, window: int, grid: int) -> tuple[np.ndarray, Taps]:
    """Owning window and patch-grid taps of each output pixel along one axis (module docstring).

    Returns:
        (N,) int64 window index along the axis, and taps into the windows' grids stacked along
        the axis (window t's samples at t * grid ... t * grid + grid - 1).
    """
    starts = np.asarray(window_starts(resized, window), dtype=np.float64)
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * (resized / out_size)  # (N,)
    tiles = np.minimum(centres // window, len(starts) - 1).astype(np.int64)  # (N,)
    coordinates = (centres - starts[tiles]) * (grid / window) - 0.5  # (N,)
    local = taps_from_coordinates(coordinates, grid)
    offset = tiles * grid
    return tiles, Taps(lo=local.lo + offset, hi=local.hi + offset, frac=local.frac)


def assign_windows(assign: np.ndarray, region_label: np.ndarray, resized_hw: Sequence[int],
                   window: int, out_hw: Sequence[int],
                   chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Label map of a slid image at its original resolution (module docstring: "Windows").

    Args:
        assign: (n, L, h, w) soft assignment per window, windows in `window_boxes` order.
        region_label: (n, L) labels of each window's regions.
        resized_hw: (Hr, Wr) size the image was resized to (short side = `window`).
        window: S, the window side in resized pixels.
        out_hw: (H, W) output size, normally the original image size.

    Returns:
        (H, W) uint16 labels, 0 = background, i = i-th label.
    """
    return _window_lookup(assign, np.asarray(region_label, dtype=np.uint16), resized_hw, window,
                          out_hw, chunk_elements)


def window_cells(assign: np.ndarray, resized_hw: Sequence[int], window: int,
                 out_hw: Sequence[int], chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Which (window, region) each output pixel belongs to: `assign_windows` with the table
    i * L + l in place of region labels, so `table.reshape(-1)[cells]` is `assign_windows(...,
    table, ...)` for any table of region labels.

    Returns:
        (H, W) cell index i * L + l, uint16 when n * L <= 65536, else uint32.
    """
    num, regions = np.shape(assign)[:2]
    dtype = np.uint16 if num * regions <= 1 << 16 else np.uint32
    cells = np.arange(num * regions, dtype=dtype).reshape(num, regions)  # (n, L)
    return _window_lookup(assign, cells, resized_hw, window, out_hw, chunk_elements)


def _window_lookup(assign: np.ndarray, region_label: np.ndarray, resized_hw: Sequence[int],
                   window: int, out_hw: Sequence[int], chunk_elements: int) -> np.ndarray:
    """`assign_windows` for a table of any unsigned integer dtype (the map has that dtype)."""
    assign = np.asarray(assign, dtype=np.float32)
    resized_h, resized_w = (int(v) for v in resized_hw)
    grid_y, grid_x = window_grid(resized_h, resized_w, window)
    if assign.ndim != 4 or assign.shape[0] != grid_y * grid_x:
        raise ValueError(f"assign must be (n, L, h, w) with n = {grid_y}x{grid_x} windows for a "
                         f"{resized_h}x{resized_w} image and window {window}, got {assign.shape}")
    if region_label.shape != assign.shape[:2]:
        raise ValueError(f"region_label must be {assign.shape[:2]}, got {region_label.shape}")
    num, regions, grid_h, grid_w = assign.shape
    height, width = _check_output_size(out_hw)
    mosaic = assign.reshape(grid_y, grid_x, regions, grid_h, grid_w)  # (ny, nx, L, h, w)
    mosaic = mosaic.transpose(2, 0, 3, 1, 4).reshape(regions, grid_y * grid_h, grid_x * grid_w)
    table = region_label.reshape(grid_y, grid_x, regions)  # (ny, nx, L)
    row_tiles, rows = window_taps(height, resized_h, window, grid_h)
    col_tiles, cols = window_taps(width, resized_w, window, grid_w)
    return _fused_labels(np.ascontiguousarray(mosaic), rows, cols, row_tiles, col_tiles, table,
                         chunk_elements)

"""segclip.runtime.assign_cuda without a GPU: the kernel's source compiles with NVRTC, and a
numpy transcription of the kernel body, fed exactly the packed arguments the host uploads
(`kernel_inputs`), reproduces the numpy fused assignment bit for bit. This pins the argument
layout and the kernel's index arithmetic; the launch itself is tested in test_assign_cuda.py
(GPU only). Needs cuda-python (installed with torch), else skipped."""

from __future__ import annotations

import numpy as np
import pytest

from segclip.runtime.assign import assign_windows
from segclip.runtime.windows import resized_size, window_grid

assign_cuda = pytest.importorskip("segclip.runtime.assign_cuda")


def emulate_kernel(assign: np.ndarray, inputs: object) -> np.ndarray:
    """The body of `segclip_assign_labels` for every (y, x) at once, float32 step by step."""
    regions, grid_h, grid_w, windows_x, height, width = inputs.scalars
    taps, fracs, flat = inputs.taps, inputs.fracs, assign.reshape(-1)
    row_tile, row_lo, row_hi, col_tile, col_lo, col_hi = (
        taps[o:o + n].astype(np.int64) for o, n in zip(
            inputs.tap_offsets, (height, height, height, width, width, width)))
    fy = fracs[inputs.frac_offsets[0]:][:height][:, None]  # (H, 1)
    fx = fracs[inputs.frac_offsets[1]:][:width][None, :]  # (1, W)
    win = row_tile[:, None] * windows_x + col_tile[None, :]  # (H, W)
    plane = grid_h * grid_w
    r0, r1 = (row_lo * grid_w)[:, None], (row_hi * grid_w)[:, None]
    c0, c1 = col_lo[None, :], col_hi[None, :]

    def lerp(lower: np.ndarray, upper: np.ndarray, frac: np.ndarray) -> np.ndarray:
        return np.float32(upper - lower) * frac + lower  # float32 sub, mul, add

    best = np.zeros((height, width), np.int64)
    best_value = np.zeros((height, width), np.float32)
    for region in range(regions):
        base = (win * regions + region) * plane
        top = lerp(flat[base + r0 + c0], flat[base + r0 + c1], fx)
        bottom = lerp(flat[base + r1 + c0], flat[base + r1 + c1], fx)
        value = lerp(top, bottom, fy).astype(np.float32)
        better = (value > best_value) | (region == 0)
        best = np.where(better, region, best)
        best_value = np.where(better, value, best_value)
    return inputs.table[win * regions + best]


@pytest.mark.parametrize("height, width, window, grid, regions", [
    (64, 64, 64, 8, 8), (90, 140, 64, 8, 8), (50, 80, 64, 8, 8), (200, 90, 64, 8, 8),
    (480, 640, 224, 14, 8), (37, 301, 32, 4, 3), (1, 1, 16, 2, 1), (300, 17, 16, 4, 5),
])
def test_packed_arguments_reproduce_the_cpu_assignment(height: int, width: int, window: int,
                                                       grid: int, regions: int) -> None:
    rng = np.random.default_rng(height * width + regions)
    resized = resized_size(height, width, window)
    count = int(np.prod(window_grid(*resized, window)))
    assign = rng.random((count, regions, grid, grid), dtype=np.float32)
    table = rng.integers(0, 30, (count, regions)).astype(np.uint16)
    inputs = assign_cuda.kernel_inputs(assign.shape, table, resized, window, (height, width))
    assert inputs.taps.dtype == np.int32 and inputs.fracs.dtype == np.float32
    assert inputs.taps.size == 3 * (height + width) and inputs.fracs.size == height + width
    expected = assign_windows(assign, table, resized, window, (height, width))
    np.testing.assert_array_equal(emulate_kernel(assign, inputs), expected)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"do not fit 1x2 windows of 64x100"):
        assign_cuda.kernel_inputs((3, 8, 8, 8), np.zeros((3, 8), np.uint16), (64, 100), 64,
                                  (64, 100))


def test_kernel_source_compiles_with_nvrtc() -> None:
    try:
        code = assign_cuda._compile(9, 0)  # NVRTC needs no GPU
    except Exception as e:  # noqa: BLE001 - NVRTC library absent in this environment
        pytest.skip(f"NVRTC unavailable: {e}")
    assert code[:4] == b"\x7fELF"  # a CUBIN for sm_90

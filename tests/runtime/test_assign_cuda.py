"""segclip.runtime.assign_cuda: the CUDA label-assignment kernel equals the numpy fused
assignment bit for bit (same taps, same rounding; ties included). Needs a CUDA GPU and
cuda-python; skipped elsewhere."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from segclip.runtime.assign import assign_windows
from segclip.runtime.windows import resized_size, window_grid

pytestmark = pytest.mark.gpu
assign_cuda = pytest.importorskip("segclip.runtime.assign_cuda")  # needs cuda-python


@pytest.fixture(scope="module", autouse=True)
def gpu() -> None:
    from segclip.runtime.errors import EngineError

    try:
        assign_cuda.shared_assigner(0)
    except EngineError as e:  # cuda-python present but no usable GPU / NVRTC
        pytest.skip(f"no usable CUDA GPU: {e}")


def case(height: int, width: int, window: int, grid: int, regions: int, labels: int,
         seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    resized = resized_size(height, width, window)
    count = int(np.prod(window_grid(*resized, window)))
    logits = rng.standard_normal((count, regions, grid, grid)).astype(np.float32)
    assign = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (n, L, h, w)
    table = rng.integers(0, labels + 1, (count, regions)).astype(np.uint16)  # (n, L)
    return assign.astype(np.float32), table, resized, window, (height, width)


@pytest.mark.parametrize("height, width, window, grid, regions", [
    (64, 64, 64, 8, 8), (90, 140, 64, 8, 8), (50, 80, 64, 8, 8), (200, 90, 64, 8, 8),
    (480, 640, 224, 14, 8), (1080, 1920, 224, 14, 8), (37, 301, 32, 4, 3), (1, 1, 16, 2, 1),
])
def test_equals_the_numpy_assignment(height: int, width: int, window: int, grid: int,
                                     regions: int) -> None:
    assign, table, resized, window, out_hw = case(height, width, window, grid, regions, 20,
                                                  seed=height * width)
    expected = assign_windows(assign, table, resized, window, out_hw)
    got = assign_cuda.assign_windows_cuda(assign, table, resized, window, out_hw)
    assert got.dtype == np.uint16 and got.shape == out_hw
    np.testing.assert_array_equal(got, expected)


def test_ties_take_the_first_region() -> None:
    assign = np.full((1, 4, 8, 8), 0.25, np.float32)  # every region ties everywhere
    table = np.array([[7, 1, 2, 3]], np.uint16)
    got = assign_cuda.assign_windows_cuda(assign, table, (64, 64), 64, (100, 100))
    assert (got == 7).all()
    np.testing.assert_array_equal(got, assign_windows(assign, table, (64, 64), 64, (100, 100)))


def test_threads_share_the_kernel() -> None:
    cases = [case(300, 500, 64, 8, 8, 10, seed) for seed in range(4)]
    expected = [assign_windows(*c) for c in cases]
    failures: list[int] = []

    def worker(index: int) -> None:
        for _ in range(5):
            if not (assign_cuda.assign_windows_cuda(*cases[index]) == expected[index]).all():
                failures.append(index)

    with ThreadPoolExecutor(4) as pool:  # re-raises a worker's exception
        list(pool.map(worker, range(4)))
    assert not failures

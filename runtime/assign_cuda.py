"""Fused label assignment on the GPU (docs/architecture.md "Label assignment", step 3; paper §2.5).

The CUDA twin of `segclip.runtime.assign.assign_windows`: one thread per output pixel reads the
owning window's L soft-assignment maps at its two row and two column taps, interpolates them,
takes the first maximum over regions and writes the region's label. The taps and owning windows
along each axis are computed on the host by the same code as the CPU path
(`assign.window_taps`), so both paths sample the same points; the interpolation uses the same
operation order with fused multiply-adds disabled (`__fsub_rn`/`__fmul_rn`/`__fadd_rn`), so the
CUDA result equals the numpy one bit for bit (ties included), barring NaNs in the assignment.

The soft assignment is read where the image engine wrote it, in device memory; only the (n, L)
region label table and the per-axis taps go up, and only the (H, W) uint16 label map comes back.
The kernel is compiled with NVRTC on first use (cuda-python), for the device's architecture, and
loaded into the primary context. Legend: n windows, L regions, h x w patch grid, H x W pixels.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segclip.runtime import _cuda
from segclip.runtime._cuda import DeviceBuffer, check, driver, nvrtc
from segclip.runtime.assign import window_taps
from segclip.runtime.errors import EngineError
from segclip.runtime.windows import window_grid

KERNEL_NAME = "segclip_assign_labels"
BLOCK = (32, 8)  # threads per block along x (columns) and y (rows)

KERNEL_SOURCE = r"""
__device__ __forceinline__ float lerp_exact(float lower, float upper, float frac) {
    // (upper - lower) * frac + lower, rounded step by step like numpy (no FMA contraction)
    return __fadd_rn(__fmul_rn(__fsub_rn(upper, lower), frac), lower);
}

extern "C" __global__ void segclip_assign_labels(
        const float* __restrict__ assign,           // (n, L, h, w) soft assignment
        const unsigned short* __restrict__ table,   // (n, L) region labels
        const int* __restrict__ row_tile,           // (H,) window row owning each output row
        const int* __restrict__ row_lo,             // (H,) upper grid row read (local)
        const int* __restrict__ row_hi,             // (H,) lower grid row read (local)
        const float* __restrict__ row_frac,         // (H,) weight of row_hi
        const int* __restrict__ col_tile,           // (W,)
        const int* __restrict__ col_lo,             // (W,)
        const int* __restrict__ col_hi,             // (W,)
        const float* __restrict__ col_frac,         // (W,)
        int regions, int grid_h, int grid_w, int windows_x, int height, int width,
        unsigned short* __restrict__ out) {         // (H, W) labels
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= width || y >= height) return;
    const long long win = (long long)row_tile[y] * windows_x + col_tile[x];
    const long long plane = (long long)grid_h * grid_w;
    const float* base = assign + win * regions * plane;
    const long long r0 = (long long)row_lo[y] * grid_w, r1 = (long long)row_hi[y] * grid_w;
    const int c0 = col_lo[x], c1 = col_hi[x];
    const float fy = row_frac[y], fx = col_frac[x];
    int best = 0;
    float best_value = 0.0f;
    for (int l = 0; l < regions; ++l) {
        const float* p = base + l * plane;
        const float top = lerp_exact(p[r0 + c0], p[r0 + c1], fx);
        const float bottom = lerp_exact(p[r1 + c0], p[r1 + c1], fx);
        const float value = lerp_exact(top, bottom, fy);
        if (l == 0 || value > best_value) {  // first maximum, as numpy.argmax
            best = l;
            best_value = value;
        }
    }
    out[(long long)y * width + x] = table[win * regions + best];
}
"""


def _compile(major: int, minor: int) -> bytes:
    """CUBIN (or PTX, if NVRTC does not know this architecture) of the kernel."""
    attempts = ((f"--gpu-architecture=sm_{major}{minor}", "CUBIN"),
                (f"--gpu-architecture=compute_{major}{minor}", "PTX"))
    log = ""
    for option, kind in attempts:
        program = check(nvrtc.nvrtcCreateProgram(KERNEL_SOURCE.encode(), b"segclip_assign.cu",
                                                 0, [], []), "nvrtcCreateProgram")
        try:
            options = [option.encode(), b"--std=c++11"]
            (err,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
            if int(getattr(err, "value", err)) != 0:
                size = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
                buffer = b" " * size
                check(nvrtc.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
                log = buffer.decode("utf-8", "replace").strip()
                continue
            get_size = getattr(nvrtc, f"nvrtcGet{kind}Size")
            get_code = getattr(nvrtc, f"nvrtcGet{kind}")
            size = check(get_size(program), f"nvrtcGet{kind}Size")
            code = b" " * size
            check(get_code(program, code), f"nvrtcGet{kind}")
            return code
        finally:
            nvrtc.nvrtcDestroyProgram(program)
    raise EngineError(f"NVRTC could not compile the label-assignment kernel for compute "
                      f"capability {major}.{minor}: {log}")


@dataclass
class AssignScratch:
    """Per-thread device buffers of the assignment (reused across images, grown on demand)."""

    table: DeviceBuffer = field(default_factory=DeviceBuffer)
    taps: DeviceBuffer = field(default_factory=DeviceBuffer)
    fracs: DeviceBuffer = field(default_factory=DeviceBuffer)
    out: DeviceBuffer = field(default_factory=DeviceBuffer)
    assign: DeviceBuffer = field(default_factory=DeviceBuffer)  # for host-array inputs only

    def free(self) -> None:
        for buffer in (self.table, self.taps, self.fracs, self.out, self.assign):
            buffer.free()


@dataclass(frozen=True)
class KernelInputs:
    """Host-side arguments of the kernel, packed as they are uploaded."""

    table: np.ndarray  # (n * L,) uint16 region labels
    taps: np.ndarray  # (3H + 3W,) int32: row tile, lo, hi; column tile, lo, hi (local rows)
    fracs: np.ndarray  # (H + W,) float32: row fractions, then column fractions
    tap_offsets: tuple[int, ...]  # element offsets of the six int32 arrays in `taps`
    frac_offsets: tuple[int, int]  # element offsets of the row / column fractions
    scalars: tuple[int, ...]  # regions, grid_h, grid_w, windows_x, height, width
    out_hw: tuple[int, int]


def kernel_inputs(shape: Sequence[int], region_label: np.ndarray, resized_hw: Sequence[int],
                  window: int, out_hw: Sequence[int]) -> KernelInputs:
    """Pack the kernel's arguments with the CPU path's taps (`assign.window_taps`)."""
    num, regions, grid_h, grid_w = (int(v) for v in shape)
    resized_h, resized_w = (int(v) for v in resized_hw)
    height, width = (int(v) for v in out_hw)
    grid_y, grid_x = window_grid(resized_h, resized_w, window)
    table = np.ascontiguousarray(region_label, dtype=np.uint16)
    if num != grid_y * grid_x or table.shape != (num, regions):
        raise ValueError(f"assign {tuple(shape)} / labels {table.shape} do not fit "
                         f"{grid_y}x{grid_x} windows of {resized_h}x{resized_w}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be at least 1x1, got {height}x{width}")
    row_tiles, rows = window_taps(height, resized_h, window, grid_h)
    col_tiles, cols = window_taps(width, resized_w, window, grid_w)
    taps = np.concatenate([row_tiles, rows.lo - row_tiles * grid_h,
                           rows.hi - row_tiles * grid_h, col_tiles,
                           cols.lo - col_tiles * grid_w,
                           cols.hi - col_tiles * grid_w]).astype(np.int32)  # (3H + 3W,)
    fracs = np.concatenate([rows.frac, cols.frac]).astype(np.float32)  # (H + W,)
    h3 = 3 * height
    return KernelInputs(table=table.reshape(-1), taps=taps, fracs=fracs,
                        tap_offsets=(0, height, 2 * height, h3, h3 + width, h3 + 2 * width),
                        frac_offsets=(0, height),
                        scalars=(regions, grid_h, grid_w, grid_x, height, width),
                        out_hw=(height, width))


class CudaAssigner:
    """The compiled kernel on one device; `label_map` is safe to call from several threads,
    each with its own stream and `AssignScratch`."""

    def __init__(self, device_id: int = 0) -> None:
        _cuda.use_device(device_id)
        _, capability = _cuda.device_facts(device_id)
        major, minor = (int(v) for v in capability.split("."))
        code = np.frombuffer(_compile(major, minor), dtype=np.uint8)
        self._code = code  # the module keeps a pointer-free copy, but keep ours alive anyway
        self._module = check(driver.cuModuleLoadData(code.ctypes.data), "cuModuleLoadData")
        self._kernel = check(driver.cuModuleGetFunction(self._module, KERNEL_NAME.encode()),
                             "cuModuleGetFunction")
        self.device_id = device_id

    def label_map(self, assign_ptr: int, shape: Sequence[int], region_label: np.ndarray,
                  resized_hw: Sequence[int], window: int, out_hw: Sequence[int], stream: object,
                  scratch: AssignScratch) -> np.ndarray:
        """(H, W) uint16 labels from a float32 (n, L, h, w) assignment at `assign_ptr`.

        Args:
            shape: (n, L, h, w) of the device assignment, windows in `window_boxes` order.
            region_label: (n, L) uint16 labels of each window's regions (`region_labels`).
            stream: the cudaStream_t the assignment was written on (ordering is kept).
        """
        inputs = kernel_inputs(shape, region_label, resized_hw, window, out_hw)
        height, width = inputs.out_hw
        out = np.empty((height, width), dtype=np.uint16)  # (H, W)
        _cuda.copy_to_device(scratch.table.ensure(inputs.table.nbytes), inputs.table, stream)
        _cuda.copy_to_device(scratch.taps.ensure(inputs.taps.nbytes), inputs.taps, stream)
        _cuda.copy_to_device(scratch.fracs.ensure(inputs.fracs.nbytes), inputs.fracs, stream)
        out_ptr = scratch.out.ensure(out.nbytes)
        tap, frac = scratch.taps.ptr, scratch.fracs.ptr  # 4-byte int32 / float32 elements
        pointers = [assign_ptr, scratch.table.ptr,
                    *(tap + 4 * inputs.tap_offsets[k] for k in range(3)),  # row tile, lo, hi
                    frac + 4 * inputs.frac_offsets[0],  # row frac
                    *(tap + 4 * inputs.tap_offsets[k] for k in range(3, 6)),  # column ...
                    frac + 4 * inputs.frac_offsets[1]]
        values = [np.array([p], dtype=np.uint64) for p in pointers]
        values += [np.array([v], dtype=np.int32) for v in inputs.scalars]
        values.append(np.array([out_ptr], dtype=np.uint64))
        params = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        grid = ((width + BLOCK[0] - 1) // BLOCK[0], (height + BLOCK[1] - 1) // BLOCK[1], 1)
        check(driver.cuLaunchKernel(self._kernel, *grid, BLOCK[0], BLOCK[1], 1, 0,
                                    driver.CUstream(_cuda.stream_handle(stream)),
                                    params.ctypes.data, 0), "cuLaunchKernel")
        _cuda.copy_to_host(out, out_ptr, stream)
        _cuda.synchronize(stream)  # `values`, `inputs`, `out` must outlive the async work
        return out


_SHARED: dict[int, CudaAssigner] = {}
_SHARED_LOCK = threading.Lock()
_LOCAL = threading.local()


def shared_assigner(device_id: int = 0) -> CudaAssigner:
    """One compiled kernel per device per process."""
    with _SHARED_LOCK:
        if device_id not in _SHARED:
            _SHARED[device_id] = CudaAssigner(device_id)
        return _SHARED[device_id]


def assign_windows_cuda(assign: np.ndarray, region_label: np.ndarray,
                        resized_hw: Sequence[int], window: int, out_hw: Sequence[int],
                        device_id: int = 0) -> np.ndarray:
    """`assign.assign_windows` on the GPU from a host (n, L, h, w) array (tests, benchmarks)."""
    assigner = shared_assigner(device_id)
    _cuda.use_device(device_id)
    state = getattr(_LOCAL, "state", None)
    if state is None:
        state = _LOCAL.state = (_cuda.create_stream(), AssignScratch())
    stream, scratch = state
    array = np.ascontiguousarray(assign, dtype=np.float32)
    if array.ndim != 4:
        raise ValueError(f"assign must be (n, L, h, w), got {array.shape}")
    _cuda.copy_to_device(scratch.assign.ensure(array.nbytes), array, stream)
    return assigner.label_map(scratch.assign.ptr, array.shape, region_label, resized_hw, window,
                              out_hw, stream, scratch)


__all__ = ["KERNEL_SOURCE", "AssignScratch", "CudaAssigner", "KernelInputs",
           "assign_windows_cuda", "kernel_inputs", "shared_assigner"]

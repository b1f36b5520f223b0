"""cuda-python helpers shared by the TensorRT backend and the CUDA label assignment.

Imports cuda-python at the top (new `cuda.bindings` layout, or the older `cuda.cudart` one), so
only the GPU modules import this file, and only when selected (docs/architecture.md "Layout and
packages"). Everything uses the runtime API on the device's *primary* context, the one
ONNX Runtime, TensorRT and torch also use (docs/runtime-practice.md pitfall 4: no private contexts).
"""

from __future__ import annotations

from typing import Any

try:  # cuda-python >= 12.6
    from cuda.bindings import driver, nvrtc
    from cuda.bindings import runtime as cudart
except ImportError:  # older cuda-python: cuda.cuda / cuda.cudart / cuda.nvrtc (gone in 13.0)
    from cuda import cuda as driver  # type: ignore[no-redef]
    from cuda import cudart, nvrtc  # type: ignore[no-redef]
try:  # cuda-bindings >= 12.9.1; int(handle) is deprecated there and "subject to future removal"
    from cuda.bindings.utils import get_cuda_native_handle as _native_handle
except ImportError:
    _native_handle = int

from segclip.runtime.errors import EngineError

__all__ = ["DeviceBuffer", "check", "copy_on_device", "copy_to_device", "copy_to_host",
           "create_stream", "cudart", "destroy_stream", "device_facts", "driver", "nvrtc",
           "stream_handle", "synchronize", "use_device"]

H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
D2D = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice


def _code(err: Any) -> int:
    return int(getattr(err, "value", err))


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python `(err, *values)` result; raise `EngineError` naming `what`."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if _code(err) != 0:
        raise EngineError(f"CUDA call {what} failed: {err!r}; check the GPU, its driver and "
                          f"free memory (nvidia-smi)")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def use_device(device_id: int) -> None:
    """Make `device_id`'s primary context current on this thread (and initialise it)."""
    check(cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
    check(cudart.cudaFree(0), "cudaFree(0) (context initialisation)")


def device_facts(device_id: int) -> tuple[str, str]:
    """(name, "major.minor" compute capability) of CUDA device `device_id`."""
    count = check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device_id >= count:
        raise EngineError(f"CUDA device {device_id} does not exist ({count} visible)")
    props = check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name), f"{props.major}.{props.minor}"


def stream_handle(stream: Any) -> int:
    """The raw cudaStream_t address (what TensorRT's `execute_async_v3` takes)."""
    return int(_native_handle(stream))


class DeviceBuffer:
    """A device allocation that grows on demand and is reused (never shrinks)."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            cudart.cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0


def copy_to_device(dst: int, array: Any, stream: Any) -> None:
    check(cudart.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, H2D, stream),
          "cudaMemcpyAsync(host -> device)")


def copy_to_host(array: Any, src: int, stream: Any) -> None:
    check(cudart.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes, D2H, stream),
          "cudaMemcpyAsync(device -> host)")


def copy_on_device(dst: int, src: int, nbytes: int, stream: Any) -> None:
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, D2D, stream),
          "cudaMemcpyAsync(device -> device)")


def synchronize(stream: Any) -> None:
    check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def create_stream() -> Any:
    return check(cudart.cudaStreamCreate(), "cudaStreamCreate")


def destroy_stream(stream: Any) -> None:
    cudart.cudaStreamDestroy(stream)

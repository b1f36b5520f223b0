"""TensorRT backend (docs/runtime-practice.md "TensorRT 10.x"): the bundle's
`image.plan`/`text.plan`.

TensorRT 10 name-based I/O: `deserialize_cuda_engine`, `num_io_tensors` / `get_tensor_name` /
`get_tensor_mode` / `get_tensor_shape`, then per call `set_input_shape`, `set_tensor_address`
and `execute_async_v3(stream)`. Buffers and streams come from cuda-python's runtime API on the
primary context (no pycuda, no private context: pitfall 4). Execution contexts are not
thread-safe, so every thread gets its own context, stream and device buffers (sized once for
the profile's largest batch and reused) through `threading.local`; the engine is shared. An
engine built by another TensorRT version or on another GPU is refused by
`Bundle.check_engine` before it is deserialised. With `label_windows` the soft assignment of all
of an image's windows is written by the engine straight into one device buffer and labelled
there by the CUDA kernel of `segclip.runtime.assign_cuda`; only the label map is copied back.
This module imports tensorrt and cuda-python at the top; the registry imports it only when it
selects TensorRT. Legend: B windows, n windows of an image, L regions, h x w patch grid, D
embedding width, T labels, C context length.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorrt as trt

from segclip.runtime import _cuda, contract
from segclip.runtime.backends.base import (
    ImageOutputs,
    RegionLabeler,
    check_image_outputs,
    check_text_output,
)
from segclip.runtime.bundle import Bundle, EngineFacts, EngineInfo, TensorSpec, rebuild_command
from segclip.runtime.errors import EngineError

TENSOR_ALIGNMENT = 256  # bytes; IExecutionContext::setTensorAddress needs this (NvInferRuntime.h)


def present_facts(device_id: int = 0) -> EngineFacts:
    """TensorRT version and GPU of this machine, as `segclip-export trt` records them."""
    name, capability = _cuda.device_facts(device_id)
    return EngineFacts(tensorrt=trt.__version__, gpu=name, compute_capability=capability)


@dataclass
class _ThreadState:
    """One thread's execution context, stream and device buffers for one engine."""

    context: Any
    stream: Any
    buffers: dict[str, _cuda.DeviceBuffer] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def free(self) -> None:
        for buffer in (*self.buffers.values(), *self.extra.values()):
            buffer.free()  # DeviceBuffer or AssignScratch
        _cuda.destroy_stream(self.stream)
        self.context = None


class _Engine:
    """A deserialised engine: I/O specs, profile range, and per-thread execution state."""

    def __init__(self, runtime: Any, info: EngineInfo, bundle: Bundle, input_name: str,
                 device_id: int) -> None:
        self.info, self.path, self.device_id = info, info.path, device_id
        self.engine = runtime.deserialize_cuda_engine(info.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} cannot deserialise {info.path} (see "
                              f"the TensorRT log above); rebuild it on this machine with "
                              f"{rebuild_command(bundle.root, info.precision)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        specs = {n: TensorSpec(n, self.shapes[n], self.dtypes[n].name) for n in names}
        bundle.check_io(info.path.name, [specs[n] for n in inputs],
                        [specs[n] for n in self.outputs])
        self.input = input_name
        low, _, high = self.engine.get_tensor_profile_shape(input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        for name in names:
            if any(int(d) < 0 for d in self.shapes[name][1:]):
                raise EngineError(f"{info.path}: tensor {name!r} has dynamic dimensions "
                                  f"{self.shapes[name]} beyond the batch; rebuild with "
                                  f"{rebuild_command(bundle.root, info.precision)}")
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._lock = threading.Lock()

    def tail(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shapes[name][1:])

    def state(self) -> _ThreadState:
        """This thread's context, stream and buffers (created on the thread's first call)."""
        state = getattr(self._local, "state", None)
        if state is None:
            _cuda.use_device(self.device_id)
            context = self.engine.create_execution_context()
            if context is None:
                raise EngineError(f"TensorRT could not create an execution context for "
                                  f"{self.path} (out of GPU memory?)")
            state = _ThreadState(context=context, stream=_cuda.create_stream())
            for name in (self.input, *self.outputs):
                count = self.max_batch * int(np.prod(self.tail(name), dtype=np.int64))
                state.buffers[name] = _cuda.DeviceBuffer()
                state.buffers[name].ensure(count * self.dtypes[name].itemsize)
            self._local.state = state
            with self._lock:
                self._states.append(state)
        return state

    def launch(self, state: _ThreadState, batch: np.ndarray,
               addresses: dict[str, int] | None = None) -> int:
        """Upload `batch` (padded to the profile minimum), bind, enqueue; returns the padded
        batch size. Outputs go to this thread's buffers unless `addresses` redirects them."""
        count = batch.shape[0]
        if not 1 <= count <= self.max_batch:
            raise EngineError(f"{count} is outside {self.path.name}'s batch profile "
                              f"[{self.min_batch}, {self.max_batch}]")
        padded = max(count, self.min_batch)
        host = np.zeros((padded, *self.tail(self.input)), dtype=self.dtypes[self.input])
        host[:count] = batch
        context = state.context
        if not context.set_input_shape(self.input, host.shape):
            raise EngineError(f"{self.path.name} refused input shape {host.shape}")
        _cuda.copy_to_device(state.buffers[self.input].ptr, host, state.stream)
        targets = {name: buffer.ptr for name, buffer in state.buffers.items()}
        targets.update(addresses or {})
        for name, ptr in targets.items():
            if not context.set_tensor_address(name, ptr):
                raise EngineError(f"TensorRT refused the address of {name!r} of {self.path.name}")
        if not context.execute_async_v3(_cuda.stream_handle(state.stream)):
            raise EngineError(f"TensorRT execute_async_v3 failed on {self.path.name} (see the "
                              f"TensorRT log above)")
        return padded  # copies and launches stay ordered on the thread's stream

    def fetch(self, state: _ThreadState, name: str, count: int) -> np.ndarray:
        """Enqueue the copy of the first `count` rows of output `name` into a new host array."""
        host = np.empty((count, *self.tail(name)), dtype=self.dtypes[name])
        _cuda.copy_to_host(host, state.buffers[name].ptr, state.stream)
        return host

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        state = self.state()
        self.launch(state, batch)
        hosts = {name: self.fetch(state, name, batch.shape[0]) for name in self.outputs}
        _cuda.synchronize(state.stream)
        return hosts

    def close(self) -> None:
        with self._lock:
            for state in self._states:
                state.free()
            self._states.clear()
        self.engine = None


class TensorRTBackend:
    """image.plan (and text.plan, else the text graph in ONNX Runtime) on one CUDA device."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, bundle: Bundle, device_id: int = 0, text_backend: Any = None,
                 facts: EngineFacts | None = None, device_labeling: bool = True) -> None:
        _cuda.use_device(device_id)
        facts = facts or present_facts(device_id)
        self.bundle, self.device_id = bundle, device_id
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        image_info = bundle.check_engine("image", facts)
        self._image = _Engine(self._runtime, image_info, bundle, contract.IMAGE_INPUT, device_id)
        self._text: _Engine | None = None
        self._text_backend = text_backend
        if "text" in bundle.engines:
            text_info = bundle.check_engine("text", facts)
            self._text = _Engine(self._runtime, text_info, bundle, contract.TEXT_INPUT, device_id)
        elif text_backend is None:
            raise EngineError(f"{bundle.root} has no text engine and no text backend was given")
        self.max_batch = self._image.max_batch
        self.provider = f"TensorRT {trt.__version__} ({facts.gpu})"
        self.precision = image_info.precision
        self._assigner = None
        if device_labeling and self._image.dtypes[contract.ASSIGN_OUTPUT] == np.float32:
            self._assigner = self._load_assigner()

    def _load_assigner(self) -> Any:
        try:
            from segclip.runtime.assign_cuda import shared_assigner

            return shared_assigner(self.device_id)
        except (EngineError, OSError, RuntimeError) as e:  # e.g. libnvrtc missing
            warnings.warn(f"the CUDA label-assignment kernel is unavailable ({e}); label maps "
                          f"are assigned on the CPU (same result, slower)", RuntimeWarning,
                          stacklevel=3)
            return None

    @property
    def device_labeling(self) -> bool:
        return self._assigner is not None

    def run_image(self, batch: np.ndarray) -> ImageOutputs:
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # (B, 3, S, S)
        out = self._image.run(batch)
        outputs = ImageOutputs(*(out[n].astype(np.float32, copy=False)
                                 for n in contract.IMAGE_OUTPUTS))
        return check_image_outputs(outputs, batch.shape[0], self._image.path.name)

    def run_text(self, tokens: np.ndarray) -> np.ndarray:
        if self._text is None:
            return self._text_backend.run_text(tokens)
        engine = self._text
        dtype = engine.dtypes[engine.input]  # int32 engines take int32 ids (ids < 2**31)
        parts = []
        for start in range(0, tokens.shape[0], engine.max_batch):  # (<= max, C) per call
            chunk = np.ascontiguousarray(tokens[start:start + engine.max_batch], dtype=dtype)
            parts.append(engine.run(chunk)[contract.TEXT_OUTPUT].astype(np.float32))
        text = np.concatenate(parts) if parts else np.zeros((0, self.bundle.embed_dim),
                                                             np.float32)
        return check_text_output(text, tokens.shape[0], self.bundle.embed_dim, engine.path.name)

    def label_windows(self, windows: np.ndarray, labeler: RegionLabeler,
                      resized_hw: tuple[int, int], window: int,
                      out_hw: tuple[int, int]) -> tuple[np.ndarray, dict[str, float]]:
        """Image tower on all windows, then the CUDA assignment; only the labels come back."""
        if self._assigner is None:
            raise EngineError("the CUDA label-assignment kernel is not loaded")
        start = time.perf_counter()
        engine, state = self._image, self._image.state()
        scratch = state.extra.setdefault("scratch", _new_scratch())
        num = windows.shape[0]
        tail = engine.tail(contract.ASSIGN_OUTPUT)  # (L, h, w)
        row_bytes = int(np.prod(tail)) * 4
        all_assign = state.extra.setdefault("all_assign", _cuda.DeviceBuffer())
        target = all_assign.ensure(num * row_bytes)
        globals_, regions = [], []
        for first in range(0, num, engine.max_batch):
            chunk = np.ascontiguousarray(windows[first:first + engine.max_batch], np.float32)
            count = chunk.shape[0]
            # write into place when there are no padding rows and the address keeps TensorRT's
            # 256-byte alignment for tensor addresses (set_tensor_address refuses others); else
            # the engine writes its own buffer and the rows are copied
            direct = count >= engine.min_batch and (first * row_bytes) % TENSOR_ALIGNMENT == 0
            redirect = {contract.ASSIGN_OUTPUT: target + first * row_bytes} if direct else None
            engine.launch(state, chunk, redirect)
            if not direct:
                _cuda.copy_on_device(target + first * row_bytes,
                                     state.buffers[contract.ASSIGN_OUTPUT].ptr,
                                     count * row_bytes, state.stream)
            globals_.append(engine.fetch(state, contract.GLOBAL_OUTPUT, count))
            regions.append(engine.fetch(state, contract.REGIONS_OUTPUT, count))
        _cuda.synchronize(state.stream)
        global_all = np.concatenate(globals_).astype(np.float32, copy=False)  # (n, D)
        region_all = np.concatenate(regions).astype(np.float32, copy=False)  # (n, L, D)
        image_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        table = labeler(global_all, region_all)  # (n, L) uint16
        label_map = self._assigner.label_map(target, (num, *tail), table, resized_hw, window,
                                             out_hw, state.stream, scratch)
        return label_map, {"image": image_ms, "assign": (time.perf_counter() - start) * 1e3}

    def info(self) -> dict[str, Any]:
        text = self._text.path.name if self._text is not None else \
            f"{self._text_backend.info().get('text')} ({self._text_backend.provider})"
        return {"backend": self.name, "device": self.device, "provider": self.provider,
                "image": self._image.path.name, "text": text, "precision": self.precision,
                "batch_profile": [self._image.min_batch, self._image.max_batch],
                "assign": "cuda" if self.device_labeling else "cpu",
                "tensorrt": trt.__version__}

    def close(self) -> None:
        self._image.close()
        if self._text is not None:
            self._text.close()
        if self._text_backend is not None:
            self._text_backend.close()


def _new_scratch() -> Any:
    from segclip.runtime.assign_cuda import AssignScratch

    return AssignScratch()

"""segclip.runtime.backends.tensorrt without a GPU, through stand-ins for `tensorrt` and
cuda-python's runtime API that keep their signatures and return conventions.

TensorRT's Python bindings report failure by return value, not by exception
(NVIDIA/TensorRT python/src/infer/pyCore.cpp): `deserialize_cuda_engine` -> None,
`set_input_shape` / `set_tensor_address` / `execute_async_v3` -> False, and `set_tensor_address`
needs 256-byte aligned addresses (NvInferRuntime.h). cuda-python returns `(cudaError_t, *values)`
tuples. "Device" memory here is host memory addressed by integers, and every copy and every
engine read or write is checked against the live allocations, so a wrong offset, size or padding
fails the test. The real backend runs in test_tensorrt_backend.py (GPU only).
Legend: B windows, n windows of an image, L regions, h x w grid, D width, T labels, C context.
"""

from __future__ import annotations

import ctypes
import enum
import importlib
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segclip.runtime import contract
from segclip.runtime.assign import assign_windows
from segclip.runtime.bundle import Bundle, EngineFacts
from segclip.runtime.errors import EngineError
from segclip.runtime.windows import window_grid

_cuda = pytest.importorskip("segclip.runtime._cuda")  # cuda-python (no GPU needed)

SIZE, PATCH, CENTERS, DIM, CONTEXT = 32, 8, 3, 16, 8  # grid 4x4: 192-byte assign rows
GRID = SIZE // PATCH
FACTS = EngineFacts(tensorrt="10.9.0.34", gpu="Stand-in GPU", compute_capability="9.0")
CUDART = _cuda.cudart  # the real cuda.bindings.runtime, for its types
SUCCESS = CUDART.cudaError_t.cudaSuccess
INVALID = CUDART.cudaError_t.cudaErrorInvalidValue


# ---- stand-in cuda-python runtime (cuda.bindings.runtime) ---------------------------------------
class FakeCudart:
    """cudaMalloc/cudaMemcpyAsync/... over host memory; device pointers are plain ints."""

    cudaMemcpyKind = CUDART.cudaMemcpyKind

    def __init__(self) -> None:
        self.backing: dict[int, np.ndarray] = {}  # aligned address -> array that owns it
        self.sizes: dict[int, int] = {}
        self.mallocs = 0
        self.stream_count = 0

    def owned(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + size
                   for base, size in list(self.sizes.items()))

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        if not self.owned(ptr, nbytes):
            raise AssertionError(f"device access outside every allocation: {ptr:#x} + {nbytes}")
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def read(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return self.view(ptr, nbytes).view(dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        self.view(ptr, array.nbytes)[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    # the cuda.bindings.runtime calls segclip makes, with their return conventions
    def cudaSetDevice(self, device: int) -> tuple:
        return (SUCCESS,)

    def cudaGetDeviceCount(self) -> tuple:
        return (SUCCESS, 1)

    def cudaGetDeviceProperties(self, device: int) -> tuple:
        props = types.SimpleNamespace(name=b"Stand-in GPU" + b"\0" * 244, major=9, minor=0)
        return (SUCCESS, props)  # cudaDeviceProp.name is a bytes char[256]

    def cudaMalloc(self, size: int) -> tuple:
        owner = np.zeros(size + 256, np.uint8)
        ptr = (owner.ctypes.data + 255) // 256 * 256  # cudaMalloc aligns to >= 256 bytes
        self.backing[ptr], self.sizes[ptr] = owner, size
        self.mallocs += 1
        return (SUCCESS, ptr)

    def cudaFree(self, ptr: Any) -> tuple:
        ptr = int(ptr)
        if ptr == 0:  # cudaFree(0): context initialisation
            return (SUCCESS,)
        if ptr not in self.sizes:
            return (INVALID,)
        del self.backing[ptr], self.sizes[ptr]
        return (SUCCESS,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:
        device = [ptr for ptr, on_device in ((dst, kind in (_cuda.H2D, _cuda.D2D)),
                                             (src, kind in (_cuda.D2H, _cuda.D2D))) if on_device]
        if not isinstance(stream, CUDART.cudaStream_t) or not all(
                self.owned(ptr, count) for ptr in device):
            return (INVALID,)
        ctypes.memmove(dst, src, count)
        return (SUCCESS,)

    def cudaStreamCreate(self) -> tuple:
        self.stream_count += 1
        return (SUCCESS, CUDART.cudaStream_t(0x5000 + self.stream_count))

    def cudaStreamSynchronize(self, stream: Any) -> tuple:
        return (SUCCESS,)

    def cudaStreamDestroy(self, stream: Any) -> tuple:
        return (SUCCESS,)


# ---- stand-in tensorrt --------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = "float32"
    INT32 = "int32"
    INT64 = "int64"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


@dataclass
class EngineSpec:
    inputs: dict[str, tuple[DataType, tuple[int, ...]]]  # name -> (dtype, shape past the batch)
    outputs: dict[str, tuple[DataType, tuple[int, ...]]]
    profile: tuple[int, int, int]  # batch min, opt, max
    compute: Callable[[np.ndarray], dict[str, np.ndarray]]
    refuse_shapes: bool = False
    fail_execute: bool = False


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shape = engine, None
        self.addresses: dict[str, int] = {}
        self.streams: set[int] = set()

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        spec = self.engine.spec
        if name not in spec.inputs or spec.refuse_shapes:
            return False
        shape = tuple(int(d) for d in shape)
        low, _, high = spec.profile
        if shape[1:] != spec.inputs[name][1] or not low <= shape[0] <= high:
            return False  # outside the optimisation profile: an error is logged, False returned
        self.shape = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine.names or memory % 256:
            return False  # unknown tensor, or not 256-byte aligned
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, int):  # the binding takes a size_t
            raise TypeError(f"execute_async_v3(): incompatible stream_handle {stream_handle!r}")
        spec, memory = self.engine.spec, self.engine.memory
        if spec.fail_execute or self.shape is None or set(self.addresses) != set(self.engine.names):
            return False
        (name, (dtype, tail)), = spec.inputs.items()
        batch = memory.read(self.addresses[name], self.shape, dtype.value)
        for out, value in spec.compute(batch).items():
            want = (self.shape[0], *spec.outputs[out][1])
            assert value.shape == want, (out, value.shape, want)
            memory.write(self.addresses[out], value.astype(spec.outputs[out][0].value))
        self.streams.add(stream_handle)
        return True


class FakeEngine:
    def __init__(self, spec: EngineSpec, memory: FakeCudart) -> None:
        self.spec, self.memory = spec, memory
        self.names = [*spec.inputs, *spec.outputs]
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def _tensor(self, name: str) -> tuple[DataType, tuple[int, ...]]:
        return {**self.spec.inputs, **self.spec.outputs}[name]

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.spec.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensor(name)[0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:  # Dims: -1 for the dynamic batch
        return (-1, *self._tensor(name)[1])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert name in self.spec.inputs and profile_index == 0
        tail = self.spec.inputs[name][1]
        return [(n, *tail) for n in self.spec.profile]

    def create_execution_context(self) -> FakeContext:
        context = FakeContext(self)
        self.contexts.append(context)
        return context


def _fake_tensorrt(memory: FakeCudart, plans: dict[bytes, EngineSpec]) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = FACTS.tensorrt
    trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
    trt.nptype = lambda dtype: np.dtype(dtype.value).type

    class Logger:
        WARNING = 2

        def __init__(self, min_severity: int) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> FakeEngine | None:
            spec = plans.get(bytes(serialized_engine))
            return FakeEngine(spec, memory) if spec is not None else None  # None: logged error

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


# ---- the engines' arithmetic (any per-row function does; rows must not mix) ---------------------
def image_tower(batch: np.ndarray) -> dict[str, np.ndarray]:
    """(B, 3, S, S) -> global (B, D), regions (B, L, D), assign (B, L, h, w); L = 3, D = h * w."""
    count = batch.shape[0]
    pooled = batch.reshape(count, 3, GRID, PATCH, GRID, PATCH).mean(axis=(3, 5))  # (B, L, h, w)
    weights = np.exp(pooled - pooled.max(axis=1, keepdims=True))
    assign = weights / weights.sum(axis=1, keepdims=True)  # (B, L, h, w)
    regions = pooled.reshape(count, CENTERS, DIM)  # (B, L, D)
    return {contract.GLOBAL_OUTPUT: regions.mean(axis=1), contract.REGIONS_OUTPUT: regions,
            contract.ASSIGN_OUTPUT: assign}


def text_tower(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """(T, C) ids -> (T, D) with D = 2C."""
    assert tokens.dtype in (np.int32, np.int64)
    text = np.repeat(tokens.astype(np.float32), 2, axis=1) * 1e-3  # (T, D)
    return {contract.TEXT_OUTPUT: text}


def make_bundle(root: Path, image_profile: tuple[int, int, int],
                text_profile: tuple[int, int, int] = (1, 2, 4),
                token_dtype: DataType = DataType.INT64, **image_options: Any,
                ) -> tuple[Path, dict[bytes, EngineSpec]]:
    """A bundle directory whose engines are stand-in plans, and the plans' specs."""
    root.mkdir(parents=True)
    for name in (contract.IMAGE_ONNX, contract.TEXT_ONNX, contract.TOKENIZER_FILE):
        (root / name).write_bytes(b"not read by the TensorRT backend")
    assign_tail = image_options.pop("assign_tail", (CENTERS, GRID, GRID))
    specs = {
        "image": EngineSpec(
            inputs={contract.IMAGE_INPUT: (DataType.FLOAT, (3, SIZE, SIZE))},
            outputs={contract.GLOBAL_OUTPUT: (DataType.FLOAT, (DIM,)),
                     contract.REGIONS_OUTPUT: (DataType.FLOAT, (CENTERS, DIM)),
                     contract.ASSIGN_OUTPUT: (DataType.FLOAT, assign_tail)},
            profile=image_profile, compute=image_tower, **image_options),
        "text": EngineSpec(inputs={contract.TEXT_INPUT: (token_dtype, (CONTEXT,))},
                           outputs={contract.TEXT_OUTPUT: (DataType.FLOAT, (DIM,))},
                           profile=text_profile, compute=text_tower)}
    plans, engines = {}, []
    for tower, spec in specs.items():
        plan = f"stand-in plan: {tower}".encode()
        (root / f"{tower}.plan").write_bytes(plan)
        plans[plan] = spec
        low, opt, high = spec.profile
        engines.append({"tower": tower, "file": f"{tower}.plan", "precision": "fp32",
                        "tensorrt": FACTS.tensorrt, "gpu": FACTS.gpu,
                        "compute_capability": FACTS.compute_capability,
                        "profile": {"input": next(iter(spec.inputs)), "min": low, "opt": opt,
                                    "max": high}})
    manifest = {"format": contract.BUNDLE_FORMAT, "version": contract.BUNDLE_VERSION,
                "model": {"image_size": SIZE, "patch_size": PATCH, "num_centers": CENTERS,
                          "embed_dim": DIM, "context_length": CONTEXT, "logit_scale": 100.0},
                "files": {"image": contract.IMAGE_ONNX, "text": contract.TEXT_ONNX,
                          "tokenizer": contract.TOKENIZER_FILE},
                "engines": engines}
    (root / contract.MANIFEST_FILE).write_text(json.dumps(manifest))
    return root, plans


class FakeAssigner:
    """`CudaAssigner.label_map` reading the stand-in device memory, labelled by numpy."""

    def __init__(self, memory: FakeCudart) -> None:
        self.memory = memory

    def label_map(self, assign_ptr: int, shape: tuple[int, ...], region_label: np.ndarray,
                  resized_hw: tuple[int, int], window: int, out_hw: tuple[int, int],
                  stream: Any, scratch: Any) -> np.ndarray:
        assign = self.memory.read(assign_ptr, tuple(shape), np.float32)  # (n, L, h, w)
        return assign_windows(assign, region_label, resized_hw, window, out_hw)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The backend module imported against the stand-ins (and removed again afterwards)."""
    import segclip.runtime.backends as package

    memory, plans = FakeCudart(), {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(memory, plans))
    monkeypatch.setattr(_cuda, "cudart", memory)
    name = "segclip.runtime.backends.tensorrt"
    saved = sys.modules.pop(name, None)
    module = importlib.import_module(name)
    monkeypatch.setattr(module.TensorRTBackend, "_load_assigner",
                        lambda self: FakeAssigner(memory))

    def backend(root: Path, specs: dict[bytes, EngineSpec]) -> Any:
        plans.update(specs)
        return module.TensorRTBackend(Bundle.open(root), facts=FACTS)

    yield types.SimpleNamespace(module=module, memory=memory, backend=backend)
    sys.modules.pop(name, None)
    if saved is not None:
        sys.modules[name] = saved
        package.tensorrt = saved
    elif hasattr(package, "tensorrt"):
        delattr(package, "tensorrt")


def windows_of(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


def test_present_facts(stand_in: types.SimpleNamespace) -> None:
    assert stand_in.module.present_facts(0) == FACTS  # name decoded from the NUL-padded bytes


@pytest.mark.parametrize("token_dtype", [DataType.INT64, DataType.INT32])
def test_run_image_and_text_move_every_row(stand_in: types.SimpleNamespace, tmp_path: Path,
                                           token_dtype: DataType) -> None:
    backend = stand_in.backend(*make_bundle(tmp_path / "b", (2, 3, 3), token_dtype=token_dtype))
    assert backend.max_batch == 3 and backend.info()["batch_profile"] == [2, 3]
    for count in (1, 2, 3):  # 1: padded to the profile minimum, padding rows dropped
        windows = windows_of(count, seed=count)
        got, want = backend.run_image(windows), image_tower(windows)
        np.testing.assert_array_equal(got.global_, want[contract.GLOBAL_OUTPUT])
        np.testing.assert_array_equal(got.regions, want[contract.REGIONS_OUTPUT])
        np.testing.assert_array_equal(got.assign, want[contract.ASSIGN_OUTPUT])
    with pytest.raises(EngineError, match=r"4 is outside image\.plan's batch profile \[2, 3\]"):
        backend.run_image(windows_of(4))
    tokens = np.random.default_rng(1).integers(0, 49408, (7, CONTEXT))  # > the text max (4)
    np.testing.assert_array_equal(backend.run_text(tokens),
                                  text_tower(tokens)[contract.TEXT_OUTPUT])
    assert stand_in.memory.mallocs == 4 + 2  # one buffer per tensor and engine, made once
    backend.close()
    assert not stand_in.memory.sizes  # everything freed


@pytest.mark.parametrize("profile", [(2, 3, 3), (1, 4, 4), (1, 1, 1), (3, 5, 5)],
                         ids=["padded+unaligned", "aligned", "single", "unaligned"])
def test_label_windows_equals_the_host_path(stand_in: types.SimpleNamespace, tmp_path: Path,
                                            profile: tuple[int, int, int]) -> None:
    """All windows' assignment goes into one device buffer, chunk after chunk. A chunk written in
    place must start 256-byte aligned (assign rows are 192 bytes here), else TensorRT refuses the
    address; padded or unaligned chunks go through the engine's own buffer and a copy."""
    backend = stand_in.backend(*make_bundle(tmp_path / "b", profile))
    assert backend.device_labeling
    resized_hw, out_hw = (SIZE, 7 * SIZE), (20, 141)
    count = int(np.prod(window_grid(*resized_hw, SIZE)))  # 7 windows: several chunks
    windows = windows_of(count)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def labeler(global_: np.ndarray, regions: np.ndarray) -> np.ndarray:
        seen.append((global_, regions))
        return (np.argmax(regions, axis=-1) + 3 * (global_[:, :1] > 0) + 1).astype(np.uint16)

    want = image_tower(windows)
    expected = assign_windows(want[contract.ASSIGN_OUTPUT],
                              labeler(want[contract.GLOBAL_OUTPUT], want[contract.REGIONS_OUTPUT]),
                              resized_hw, SIZE, out_hw)
    for call in range(2):  # the second image reuses the buffers of the first
        label_map, ms = backend.label_windows(windows, labeler, resized_hw, SIZE, out_hw)
        assert label_map.dtype == np.uint16 and label_map.shape == out_hw
        np.testing.assert_array_equal(label_map, expected)
        np.testing.assert_array_equal(seen[-1][0], want[contract.GLOBAL_OUTPUT])
        np.testing.assert_array_equal(seen[-1][1], want[contract.REGIONS_OUTPUT])
        assert set(ms) == {"image", "assign"}
        if call == 0:
            allocated = stand_in.memory.mallocs
    assert stand_in.memory.mallocs == allocated


def test_failures_returned_by_tensorrt_are_engine_errors(stand_in: types.SimpleNamespace,
                                                         tmp_path: Path) -> None:
    root, plans = make_bundle(tmp_path / "refuse", (1, 2, 2), refuse_shapes=True)
    with pytest.raises(EngineError, match=r"image\.plan refused input shape \(1, 3, 32, 32\)"):
        stand_in.backend(root, plans).run_image(windows_of(1))
    root, plans = make_bundle(tmp_path / "fail", (1, 2, 2), fail_execute=True)
    with pytest.raises(EngineError, match=r"execute_async_v3 failed on image\.plan"):
        stand_in.backend(root, plans).run_image(windows_of(2))
    root, plans = make_bundle(tmp_path / "dynamic", (1, 2, 2), assign_tail=(CENTERS, -1, GRID))
    with pytest.raises(EngineError, match=r"tensor 'assign' has dynamic dimensions"):
        stand_in.backend(root, plans)
    root, plans = make_bundle(tmp_path / "garbage", (1, 2, 2))
    (root / contract.IMAGE_PLAN).write_bytes(b"not a plan")  # deserialize_cuda_engine -> None
    with pytest.raises(EngineError, match=r"cannot deserialise .*image\.plan.*rebuild it"):
        stand_in.backend(root, plans)


def test_threads_get_their_own_context_and_stream(stand_in: types.SimpleNamespace,
                                                  tmp_path: Path) -> None:
    backend = stand_in.backend(*make_bundle(tmp_path / "b", (1, 2, 4)))
    engine = backend._image.engine
    inputs = [windows_of(3, seed=i) for i in range(4)]
    failures: list[int] = []
    barrier = threading.Barrier(4)

    def worker(index: int) -> None:
        barrier.wait()
        for _ in range(3):
            got = backend.run_image(inputs[index]).assign
            if not np.array_equal(got, image_tower(inputs[index])[contract.ASSIGN_OUTPUT]):
                failures.append(index)

    with ThreadPoolExecutor(4) as pool:  # re-raises a worker's exception
        list(pool.map(worker, range(4)))
    assert not failures
    assert len(engine.contexts) == 4  # one execution context per thread, reused
    streams = [stream for context in engine.contexts for stream in context.streams]
    assert len(streams) == len(set(streams)) == 4  # ... each on its own stream

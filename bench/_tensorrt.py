"""TensorRT runner for bench/latency.py (`trt-fp16`, `trt-fp32`).

Two figures per case:
- the main one runs the runtime's TensorRT backend (`segclip.runtime.backends.create_backend`
  on "cuda", which must pick TensorRT): `run_image` / `run_text` on host arrays, i.e. with the
  host <-> device copies a caller of the backend pays;
- `engine_only` runs the same plan with the TensorRT 10 public API on inputs already on the GPU
  (`set_input_shape`, `set_tensor_address`, `execute_async_v3`, stream sync): the engine's own
  latency, without the copies (docs/runtime-practice.md pitfall 8). Buffers are torch CUDA tensors
  on
  a torch stream, so no second CUDA context is created (pitfall 4).

The bundle's image engine must have the wanted precision; otherwise `--trt-build DIR` builds
one into a scratch copy of the bundle with `segclip.export.build_engines` (build time reported
apart from latency). Engines from another TensorRT version or GPU are refused by the runtime
(pitfall 1). `tensorrt` and `torch` are imported here only, on use.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._towers import GPU_INSTALL, Runner, Unavailable, read_manifest
from segclip.runtime import contract


def _import() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise Unavailable(f"TensorRT is not installed ({e}); on an NVIDIA GPU machine: "
                          f"{GPU_INSTALL}") from e
    try:
        import torch
    except ImportError as e:
        raise Unavailable(f"the engine-only timing keeps its buffers in torch CUDA tensors: "
                          f"{e}") from e
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return trt, torch


class Engine:
    """One deserialised plan with its own execution context and torch stream."""

    def __init__(self, trt: Any, torch: Any, plan: Path) -> None:
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise Unavailable(f"TensorRT {trt.__version__} cannot deserialise {plan.name}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.buffers: dict[str, Any] = {}

    def _dtype(self, name: str) -> Any:
        return getattr(self.torch, np.dtype(self.trt.nptype(
            self.engine.get_tensor_dtype(name))).name)

    def prepare(self, name: str, array: np.ndarray) -> Callable[[], None]:
        """Copy `array` to the GPU once, bind it and fresh outputs; return the launcher."""
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if not int(low[0]) <= array.shape[0] <= int(high[0]):
            raise Unavailable(f"{array.shape[0]} is outside the engine's profile "
                              f"[{int(low[0])}, {int(high[0])}]; rebuild with "
                              f"segclip-export trt --batch MIN:OPT:MAX covering it")
        tensor = self.torch.from_numpy(array).to("cuda").to(self._dtype(name)).contiguous()
        self.context.set_input_shape(name, tuple(tensor.shape))
        self.context.set_tensor_address(name, tensor.data_ptr())
        self.buffers = {name: tensor}
        for output in self.outputs:
            shape = tuple(self.context.get_tensor_shape(output))
            buffer = self.torch.empty(shape, dtype=self._dtype(output), device="cuda")
            self.context.set_tensor_address(output, buffer.data_ptr())
            self.buffers[output] = buffer
        handle = self.stream.cuda_stream

        def run() -> None:
            if not self.context.execute_async_v3(handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        return run

    def sync(self) -> None:
        self.stream.synchronize()


def _image_entry(manifest: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in manifest.get("engines", []) if e.get("tower") == "image"), None)


def build_scratch_bundle(bundle: Path, scratch: Path, precision: str,
                         batches: tuple[int, int, int]) -> tuple[Path, float]:
    """A copy of `bundle` (graphs linked, manifest copied) with engines of `precision` built by
    `segclip.export.build_engines`; returns (its folder, build seconds)."""
    from segclip.export import build_engines
    from segclip.export.tensorrt_build import Profile

    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for item in bundle.iterdir():
        if item.name == contract.MANIFEST_FILE:
            manifest = read_manifest(bundle)
            manifest["engines"] = []
            (scratch / item.name).write_text(json.dumps(manifest, indent=1))
        elif item.suffix in (".onnx", ".json") and item.is_file():
            (scratch / item.name).symlink_to(item.resolve())
    start = time.perf_counter()
    build_engines(scratch, fp16=precision == "fp16", batch=Profile(*batches),
                  timing_cache=scratch / "timing.cache", progress=print)
    return scratch, time.perf_counter() - start


class TrtRunner(Runner):
    device = "cuda"

    def __init__(self, name: str, bundle: Path, build_into: Path | None,
                 batches: tuple[int, int, int], threads: int) -> None:
        super().__init__()
        trt, torch = _import()
        self.name, self.precision = name, name.split("-")[1]
        entry = _image_entry(read_manifest(bundle))
        self.info = {"precision": self.precision}
        if entry is None or entry.get("precision") != self.precision:
            have = f"a {entry.get('precision')} image engine" if entry else "no image engine"
            if build_into is None:
                flag = " --fp16" if self.precision == "fp16" else ""
                raise Unavailable(f"the bundle has {have}; build a {self.precision} one with "
                                  f"segclip-export trt DIR{flag} --batch 1:8:128, or pass "
                                  f"--trt-build")
            bundle, seconds = build_scratch_bundle(bundle, build_into / self.precision,
                                                   self.precision, batches)
            entry = _image_entry(read_manifest(bundle))
            self.info.update(built_here=str(bundle), build_seconds=round(seconds, 1))
        from segclip.runtime.backends import create_backend

        try:
            self.backend = create_backend(str(bundle), "cuda", threads=threads)
        except Exception as e:  # the runtime's own refusal (version/GPU mismatch, no GPU...)
            raise Unavailable(f"runtime TensorRT backend: {type(e).__name__}: {e}") from e
        if self.backend.name != "tensorrt":
            raise Unavailable(f"the runtime picked {self.backend.name}/{self.backend.provider} "
                              f"on cuda, not TensorRT")
        self.info.update(self.backend.info())
        self.info["timing"] = ("main: runtime backend run_image/run_text on host arrays; "
                               "engine_only: device-resident input, execute_async_v3 + sync")
        self.engine = Engine(trt, torch, bundle / entry["file"])

    def _check_batch(self, count: int) -> None:
        limit = self.backend.max_batch
        if limit is not None and count > limit:
            raise Unavailable(f"batch {count} exceeds the engine's profile maximum {limit}; "
                              f"rebuild with segclip-export trt --batch 1:8:{count}")

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        self._check_batch(images.shape[0])
        return lambda: self.backend.run_image(images)

    def image_engine_only(self, images: np.ndarray) -> Callable[[], Any]:
        return self.engine.prepare(contract.IMAGE_INPUT, images)

    def text(self, tokens: np.ndarray) -> Callable[[], Any]:
        return lambda: self.backend.run_text(tokens)

    def image_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        out = self.backend.run_image(images)
        return [out.global_, out.regions, out.assign]

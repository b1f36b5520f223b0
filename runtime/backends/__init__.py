"""Backend registry (docs/architecture.md "Layout and packages"): pick the engine that runs a
bundle.

`create_backend(bundle, device, variant)`:
- "cpu": ONNX Runtime on the CPU; OpenVINO for the variants "ov-f32", "ov-bf16", "ov-int8"
  (runtime/backends/openvino.py, imported only then); variant "auto": the fastest CPU variant
  whose parity passed, by a measured probe (runtime/backends/_auto.py).
- "cuda": TensorRT when the bundle has engines and tensorrt + cuda-python + a GPU are present,
  else ONNX Runtime's CUDA execution provider; neither -> `BackendUnavailableError`.
- "auto": TensorRT if possible, else ONNX Runtime CUDA if this onnxruntime has it, else CPU.
A TensorRT engine built by another TensorRT version or GPU is refused (`EngineError` with the
rebuild command) rather than skipped, in every mode. A path to `image.plan` asks for TensorRT
(and never falls back); a path to an `image*.onnx` asks for ONNX Runtime with that graph.
The TensorRT module (tensorrt, cuda-python) is imported only here, inside the function that
selects it (docs/architecture.md "Layout and packages").
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from segclip.runtime.backends._auto import choose_cpu_backend
from segclip.runtime.backends.base import Backend, ImageOutputs
from segclip.runtime.backends.onnxruntime import GPU_INSTALL, OnnxRuntimeBackend, cuda_available
from segclip.runtime.bundle import Bundle, EngineFacts
from segclip.runtime.devices import parse_device
from segclip.runtime.errors import BackendUnavailableError, EngineError
from segclip.runtime.variants import AUTO, VARIANTS, is_openvino

DEVICES = ("auto", "cpu", "cuda")

__all__ = ["DEVICES", "Backend", "ImageOutputs", "create_backend"]


def _engine_facts(device_id: int) -> EngineFacts | str:
    """This machine's TensorRT version and GPU, or why TensorRT cannot run here."""
    try:
        from segclip.runtime.backends import tensorrt as trt_backend
    except (ImportError, OSError) as e:  # OSError: a shared library of TensorRT/CUDA missing
        return f"TensorRT or cuda-python is not installed ({e})"
    try:
        return trt_backend.present_facts(device_id)
    except EngineError as e:
        return f"no usable CUDA GPU ({e})"


def _tensorrt(bundle: Bundle, device_id: int, threads: int | None, required: bool,
              ) -> Backend | str:
    """The TensorRT backend, or (when not `required`) the reason it cannot run here."""
    facts = _engine_facts(device_id)
    if isinstance(facts, str):
        if required:
            raise BackendUnavailableError(
                f"{bundle.engine('image').path.name} needs TensorRT on a CUDA GPU, but {facts}; "
                f"install {GPU_INSTALL} on a machine with an NVIDIA GPU, or pass the bundle "
                f"directory / image.onnx to run with ONNX Runtime")
        return facts
    for tower in bundle.engines:
        bundle.check_engine(tower, facts)  # refuse foreign engines before deserialising them
    from segclip.runtime.backends.tensorrt import TensorRTBackend

    text = None
    if "text" not in bundle.engines:
        device = "cuda" if cuda_available() else "cpu"
        text = OnnxRuntimeBackend(bundle, device, threads=threads, device_id=device_id,
                                  image=False)
    return TensorRTBackend(bundle, device_id=device_id, text_backend=text, facts=facts)


def create_backend(bundle: str | os.PathLike | Bundle, device: str = "auto",
                   variant: str | None = None, threads: int | None = None,
                   device_id: int = 0) -> Backend:
    """The backend that runs `bundle` on `device` (module docstring).

    Args:
        variant: image graph (runtime/variants.py): ONNX Runtime "fp32", "fp16", "int8";
            OpenVINO "ov-f32", "ov-bf16", "ov-int8" (CPU only); "auto": on the CPU the fastest
            variant whose parity passed (measured probe, runtime/backends/_auto.py), elsewhere
            the device's default. None: the file the bundle was opened through, else TensorRT's
            engine where it runs, else fp32. An explicit variant is run or refused, never
            swapped.
        threads: intra-op threads of ONNX Runtime / OpenVINO (None: their default).
    Raises:
        BackendUnavailableError: the device asked for cannot be used here (install command).
        EngineError: a TensorRT engine from another TensorRT/GPU, or a CUDA session that fell
            back to the CPU.
        BundleError: the bundle is broken or lacks the requested graph.
    """
    bundle = Bundle.open(bundle)
    spec = str(device).strip()
    device, index = parse_device(device)  # auto | cpu | cuda | cuda:N
    device_id = device_id if index is None else index
    requested = bundle.requested_engine
    variant = variant or bundle.requested_variant
    if variant is not None and variant not in VARIANTS:
        raise EngineError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if is_openvino(variant):
        return _openvino(bundle, device, variant, threads)
    auto, variant = variant == AUTO, None if variant == AUTO else variant
    if auto and device == "cpu":
        return choose_cpu_backend(bundle, threads)
    if requested == "tensorrt":
        if device == "cpu":
            raise BackendUnavailableError(
                f"{bundle.engine('image').path.name} is a TensorRT engine and runs on CUDA only; "
                f"pass the bundle directory or {bundle.root / 'image.onnx'} to run on the CPU")
        return _tensorrt(bundle, device_id, threads, required=True)
    if device == "cpu":
        return OnnxRuntimeBackend(bundle, "cpu", variant or "fp32", threads, device_id)
    reason = "the bundle has no TensorRT engines"
    if requested is None and variant is None and "image" in bundle.engines:
        backend = _tensorrt(bundle, device_id, threads, required=False)
        if not isinstance(backend, str):
            return backend
        reason = backend
    if device == "cuda":
        if not cuda_available():
            raise BackendUnavailableError(
                f"device {spec!r} is not available: TensorRT: {reason}; ONNX Runtime: this "
                f"onnxruntime has no CUDAExecutionProvider. On a machine with an NVIDIA GPU "
                f"install the GPU extra ({GPU_INSTALL}), or use device 'cpu'")
        return OnnxRuntimeBackend(bundle, "cuda", variant or "fp32", threads, device_id)
    if cuda_available():
        try:
            return OnnxRuntimeBackend(bundle, "cuda", variant or "fp32", threads, device_id)
        except (EngineError, BackendUnavailableError) as e:
            warnings.warn(f"device 'auto': ONNX Runtime CUDA is installed but unusable ({e}); "
                          f"running on the CPU", RuntimeWarning, stacklevel=2)
    if auto:
        return choose_cpu_backend(bundle, threads)
    return OnnxRuntimeBackend(bundle, "cpu", variant or "fp32", threads, device_id)


def _openvino(bundle: Bundle, device: str, variant: str, threads: int | None) -> Backend:
    """The OpenVINO CPU backend (imported here only: openvino is an optional extra)."""
    if device == "cuda":
        raise BackendUnavailableError(f"variant {variant} runs on the CPU (OpenVINO); use device "
                                      f"'cpu' or 'auto', or a TensorRT/ONNX Runtime variant on "
                                      f"cuda")
    from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

    return OpenVinoBackend(bundle, variant, OpenVinoOptions(threads=threads))


def backend_label(backend: Any) -> str:
    """Short description for tables and JSON: 'onnxruntime/CPUExecutionProvider'."""
    return f"{backend.name}/{backend.provider}"

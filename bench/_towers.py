"""Image- and text-tower runners per backend, for bench/latency.py.

Each runner prepares one case (`image(batch)`, `text(tokens)`) and returns a closure that runs it
once; `sync()` waits for the device. Inputs live where the backend reads them (device memory on
GPU, bound once: docs/runtime-practice.md pitfall 8, "host copies without IO binding"), and
a backend that is not there raises `Unavailable` with the reason, which the benchmark reports.

- torch / torch-cuda: PyTorch eager `encode_image` / `encode_text` under `inference_mode`.
- torch-bf16: the same with the model cast to bfloat16 (weights and activations; not autocast,
  which re-casts the weights on every call).
- ov-f32 / ov-bf16 / ov-int8: the runtime's OpenVINO backend (runtime/backends/openvino.py),
  1 stream, the benchmark's thread count.
- ort-cpu / ort-int8: ONNX Runtime CPUExecutionProvider on image.onnx / image.int8.onnx.
- ort-cuda: CUDAExecutionProvider with IO binding; refuses a session that fell back to the CPU.
- trt-fp16 / trt-fp32: the bundle's TensorRT engines (or ones built by `--trt-build`), run with
  the TensorRT 10 API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on torch CUDA
  buffers and a torch stream, so that no second CUDA context is created.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segclip.runtime import contract

GPU_INSTALL = "pip install 'segclip[gpu]'"
BACKENDS = ("torch", "torch-bf16", "torch-cuda", "ort-cpu", "ort-int8", "ort-cuda", "ov-f32",
            "ov-bf16", "ov-int8", "trt-fp16", "trt-fp32")
# the matmul peak of the precision each backend computes in (bench/_peak.py); the int8 graphs
# quantise the ViT blocks before the group (94 % of the vit-b16 FLOPs), the rest runs in fp32
PEAK_REFERENCE = {"torch": "cpu_fp32", "ort-cpu": "cpu_fp32", "ov-f32": "cpu_fp32",
                  "torch-bf16": "cpu_bf16", "ov-bf16": "cpu_bf16",
                  "ort-int8": "cpu_int8", "ov-int8": "cpu_int8",
                  "torch-cuda": "gpu_fp32", "ort-cuda": "gpu_tf32", "trt-fp32": "gpu_tf32",
                  "trt-fp16": "gpu_fp16"}


class Unavailable(Exception):
    """A backend or a case that cannot run here; the message is the reason reported."""


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / contract.MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a segclip bundle (no {contract.MANIFEST_FILE}); "
                                f"export one with segclip-export onnx CKPT --out {bundle}")
    return json.loads(path.read_text(encoding="utf-8"))


class Runner:
    """Base: a backend ready to run cases."""

    name = ""
    device = "cpu"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        raise Unavailable(f"{self.name} has no image tower")

    def text(self, tokens: np.ndarray) -> Callable[[], Any]:
        raise Unavailable(f"{self.name} has no text tower")

    def image_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        """(global, regions, assign) as float32 numpy arrays (for agreement checks)."""
        raise Unavailable(f"{self.name} cannot return outputs")

    def sync(self) -> None:
        pass


# ---- PyTorch eager ----------------------------------------------------------------------------
class TorchRunner(Runner):
    def __init__(self, model: Any, device: str, threads: int, bf16: bool = False) -> None:
        super().__init__()
        import torch

        self.torch = torch
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.device = device
        self.name = ("torch-bf16" if bf16 else "torch") if device == "cpu" else "torch-cuda"
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.info = {"engine": f"PyTorch eager, inference_mode, "
                               f"{'bfloat16 (model cast)' if bf16 else 'float32'}",
                     "torch_threads": torch.get_num_threads(),
                     "torch_interop_threads": torch.get_num_interop_threads()}
        if device == "cuda":
            self.info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        pixels = self.torch.from_numpy(images).to(self.device, self.dtype)

        def run() -> Any:
            with self.torch.inference_mode():
                return self.model.encode_image(pixels)
        return run

    def text(self, tokens: np.ndarray) -> Callable[[], Any]:
        ids = self.torch.from_numpy(tokens).to(self.device)

        def run() -> Any:
            with self.torch.inference_mode():
                return self.model.encode_text(ids)
        return run

    def image_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        out = self.image(images)()
        return [t.float().cpu().numpy() for t in
                (out.global_embedding, out.regions, out.assign)]

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def build_torch_model(checkpoint: Path | None, preset: str | None, seed: int = 0) -> Any:
    """The eager baseline: the checkpoint's model, or a preset with seeded random weights."""
    import torch

    if checkpoint is not None:
        from segclip.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint).eval()
    from segclip import ModelConfig, SegCLIP

    torch.manual_seed(seed)
    return SegCLIP(ModelConfig.preset(preset, with_reconstruction=False)).eval()


# ---- ONNX Runtime -----------------------------------------------------------------------------
def ort_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OrtRunner(Runner):
    def __init__(self, name: str, bundle: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        self.ort, self.name = ort, name
        files = read_manifest(bundle)["files"]
        key = {"ort-cpu": "image", "ort-int8": "image_int8", "ort-cuda": "image"}[name]
        if key not in files:
            raise Unavailable(f"the bundle has no {contract.IMAGE_INT8_ONNX} (re-export with "
                              f"segclip-export onnx CKPT --int8)")
        self.device = "cuda" if name == "ort-cuda" else "cpu"
        provider = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise Unavailable(f"onnxruntime {ort.__version__} has no {provider} (available: "
                              f"{', '.join(ort.get_available_providers())}); install "
                              f"onnxruntime-gpu on a CUDA machine: {GPU_INSTALL}")
        self.provider, self.threads = provider, threads
        self.session = self._session(bundle / files[key])
        self.text_session = (self._session(bundle / files["text"]) if name != "ort-int8"
                             else None)
        self.info = {"engine": f"onnxruntime {ort.__version__} {provider}",
                     "image_file": files[key], "providers": self.session.get_providers(),
                     "intra_op_threads": threads, "inter_op_threads": 1,
                     "graph_optimization": "ORT_ENABLE_ALL", "io_binding": self.device == "cuda"}

    def _session(self, path: Path) -> Any:
        session = self.ort.InferenceSession(str(path), ort_options(self.threads),
                                            providers=[self.provider])
        if session.get_providers()[0] != self.provider:  # pitfall 8: silent CPU fallback
            raise Unavailable(f"{path.name} fell back to {session.get_providers()[0]} instead of "
                              f"{self.provider}")
        return session

    def _closure(self, session: Any, name: str, array: np.ndarray) -> Callable[[], Any]:
        outputs = [o.name for o in session.get_outputs()]
        if self.device == "cpu":
            feed = {name: array}
            return lambda: session.run(outputs, feed)
        value = self.ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, value)
        for output in outputs:
            binding.bind_output(output, "cuda", 0)

        def run() -> Any:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return value  # keeps the device input alive with the closure
        return run

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        return self._closure(self.session, contract.IMAGE_INPUT, images)

    def text(self, tokens: np.ndarray) -> Callable[[], Any]:
        if self.text_session is None:
            raise Unavailable("the bundle has no int8 text graph (the text tower is exported in "
                              "fp32 only; see ort-cpu)")
        return self._closure(self.text_session, contract.TEXT_INPUT, tokens.astype(np.int64))

    def image_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(list(contract.IMAGE_OUTPUTS), {contract.IMAGE_INPUT: images})

    def text_outputs(self, tokens: np.ndarray) -> np.ndarray:
        session = self.text_session
        if session is None:
            raise Unavailable("no text session")
        return session.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens})[0]


# ---- OpenVINO ---------------------------------------------------------------------------------
class OvRunner(Runner):
    """The runtime's OpenVINO backend on one variant (compiled-model cache in a temp folder,
    removed with the runner or at exit)."""

    def __init__(self, name: str, bundle: Path, threads: int) -> None:
        super().__init__()
        self._cache = tempfile.TemporaryDirectory(prefix="segclip-ov-")
        cache_dir = self._cache.name
        try:
            from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions
            from segclip.runtime.bundle import Bundle
            from segclip.runtime.errors import RuntimeSegclipError

            self.backend = OpenVinoBackend(Bundle.open(bundle), name, OpenVinoOptions(
                threads=threads, streams=1, cache_dir=cache_dir))
        except (ImportError, RuntimeSegclipError) as e:  # not installed, no bf16, no IR
            raise Unavailable(str(e)) from e
        self.name = name
        self.info = {"engine": self.backend.provider, **self.backend.info()}

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        return lambda: self.backend.run_image(images)

    def text(self, tokens: np.ndarray) -> Callable[[], Any]:
        if self.name != "ov-f32":
            raise Unavailable(f"{self.name} runs the same f32 text graph as ov-f32")
        return lambda: self.backend.run_text(tokens)

    def image_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        out = self.backend.run_image(images)
        return [out.global_, out.regions, out.assign]

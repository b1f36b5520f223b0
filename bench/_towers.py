"""Image- and text-tower runners per backend, for bench/latency.py.

Each runner prepares one case (`image(batch)`, `text(tokens)`) and returns a closure that runs it
once; `sync()` waits for the device. Inputs live where the backend reads them (device memory on
GPU, bound once: reference/runtime-practice.md pitfall 8, "host copies without IO binding"), and
a backend that is not there raises `Unavailable` with the reason, which the benchmark reports.

- torch / torch-cuda: PyTorch eager `encode_image` / `encode_text` under `inference_mode`.
- ort-cpu / ort-int8: ONNX Runtime CPUExecutionProvider on image.onnx / image.int8.onnx.
- ort-cuda: CUDAExecutionProvider with IO binding; refuses a session that fell back to the CPU.
- trt-fp16 / trt-fp32: the bundle's TensorRT engines (or ones built by `--trt-build`), run with
  the TensorRT 10 API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on torch CUDA
  buffers and a torch stream, so that no second CUDA context is created.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segclip.runtime import contract

GPU_INSTALL = "pip install 'segclip[gpu]'"
BACKENDS = ("torch", "torch-cuda", "ort-cpu", "ort-int8", "ort-cuda", "trt-fp16", "trt-fp32")
# the matmul peak each backend's achieved FLOP/s is compared with (bench/_peak.py)
# (none for ort-int8: its VNNI products have their own ceiling, which is not measured)
PEAK_REFERENCE = {"torch": "cpu_fp32", "ort-cpu": "cpu_fp32",
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
    def __init__(self, model: Any, device: str, threads: int) -> None:
        super().__init__()
        import torch

        self.torch = torch
        if device == "cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        self.device = device
        self.name = "torch" if device == "cpu" else "torch-cuda"
        self.model = model.to(device).eval()
        self.info = {"engine": "PyTorch eager, inference_mode, float32",
                     "torch_threads": torch.get_num_threads(),
                     "torch_interop_threads": torch.get_num_interop_threads()}
        if device == "cuda":
            self.info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32

    def image(self, images: np.ndarray) -> Callable[[], Any]:
        pixels = self.torch.from_numpy(images).to(self.device)

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

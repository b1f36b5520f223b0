"""ONNX Runtime backend (docs/runtime-practice.md "ONNX Runtime"): CPU, or CUDA with IO binding.

The provider actually used is read back from each session and reported; when CUDA was asked for
and a session came up without the CUDA execution provider (missing CUDA libraries, driver
mismatch), construction fails with `EngineError` instead of running on the CPU unnoticed
(docs/runtime-practice.md feature 6, onnxruntime#23372). `variant` picks the image graph: fp32
`image.onnx`, fp16 `image.fp16.onnx` or int8 `image.int8.onnx` (dynamic int8, a CPU format).
`InferenceSession.run` is thread-safe, so one backend serves every thread.
Legend: B windows, S window side, T labels, C context length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from segclip.runtime import contract
from segclip.runtime.backends.base import (
    ImageOutputs,
    check_image_outputs,
    check_text_output,
)
from segclip.runtime.bundle import Bundle, TensorSpec
from segclip.runtime.errors import BackendUnavailableError, BundleError, EngineError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GPU_INSTALL = "pip install 'segclip[gpu]'"
TEXT_CHUNK = 256  # labels per text-graph call
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    return CUDA in ort.get_available_providers()


def _options(threads: int | None, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; a provider fallback is reported by us
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _session(path: Path, providers: list[Any], options: ort.SessionOptions,
             ) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... classes
        message = " ".join(str(e).split())
        raise BundleError(f"ONNX Runtime cannot load {path}: {message}; the file is damaged or "
                          f"not an ONNX graph, re-export with segclip-export onnx CKPT --out "
                          f"{path.parent}") from e


def _specs(args: list[Any]) -> list[TensorSpec]:
    return [TensorSpec(a.name, tuple(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args]


def graph_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the ONNX graph at `path`, read from an unoptimised CPU session."""
    session = _session(path, [CPU], _options(1, optimize=False))
    return _specs(session.get_inputs()), _specs(session.get_outputs())


class OnnxRuntimeBackend:
    """Both towers of a bundle in ONNX Runtime sessions on `device` ("cpu" or "cuda")."""

    name = "onnxruntime"
    max_batch = None

    def __init__(self, bundle: Bundle, device: str = "cpu", variant: str = "fp32",
                 threads: int | None = None, device_id: int = 0, image: bool = True) -> None:
        """Load the sessions (`image=False`: the text graph only, beside a TensorRT image
        engine) and check their providers and I/O against the bundle."""
        if device not in ("cpu", "cuda"):
            raise EngineError(f"unknown device {device!r} for ONNX Runtime; choose cpu or cuda")
        self.bundle, self.device, self.variant = bundle, device, variant
        self._device_id = device_id
        if device == "cuda":
            if not cuda_available():
                raise BackendUnavailableError(
                    f"device 'cuda' needs onnxruntime-gpu with {CUDA}, but this onnxruntime "
                    f"{ort.__version__} offers only {ort.get_available_providers()}; on a machine "
                    f"with an NVIDIA GPU install {GPU_INSTALL}, or use device 'cpu'")
            providers: list[Any] = [(CUDA, {"device_id": device_id}), CPU]
        else:
            providers = [CPU]
        options = _options(threads)
        text_path = bundle.files["text"]
        image_path = bundle.image_onnx(variant) if image else None
        self._image = _session(image_path, providers, options) if image_path else None
        self._text = _session(text_path, providers, options)
        for path, session in ((image_path, self._image), (text_path, self._text)):
            if session is not None:
                self._check_provider(path, session)
                bundle.check_io(path.name, _specs(session.get_inputs()),
                                _specs(session.get_outputs()))
        self.provider = self._text.get_providers()[0]
        self._image_file = image_path.name if image_path else None
        self._text_file = text_path.name
        self._token_dtype = (np.int32 if self._text.get_inputs()[0].type == "tensor(int32)"
                             else np.int64)

    def _check_provider(self, path: Path, session: ort.InferenceSession) -> None:
        used = session.get_providers()
        if self.device == "cuda" and (not used or used[0] != CUDA):
            raise EngineError(
                f"ONNX Runtime was asked to run {path.name} on CUDA but the session came up with "
                f"{used}: the CUDA execution provider failed to load (CUDA/cuDNN libraries or "
                f"driver missing or mismatched with onnxruntime-gpu {ort.__version__}). Fix the "
                f"CUDA install ({GPU_INSTALL}) or use device 'cpu'; refusing to fall back to the "
                f"CPU silently")

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
             outputs: list[str]) -> list[np.ndarray]:
        if self.device == "cpu":
            return session.run(outputs, feeds)
        binding = session.io_binding()  # one per call: bindings are not shared across threads
        values = {name: ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id)
                  for name, array in feeds.items()}  # kept alive until the run ends
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, "cuda", self._device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_image(self, batch: np.ndarray) -> ImageOutputs:
        if self._image is None:
            raise EngineError("this ONNX Runtime backend was loaded for the text graph only")
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # (B, 3, S, S)
        glob, regions, assign = self._run(self._image, {contract.IMAGE_INPUT: batch},
                                          list(contract.IMAGE_OUTPUTS))
        outputs = ImageOutputs(np.asarray(glob, np.float32), np.asarray(regions, np.float32),
                               np.asarray(assign, np.float32))
        return check_image_outputs(outputs, batch.shape[0], self._image_file)

    def run_patches(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) windows -> (B, N, D) patch embeddings: the image graph of a bundle of
        kind "dense" (docs/dense.md)."""
        if self._image is None:
            raise EngineError("this ONNX Runtime backend was loaded for the text graph only")
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # (B, 3, S, S)
        (patches,) = self._run(self._image, {contract.IMAGE_INPUT: batch},
                               [contract.PATCH_OUTPUT])
        patches = np.asarray(patches, np.float32)
        want = (batch.shape[0], self.bundle.grid_size ** 2, self.bundle.embed_dim)
        if patches.shape != want or not np.isfinite(patches).all():
            raise EngineError(f"{self._image_file} returned patch embeddings {patches.shape} for "
                              f"a batch of {batch.shape[0]} (expected {want}, finite); "
                              f"re-export the bundle")
        return patches

    def run_text(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=self._token_dtype)  # (T, C)
        parts = []  # in chunks: activations grow with T (10,000 labels at once take GBs)
        for start in range(0, tokens.shape[0], TEXT_CHUNK):
            feeds = {contract.TEXT_INPUT: tokens[start:start + TEXT_CHUNK]}  # (<= chunk, C)
            (text,) = self._run(self._text, feeds, [contract.TEXT_OUTPUT])
            parts.append(np.asarray(text, np.float32))
        text = (np.concatenate(parts) if parts
                else np.zeros((0, self.bundle.embed_dim), np.float32))  # (T, D)
        return check_text_output(text, tokens.shape[0], self.bundle.embed_dim, self._text_file)

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "provider": self.provider,
                "image": self._image_file, "text": self._text_file, "variant": self.variant,
                "onnxruntime": ort.__version__}

    def close(self) -> None:
        self._image = self._text = None

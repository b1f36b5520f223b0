"""OpenVINO CPU backend (docs/architecture.md "Backends"; docs/openvino.md): the bundle's graphs
compiled with an explicit inference precision.

Variants (runtime/variants.py): "ov-f32" and "ov-bf16" compile `image.onnx` with
`INFERENCE_PRECISION_HINT` f32 / bf16 (OpenVINO picks bf16 by itself on CPUs that have it, so
the precision is always passed); "ov-int8" compiles the NNCF-quantised IR `image.ov-int8.xml`
(its quantised nodes run int8, the rest bf16 where the CPU has bf16, else f32). The text graph
always runs in f32: it runs once per label set and its embeddings are cached. ov-bf16 is
refused on a CPU whose OpenVINO `OPTIMIZATION_CAPABILITIES` lack BF16.

Compiled models are cached on disk (OpenVINO `CACHE_DIR`, one folder per bundle manifest and
variant, so a re-exported bundle never meets a stale blob, nor a variant another's); a restart
loads the blob instead of recompiling (`info()["loaded_from_cache"]`). Threads
(`INFERENCE_NUM_THREADS`) and streams (`NUM_STREAMS`) are configurable. Thread-safe: every
calling thread gets its own `InferRequest` of the shared compiled model.
openvino is imported only in this module.
Legend: B windows, S window side, T labels, C context length.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segclip.runtime import contract
from segclip.runtime.backends.base import ImageOutputs, check_image_outputs, check_text_output
from segclip.runtime.bundle import Bundle, TensorSpec
from segclip.runtime.errors import BackendUnavailableError, BundleError, EngineError
from segclip.runtime.variants import (
    OPENVINO_PRECISION,
    OPENVINO_VARIANTS,
    OV_INT8_KEY,
)

OPENVINO_INSTALL = "pip install 'segclip[openvino]'"
DEVICE = "CPU"
TEXT_CHUNK = 256  # labels per text-graph call


def import_openvino() -> Any:
    """`openvino`, or a BackendUnavailableError with the install command."""
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"OpenVINO is not installed ({e}); install it with "
                                      f"{OPENVINO_INSTALL}") from e
    return openvino


def default_cache_dir() -> Path:
    """$SEGCLIP_CACHE_DIR/openvino, else $XDG_CACHE_HOME/segclip/openvino (~/.cache)."""
    base = os.environ.get("SEGCLIP_CACHE_DIR")
    if base:
        return Path(base) / "openvino"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "segclip" / "openvino"


def cpu_capabilities(core: Any | None = None) -> tuple[str, tuple[str, ...]]:
    """(CPU name, OpenVINO OPTIMIZATION_CAPABILITIES) of this machine."""
    core = core or import_openvino().Core()
    return (str(core.get_property(DEVICE, "FULL_DEVICE_NAME")),
            tuple(str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")))


def inference_precision(variant: str, capabilities: tuple[str, ...]) -> str:
    """The INFERENCE_PRECISION_HINT `variant` compiles with on this CPU (runtime/variants.py)."""
    precision = OPENVINO_PRECISION[variant]
    if variant == "ov-int8" and "BF16" not in capabilities:
        return "f32"  # the unquantised nodes; bf16 would be emulated, not faster
    return precision


def unsupported_reason(variant: str, capabilities: tuple[str, ...], cpu: str) -> str | None:
    """Why `variant` cannot run on this CPU, or None."""
    if variant == "ov-bf16" and "BF16" not in capabilities:
        return (f"variant ov-bf16 needs a CPU with bf16 support (AVX-512 BF16 or AMX), but "
                f"OpenVINO reports {cpu!r} with capabilities {', '.join(capabilities)}; use "
                f"ov-f32 or ov-int8")
    return None


@dataclass(frozen=True)
class OpenVinoOptions:
    """How the CPU plugin runs the graphs."""

    threads: int | None = None  # INFERENCE_NUM_THREADS (None: OpenVINO's default, all cores)
    streams: int = 1  # NUM_STREAMS: parallel inference streams (1: lowest latency per call)
    cache_dir: str | os.PathLike | None = None  # compiled-model cache (None: default_cache_dir)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise EngineError(f"OpenVINO threads must be >= 1, got {self.threads}")
        if self.streams < 1:
            raise EngineError(f"OpenVINO streams must be >= 1, got {self.streams}")


def _specs(ports: Any) -> list[TensorSpec]:
    out = []
    for port in ports:
        shape = tuple(-1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
        out.append(TensorSpec(port.get_any_name(), shape,
                              np.dtype(port.get_element_type().to_dtype()).name))
    return out


class OpenVinoBackend:
    """Both towers of a bundle compiled by OpenVINO for the CPU (module docstring)."""

    name = "openvino"
    device = "cpu"
    max_batch = None

    def __init__(self, bundle: Bundle, variant: str = "ov-f32",
                 options: OpenVinoOptions | None = None) -> None:
        if variant not in OPENVINO_VARIANTS:
            raise EngineError(f"unknown OpenVINO variant {variant!r}; choose one of "
                              f"{', '.join(OPENVINO_VARIANTS)}")
        ov = import_openvino()
        self.bundle, self.variant, self.options = bundle, variant, options or OpenVinoOptions()
        self._core = ov.Core()
        self.cpu, self.capabilities = cpu_capabilities(self._core)
        reason = unsupported_reason(variant, self.capabilities, self.cpu)
        if reason:
            raise BackendUnavailableError(reason)
        # one folder per bundle manifest and variant: OpenVINO's cache key leaves out
        # INFERENCE_PRECISION_HINT, so in a shared folder ov-f32 loaded ov-bf16's blob (and
        # ov-bf16 loaded ov-f32's, giving NaN) on a Xeon with AMX (docs/openvino.md "Variants")
        self.cache_dir = (Path(self.options.cache_dir or default_cache_dir())
                          / bundle.manifest_sha256[:16] / variant)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(f"cannot create the OpenVINO cache folder {self.cache_dir}: {e}; "
                              f"pass another cache_dir") from e
        self._core.set_property({"CACHE_DIR": str(self.cache_dir)})
        image_path = self._image_path()
        self._image = self._compile(image_path, inference_precision(variant, self.capabilities))
        self._text = self._compile(bundle.files["text"], "f32")
        self._image_file, self._text_file = image_path.name, bundle.files["text"].name
        for source, compiled in ((self._image_file, self._image), (self._text_file, self._text)):
            bundle.check_io(source, _specs(compiled.inputs), _specs(compiled.outputs))
        self.precision = self._image.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.loaded_from_cache = bool(self._image.get_property("LOADED_FROM_CACHE"))
        self.provider = f"OpenVINO {ov.get_version().split('-')[0]} CPU {variant[3:]}"
        self._token_dtype = self._text.inputs[0].get_element_type().to_dtype()
        self._local = threading.local()

    def _image_path(self) -> Path:
        if self.variant != "ov-int8":
            return self.bundle.image_onnx("fp32")
        path = self.bundle.files.get(OV_INT8_KEY)
        if path is None:
            raise BundleError(f"{self.bundle.root} has no OpenVINO int8 image graph (files."
                              f"{OV_INT8_KEY} is not in {contract.MANIFEST_FILE}); write it with "
                              f"segclip-export openvino {self.bundle.root} CKPT --int8")
        return path

    def _compile(self, path: Path, precision: str) -> Any:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision,
                                  "PERFORMANCE_HINT": "LATENCY",
                                  "NUM_STREAMS": self.options.streams}
        if self.options.threads:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        try:
            return self._core.compile_model(str(path), DEVICE, config)
        except RuntimeError as e:  # OpenVINO raises RuntimeError for unreadable models
            first = " ".join(str(e).split())[:300]
            raise BundleError(f"OpenVINO cannot compile {path}: {first}; the file is damaged or "
                              f"not a graph, re-export the bundle") from e

    def _requests(self) -> tuple[Any, Any]:
        """This thread's (image, text) InferRequests (requests are not shared across threads)."""
        pair = getattr(self._local, "requests", None)
        if pair is None:
            if self._image is None:
                raise EngineError("this OpenVINO backend is closed")
            pair = (self._image.create_infer_request(), self._text.create_infer_request())
            self._local.requests = pair
        return pair

    def run_image(self, batch: np.ndarray) -> ImageOutputs:
        batch = np.ascontiguousarray(batch, dtype=np.float32)  # (B, 3, S, S)
        request = self._requests()[0]
        request.infer({contract.IMAGE_INPUT: batch})
        glob, regions, assign = (np.array(request.get_tensor(name).data, np.float32, copy=True)
                                 for name in contract.IMAGE_OUTPUTS)  # own copies: reused buffers
        return check_image_outputs(ImageOutputs(glob, regions, assign), batch.shape[0],
                                   self._image_file)

    def run_text(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=self._token_dtype)  # (T, C)
        request, parts = self._requests()[1], []
        for start in range(0, tokens.shape[0], TEXT_CHUNK):
            request.infer({contract.TEXT_INPUT: tokens[start:start + TEXT_CHUNK]})
            parts.append(np.array(request.get_tensor(contract.TEXT_OUTPUT).data, np.float32,
                                  copy=True))
        text = (np.concatenate(parts) if parts
                else np.zeros((0, self.bundle.embed_dim), np.float32))  # (T, D)
        return check_text_output(text, tokens.shape[0], self.bundle.embed_dim, self._text_file)

    def info(self) -> dict[str, Any]:
        image = self._image
        threads = image.get_property("INFERENCE_NUM_THREADS") if image else None
        streams = image.get_property("NUM_STREAMS") if image else None
        return {"backend": self.name, "device": self.device, "provider": self.provider,
                "variant": self.variant, "precision": self.precision,
                "image": self._image_file, "text": self._text_file,
                "text_precision": "f32", "cpu": self.cpu,
                "capabilities": list(self.capabilities), "threads": threads,
                "streams": None if streams is None else int(streams),
                "requested": {"threads": self.options.threads, "streams": self.options.streams},
                "cache_dir": str(self.cache_dir), "loaded_from_cache": self.loaded_from_cache}

    def close(self) -> None:
        self._image = self._text = None
        self._local = threading.local()

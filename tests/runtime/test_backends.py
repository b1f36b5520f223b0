"""segclip.runtime.backends: the registry's choices, ONNX Runtime provider reporting, and loud
failures where a device cannot be used (CPU-only machine: CUDA and TensorRT are unavailable)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from segclip.errors import SegclipError
from segclip.runtime import backends
from segclip.runtime.backends import create_backend
from segclip.runtime.backends.base import ImageOutputs, check_image_outputs
from segclip.runtime.backends.onnxruntime import OnnxRuntimeBackend
from segclip.runtime.bundle import Bundle, EngineFacts
from segclip.runtime.errors import BackendUnavailableError, EngineError, NonFiniteOutputError

PRESENT = EngineFacts(tensorrt="10.9.0.34", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


def with_engines(source: Path, tmp_path: Path, **facts: Any) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(source, root)
    manifest = json.loads((root / "segclip.json").read_text())
    for tower in ("image", "text"):
        (root / f"{tower}.plan").write_bytes(b"fake plan")
        entry = {"tower": tower, "file": f"{tower}.plan", "precision": "fp32",
                 "tensorrt": PRESENT.tensorrt, "gpu": PRESENT.gpu,
                 "compute_capability": PRESENT.compute_capability,
                 "profile": {"input": "x", "min": 1, "opt": 4, "max": 16}}
        entry.update(facts)
        manifest["engines"].append(entry)
    (root / "segclip.json").write_text(json.dumps(manifest))
    return root


def test_cpu_backend_reports_its_provider(tiny_bundle: Path) -> None:
    backend = create_backend(tiny_bundle, "cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert (backend.name, backend.device, backend.provider) == (
        "onnxruntime", "cpu", "CPUExecutionProvider")
    info = backend.info()
    assert info["image"] == "image.onnx" and info["text"] == "text.onnx"
    assert info["provider"] == "CPUExecutionProvider" and info["variant"] == "fp32"


def test_outputs_follow_the_contract(tiny_bundle: Path) -> None:
    backend = create_backend(tiny_bundle, "cpu")
    windows = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    out = backend.run_image(windows)
    assert out.global_.shape == (3, 64) and out.regions.shape == (3, 8, 64)
    assert out.assign.shape == (3, 8, 8, 8)
    np.testing.assert_allclose(np.linalg.norm(out.regions, axis=-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(out.assign.sum(axis=1), 1.0, atol=1e-4)  # softmax over regions
    tokens = np.zeros((2, 77), np.int64)
    tokens[:, 0], tokens[:, 1] = 49406, 49407
    text = backend.run_text(tokens)
    assert text.shape == (2, 64) and text.dtype == np.float32


@pytest.mark.parametrize("field", ["global_", "regions", "assign"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image_outputs_are_refused(field: str, bad: float) -> None:
    """A NaN would otherwise become a label map of arbitrary labels."""
    arrays = {"global_": np.zeros((2, 4), np.float32), "regions": np.zeros((2, 3, 4), np.float32),
              "assign": np.full((2, 3, 5, 5), 1 / 3, np.float32)}
    assert check_image_outputs(ImageOutputs(**arrays), 2, "image.onnx").regions.shape == (2, 3, 4)
    arrays[field][1, 0, ...] = bad
    name = field.rstrip("_")
    with pytest.raises(NonFiniteOutputError, match=f"image.onnx returned non-finite {name} "):
        check_image_outputs(ImageOutputs(**arrays), 2, "image.onnx")


@pytest.mark.parametrize("how", ["variant", "path"])
def test_fp16_variant_is_selected(tiny_bundle: Path, how: str) -> None:
    if how == "variant":
        backend = create_backend(tiny_bundle, "cpu", variant="fp16")
    else:
        backend = create_backend(tiny_bundle / "image.fp16.onnx", "cpu")
    assert backend.info()["image"] == "image.fp16.onnx" and backend.info()["variant"] == "fp16"


def test_auto_on_a_cpu_machine_is_onnxruntime_cpu(tiny_bundle: Path, tmp_path: Path) -> None:
    if not CPU_ONLY:
        pytest.skip("this onnxruntime has CUDA")
    assert create_backend(tiny_bundle, "auto").provider == "CPUExecutionProvider"
    # engines in the bundle but no TensorRT here: auto runs the ONNX graphs
    root = with_engines(tiny_bundle, tmp_path)
    monkey_facts = backends._engine_facts(0)
    assert isinstance(monkey_facts, str)  # why TensorRT cannot run on this machine
    assert create_backend(root, "auto").name == "onnxruntime"


@pytest.mark.skipif(not CPU_ONLY, reason="this onnxruntime has CUDA")
def test_cuda_on_a_cpu_machine_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"device 'cuda' is not available: "
                                                      r".*no CUDAExecutionProvider.*"
                                                      r"pip install 'segclip\[gpu\]'"):
        create_backend(tiny_bundle, "cuda")
    with pytest.raises(BackendUnavailableError, match=r"onnxruntime-gpu"):
        OnnxRuntimeBackend(Bundle.open(tiny_bundle), "cuda")


def test_plan_path_needs_tensorrt(tiny_bundle: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = with_engines(tiny_bundle, tmp_path)
    with pytest.raises(BackendUnavailableError, match=r"image\.plan is a TensorRT engine and "
                                                      r"runs on CUDA only"):
        create_backend(root / "image.plan", "cpu")
    monkeypatch.setattr(backends, "_engine_facts", lambda device_id: "no TensorRT here")
    with pytest.raises(BackendUnavailableError, match=r"image\.plan needs TensorRT on a CUDA GPU, "
                                                      r"but no TensorRT here"):
        create_backend(root / "image.plan", "auto")


@pytest.mark.parametrize("device", ["auto", "cuda"])
@pytest.mark.parametrize("field, recorded", [("tensorrt", "10.3.0.26"),
                                             ("gpu", "NVIDIA A100-SXM4-80GB")])
def test_foreign_engine_is_refused_with_the_rebuild_command(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str,
        field: str, recorded: str) -> None:
    root = with_engines(tiny_bundle, tmp_path, **{field: recorded})
    monkeypatch.setattr(backends, "_engine_facts", lambda device_id: PRESENT)  # "present" facts
    with pytest.raises(EngineError, match=rf"built for .*{recorded}.*Rebuild on this machine "
                                          rf"with segclip-export trt .*bundle"):
        create_backend(root, device)


def test_unknown_device(tiny_bundle: Path) -> None:
    with pytest.raises(EngineError, match=r"unknown device 'gpu'; choose one of auto, cpu, cuda"):
        create_backend(tiny_bundle, "gpu")


def test_cuda_session_falling_back_to_cpu_is_an_error(tiny_bundle: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA request whose session comes up on the CPU (CUDA EP failed to load) fails loudly."""
    from segclip.runtime.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    real = ort.InferenceSession

    def session(path: str, sess_options: Any = None, providers: Any = None) -> Any:
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort_backend.ort, "InferenceSession", session)
    with pytest.raises(EngineError, match=r"asked to run image\.onnx on CUDA but the session came "
                                          r"up with \['CPUExecutionProvider'\].*refusing to fall "
                                          r"back to the CPU silently"):
        create_backend(tiny_bundle, "cuda")
    with warnings.catch_warnings(record=True) as caught:  # auto: falls back, with a warning
        warnings.simplefilter("always")
        backend = create_backend(tiny_bundle, "auto")
    assert backend.provider == "CPUExecutionProvider"
    assert any("running on the CPU" in str(w.message) for w in caught)


def test_corrupt_graph_is_a_bundle_error(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "segclip.json").read_text())
    manifest["file_bytes"].pop("image.onnx")
    (root / "segclip.json").write_text(json.dumps(manifest))
    (root / "image.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(SegclipError, match=r"ONNX Runtime cannot load .*image\.onnx.*re-export"):
        create_backend(root, "cpu")


def test_io_binding_path_equals_a_plain_run(tiny_bundle: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch of the ONNX Runtime backend (OrtValue inputs, outputs bound by device,
    `run_with_iobinding`, `copy_outputs_to_cpu`) against the real onnxruntime, with device "cuda"
    mapped to "cpu": the same values as `session.run`, outputs in the requested order."""
    plain, bound = create_backend(tiny_bundle, "cpu"), create_backend(tiny_bundle, "cpu")
    bound.device = "cuda"  # take the IO-binding branch
    devices: list[str] = []
    real_value, real_bind = ort.OrtValue.ortvalue_from_numpy, ort.IOBinding.bind_output

    def value(array: np.ndarray, device_type: str = "cpu", device_id: int = 0) -> Any:
        devices.append(device_type)
        return real_value(array, "cpu", device_id)

    def bind_output(self: Any, name: str, device_type: str = "cpu", device_id: int = 0) -> Any:
        devices.append(device_type)
        return real_bind(self, name, "cpu", device_id)

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(value))
    monkeypatch.setattr(ort.IOBinding, "bind_output", bind_output)
    windows = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    got, want = bound.run_image(windows), plain.run_image(windows)
    for name in ("global_", "regions", "assign"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    tokens = np.zeros((3, 77), np.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, [320, 321, 322], 49407
    np.testing.assert_array_equal(bound.run_text(tokens), plain.run_text(tokens))
    assert devices and set(devices) == {"cuda"}

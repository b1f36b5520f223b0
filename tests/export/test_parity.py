"""The parity check (ONNX Runtime CPU vs PyTorch eager): thresholds, failure reporting, inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segclip.export import ExportError, ParityError, export_model
from segclip.export.bundle import verify_bundle
from segclip.export.parity import (
    FP32_MAX_ABS,
    FP32_MIN_AGREEMENT,
    REDUCED_MIN_AGREEMENT,
    ImageParity,
    max_abs_diff,
    measure_parity,
    random_images,
    region_argmax,
    require_parity,
    synthetic_images,
)
from segclip.runtime import contract


def test_recorded_parity_is_within_thresholds(manifest: dict[str, Any]) -> None:
    parity = manifest["parity"]
    assert parity["passed"] and parity["failures"] == []
    assert parity["image_cases"] == ["random x1", "random x3", "synthetic x1", "synthetic x3"]
    by_precision = {item["precision"]: item for item in parity["image"]}
    fp32, fp16 = by_precision["fp32"], by_precision["fp16"]
    assert fp32["file"] == contract.IMAGE_ONNX and fp16["file"] == contract.IMAGE_FP16_ONNX
    assert set(fp32["max_abs"]) == set(contract.IMAGE_OUTPUTS)
    assert max(fp32["max_abs"].values()) <= FP32_MAX_ABS
    assert fp32["argmax_agreement"] >= FP32_MIN_AGREEMENT
    assert fp16["argmax_agreement"] >= REDUCED_MIN_AGREEMENT
    assert fp16["max_abs_limit"] is None  # fp16 values are reported, not bounded
    assert 0 < max(fp16["max_abs"].values()) < 0.5  # really fp16 arithmetic, still close
    assert parity["text_max_abs"] <= FP32_MAX_ABS


def test_verify_bundle_passes_and_is_read_only(bundle: Path, tiny_checkpoint: Path) -> None:
    before = (bundle / contract.MANIFEST_FILE).read_bytes()
    report = verify_bundle(bundle, tiny_checkpoint)
    assert report.passed
    assert [item.file for item in report.image] == [contract.IMAGE_ONNX,
                                                    contract.IMAGE_FP16_ONNX]
    assert (bundle / contract.MANIFEST_FILE).read_bytes() == before


def test_verify_refuses_another_checkpoint(bundle: Path, tmp_path: Path,
                                           tiny_checkpoint: Path) -> None:
    other = tmp_path / "other.pt"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["meta"] = {"note": "different file"}
    torch.save(payload, other)
    with pytest.raises(ExportError, match="exported from a checkpoint with sha256"):
        verify_bundle(bundle, other)


def test_mismatching_model_fails_with_the_numbers(bundle: Path, checkpoint_model: Any) -> None:
    model = copy.deepcopy(checkpoint_model)
    with torch.no_grad():
        noise = torch.randn(model.visual.proj.shape, generator=torch.Generator().manual_seed(1))
        model.visual.proj.add_(0.1 * noise)  # changes global/regions, not the assignment
    report = measure_parity(model, bundle, {"fp32": contract.IMAGE_ONNX})
    assert not report.passed
    assert any("image.onnx global max|diff|" in f for f in report.failures)
    assert not any("assign" in f for f in report.failures)
    with pytest.raises(ParityError, match=r"regions max\|diff\| \d\.\d\de-\d\d > 1e-04"):
        require_parity(report)


def test_int8_variant_is_verified_against_its_threshold(checkpoint_model: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 graph is held to its bar. Random weights give near-tied assignments, so int8
    agreement sits around the real 99% bar (tiny 98.6-99.3%, vit-b16 98.65% with the group and
    later blocks in float32; the trained demo model's pass is in test_precision.py). Here the bar is
    set to 100% (int8 never reaches it: robust to other weights), then lowered to exercise the
    graph and its recorded figures."""
    monkeypatch.setattr("segclip.export.parity.REDUCED_MIN_AGREEMENT", 1.0)
    with pytest.raises(ParityError, match=r"image.int8.onnx region-argmax agreement [\d.]+% < "
                                          r"100.0% \(the fp32 graphs pass: export without "
                                          r"--int8 to keep them\)"):
        export_model(checkpoint_model, tmp_path / "strict", int8=True)
    assert not (tmp_path / "strict").exists()

    monkeypatch.setattr("segclip.export.parity.REDUCED_MIN_AGREEMENT", 0.5)
    out = export_model(checkpoint_model, tmp_path / "bundle", int8=True)
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    assert manifest["files"]["image_int8"] == contract.IMAGE_INT8_ONNX
    int8 = [i for i in manifest["parity"]["image"] if i["precision"] == "int8"][0]
    assert 0.5 <= int8["argmax_agreement"] < 1.0 and int8["max_abs_limit"] is None
    import onnx
    import onnxruntime as ort

    ops = {n.op_type for n in onnx.load(str(out / contract.IMAGE_INT8_ONNX)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    session = ort.InferenceSession(str(out / contract.IMAGE_INT8_ONNX),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        outputs = session.run(None, {contract.IMAGE_INPUT: random_images(batch, 64)})
        assert outputs[2].shape == (batch, 8, 8, 8)


def test_synthetic_images_look_like_shapes() -> None:
    a, b = synthetic_images(3, 64, seed=1), synthetic_images(3, 64, seed=1)
    assert a.shape == (3, 3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthetic_images(3, 64, seed=2))
    mean = np.asarray(contract.CLIP_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(contract.CLIP_STD, np.float32).reshape(1, 3, 1, 1)
    pixels = a * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # smooth: neighbouring pixels are close far more often than in noise
    step = np.abs(np.diff(pixels, axis=-1))
    assert np.median(step) < 0.05
    assert len(np.unique(np.round(pixels[0, 0], 1))) > 3  # several colours


def test_region_argmax_upsamples_bilinearly() -> None:
    assign = np.zeros((1, 2, 2, 2), np.float32)  # (B, L, h, w)
    assign[0, 0, :, 0] = 1.0  # region 0 on the left column
    assign[0, 1, :, 1] = 1.0  # region 1 on the right column
    labels = region_argmax(assign, 8)  # (B, S, S)
    assert labels.shape == (1, 8, 8)
    assert (labels[0, :, :4] == 0).all() and (labels[0, :, 4:] == 1).all()


def test_non_finite_outputs_fail_parity_by_name() -> None:
    """A NaN never passes as a small difference (`max(0.0, nan)` is 0.0 in Python)."""
    want = np.zeros((2, 3), np.float32)
    assert max_abs_diff(want + 0.5, want) == 0.5
    for bad in (np.nan, np.inf, -np.inf):
        got = want.copy()
        got[1, 2] = bad
        assert max_abs_diff(got, want) == np.inf
    for limit in (FP32_MAX_ABS, None):
        item = ImageParity(file="image.onnx", precision="bf16",
                           max_abs={"global": 0.0, "regions": np.inf, "assign": 0.0},
                           argmax_agreement=1.0, min_agreement=REDUCED_MIN_AGREEMENT,
                           max_abs_limit=limit)
        assert item.failures == ["image.onnx regions has non-finite values (NaN or inf)"]


def test_a_variant_that_returns_nan_is_recorded_as_failed() -> None:
    """The OpenVINO parity run records a backend's non-finite refusal as a failed variant."""
    from segclip.export.openvino_parity import image_parity
    from segclip.runtime.errors import NonFiniteOutputError

    cases = [random_images(1, 32, seed=0)]
    assign = np.full((1, 2, 4, 4), 0.5, np.float32)
    references = [(np.ones((1, 4), np.float32), np.ones((1, 2, 4), np.float32), assign)]

    def broken(images: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NonFiniteOutputError("image.onnx returned non-finite global values")

    item = image_parity(broken, "image.onnx", "ov-bf16", cases, references, 32)
    assert item.argmax_agreement == 0.0 and set(item.max_abs.values()) == {np.inf}
    assert "image.onnx global has non-finite values (NaN or inf)" in item.failures
    fine = image_parity(lambda images: references[0], "image.onnx", "ov-bf16", cases,
                        references, 32)
    assert fine.failures == [] and fine.argmax_agreement == 1.0

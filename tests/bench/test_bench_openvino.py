"""bench/latency.py with the OpenVINO variants and torch-bf16, interleaved with ONNX Runtime fp32:
each backend measured (or skipped with its reason), the bf16/int8 matmul peaks measured in the
same run, and every backend's roofline taken against the peak of its own precision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _bench_helpers import QUICK, run_script

pytest.importorskip("openvino")

from bench import _summary  # noqa: E402

pytestmark = pytest.mark.openvino  # run in their own process by `make test`

BACKENDS = ["ort-cpu", "torch-bf16", "ov-f32", "ov-bf16", "ov-int8"]


@pytest.fixture(scope="module")
def ov_run(bench_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("latency-ov") / "latency.json"
    with pytest.MonkeyPatch.context() as patch:  # the e2e Segmenter's compile cache
        patch.setenv("SEGCLIP_CACHE_DIR", str(out.parent / "cache"))
        run_script("latency.py", "--bundle", str(bench_bundle), "--checkpoint",
                   str(bench_bundle.parent / "ckpt.pt"), "--backends", ",".join(BACKENDS),
                   "--batch", "1", "--labels", "1", "--e2e", "cpu:ov-f32", "--e2e-size",
                   "70x90", "--peak-size", "128", "--interleave", "--no-isolate", "--out",
                   str(out), *QUICK)
    assert list((out.parent / "cache" / "openvino").iterdir()), "cache not used"
    return json.loads(out.read_text())


def test_low_precision_peaks_are_measured_in_the_same_run(ov_run: dict[str, Any]) -> None:
    start = ov_run["peak"]["start"]
    assert start["cpu_bf16"]["dtype"] == "bfloat16" and start["cpu_bf16"]["median_gflops"] > 0
    assert start["cpu_int8"]["median_gflops"] > 0 and start["cpu_int8"]["threads"] == 1
    assert {"cpu_fp32", "cpu_bf16", "cpu_int8"} <= set(ov_run["peaks_gflops"])


def test_each_backend_is_measured_against_its_own_precision(ov_run: dict[str, Any]) -> None:
    from segclip.runtime.backends.openvino import cpu_capabilities

    by_name = {b["backend"]: b for b in ov_run["backends"]}
    assert list(by_name) == BACKENDS
    int8 = by_name["ov-int8"]  # the bench bundle has no OpenVINO int8 IR
    assert int8["status"] == "skipped" and "segclip-export openvino" in int8["reason"]
    expected = {"ov-f32": "cpu_fp32", "ov-bf16": "cpu_bf16", "torch-bf16": "cpu_bf16"}
    if "BF16" not in cpu_capabilities()[1]:
        assert "bf16" in by_name.pop("ov-bf16")["reason"]
        expected.pop("ov-bf16")
    for name, peak in expected.items():
        backend = by_name[name]
        assert backend["status"] == "ok" and backend["interleaved"] == [
            n for n in BACKENDS if by_name.get(n, {}).get("status") == "ok"]
        (case,) = backend["image"]
        assert case["peak_reference"] == peak and case["peak_fraction"] > 0
        assert case["ratio"]["vs_ort-cpu"] > 0
    assert by_name["ov-f32"]["info"]["precision"] == "f32"
    assert by_name["torch-bf16"]["info"]["engine"].endswith("bfloat16 (model cast)")
    assert 0.0 <= by_name["torch-bf16"]["agreement"]["label_map_mean"] <= 1.0
    (e2e,) = ov_run["e2e"]
    assert e2e["status"] == "ok" and e2e["backend_info"]["variant"] == "ov-f32"
    assert e2e["tower"]["backend"] == "ov-f32"


def test_best_variant_targets_pick_the_fastest_reduced_backend() -> None:
    def backend(name: str, ratio: float) -> dict[str, Any]:
        return {"backend": name, "status": "ok",
                "image": [{"batch": b, "status": "ok", "ratio": {"vs_ort-cpu": ratio * b}}
                          for b in (1, 8)]}

    results = {"backends": [backend("ort-int8", 2.0), backend("ov-int8", 3.0),
                            backend("ov-bf16", 1.5)]}
    rows = {t["target"]: t for t in _summary._low_precision_targets(results)}
    best1 = rows["best CPU variant image tower >= 3.5x ORT fp32 (batch 1; ov-int8)"]
    assert best1["value"] == 3.0 and best1["met"] is False
    best8 = rows["best CPU variant image tower >= 5.0x ORT fp32 (batch 8; ov-int8)"]
    assert best8["value"] == 24.0 and best8["met"] is True
    assert rows["OpenVINO bf16 image tower >= 2.3x ORT fp32 (batch 1)"]["value"] == 1.5

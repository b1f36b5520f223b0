"""Benchmark scripts and helpers (bench/): statistics against numpy, the analytic FLOP count
against torch's counter, the assignment variants against each other, and the three scripts
run end to end on a tiny bundle producing well-formed JSON and markdown.

Figures are never compared with the performance targets here: those are read from real runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _bench_helpers import QUICK, ROOT, run_script

from bench import _assign_variants as av
from bench._flops import TowerShape, count_with_torch, image_tower_flops, text_tower_flops
from bench._machine import machine_slug
from bench._stats import bootstrap_ci, percentile, summarize

BACKENDS = ["torch", "ort-cpu", "ort-int8", "ort-cuda", "trt-fp16", "trt-fp32"]
LATENCY_KEYS = {"n", "median_ms", "p90_ms", "p99_ms", "median_ci_ms", "p90_ci_ms", "p99_ci_ms",
                "mean_ms", "min_ms", "max_ms", "ci_level"}


# ---- statistics --------------------------------------------------------------------------------
def test_summary_percentiles_equal_numpy() -> None:
    rng = np.random.default_rng(1)
    seconds = rng.lognormal(-5, 0.4, 257)
    stats = summarize(seconds)
    ms = seconds * 1e3
    assert stats["n"] == 257
    assert stats["median_ms"] == pytest.approx(np.median(ms), rel=1e-12)
    assert stats["p90_ms"] == pytest.approx(np.percentile(ms, 90), rel=1e-12)
    assert stats["p99_ms"] == pytest.approx(np.percentile(ms, 99), rel=1e-12)
    assert stats["mean_ms"] == pytest.approx(ms.mean()) and stats["min_ms"] == ms.min()
    for name in ("median", "p90", "p99"):
        low, high = stats[f"{name}_ci_ms"]
        assert low <= stats[f"{name}_ms"] <= high


def test_percentile_known_values() -> None:
    data = list(range(1, 11))  # 1..10
    assert percentile(data, 50) == 5.5
    assert percentile(data, 90) == pytest.approx(9.1)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_bootstrap_ci_is_the_literal_resampling() -> None:
    data = np.random.default_rng(2).normal(10, 2, 40)
    low, high = bootstrap_ci(data, 50, resamples=500, level=0.9, seed=7)
    rng = np.random.default_rng(7)
    index = rng.integers(0, data.size, size=(500, data.size))
    medians = np.array([np.median(data[row]) for row in index])
    assert (low, high) == pytest.approx(tuple(np.quantile(medians, [0.05, 0.95])))
    assert bootstrap_ci(data, 50, resamples=500, level=0.9, seed=7) == (low, high)
    assert bootstrap_ci([3.0] * 9, 99) == (3.0, 3.0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(data, 50, level=1.5)


# ---- FLOPs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}),
    ("vit-b16", {}),
    ("tiny", {"group_layer": 6, "cross_layers": 1, "num_centers": 3, "vision_mlp_ratio": 2.0}),
])
def test_flops_match_torch_counter(preset: str, overrides: dict[str, Any]) -> None:
    from segclip.config import ModelConfig

    config = ModelConfig.preset(preset, **overrides)
    shape = TowerShape.from_config(config)
    image, text = image_tower_flops(shape), text_tower_flops(shape)
    assert image["total"] == sum(v for k, v in image.items() if k != "total")
    assert count_with_torch(config, images=2) == 2 * image["total"]
    assert count_with_torch(config, images=0, labels=3) == 3 * text["total"]


def test_vit_b16_flops_are_the_paper_model() -> None:
    from segclip.config import ModelConfig

    parts = image_tower_flops(TowerShape.from_config(ModelConfig.preset("vit-b16")))
    # 10 ViT-B blocks on 196 patches dominate; the whole tower is ~30.7 GFLOP per image
    assert parts["total"] == pytest.approx(30.67e9, rel=1e-3)
    assert parts["blocks_before_group"] / parts["total"] > 0.9


# ---- label-assignment variants -----------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["smooth", "random"])
@pytest.mark.parametrize("out_hw", [(37, 53), (224, 224), (9, 5)])
def test_assignment_variants_agree(pattern: str, out_hw: tuple[int, int]) -> None:
    window = av.make_window(21, pattern=pattern, seed=3)
    reference = av.fused(window, out_hw)
    assert reference.shape == out_hw and reference.dtype == np.uint16
    for variant in (av.naive_regions, av.naive_scores):
        assert np.array_equal(variant(window, out_hw), reference), variant.__name__
    identity = np.arange(1, 9, dtype=np.uint16)  # region index + 1: the raw argmax
    from segclip.runtime.assign import assign_pixels

    raw = av.bilinear_upsample(window.assign, out_hw).argmax(axis=0)  # (H, W) region index
    assert np.array_equal(assign_pixels(window.assign, identity, out_hw), identity[raw])


def test_bilinear_upsample_equals_torch() -> None:
    torch = pytest.importorskip("torch")
    maps = av.make_window(5, pattern="random", seed=1).assign
    want = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=(45, 31),
                                           mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(av.bilinear_upsample(maps, (45, 31)), want, atol=1e-6)


# ---- machine -----------------------------------------------------------------------------------
def test_machine_slug() -> None:
    cpu = {"cpu": {"model": "Intel(R) Xeon(R) Platinum 8480C CPU @ 2.00GHz", "usable_cpus": 2},
           "gpu": {}}
    assert machine_slug(cpu) == "cpu-2core-intel-xeon-platinum-8480c"
    gpu = {**cpu, "gpu": {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}}
    assert machine_slug(gpu) == "gpu-nvidia-h100-80gb-hbm3"


def test_scripts_have_no_import_time_side_effects(tmp_path: Path) -> None:
    code = "import bench.latency, bench.assign, bench.report; print('imported')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "imported\n" and list(tmp_path.iterdir()) == []


# ---- latency.py --------------------------------------------------------------------------------
def _ok_case(case: dict[str, Any]) -> None:
    assert case["status"] == "ok"
    assert LATENCY_KEYS <= set(case["latency"])
    lat = case["latency"]
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert lat["median_ci_ms"][0] <= lat["median_ms"] <= lat["median_ci_ms"][1]
    assert case["throughput_per_s"] > 0
    assert case["memory"]["rss_peak_mb"] > 0 and "rss_peak_delta_mb" in case["memory"]
    if Path("/proc/self/task").is_dir():  # Linux: run-queue wait of the case's threads
        assert case["sched"]["cpu_s"] >= 0 and 0 <= case["sched"]["contention"] <= 1


def test_latency_json_is_well_formed(latency_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = latency_run
    assert results["benchmark"] == "latency"
    assert results["machine"]["cpu"]["logical_cpus"] >= 1 and results["machine_slug"]
    assert [b["backend"] for b in results["backends"]] == BACKENDS
    assert results["settings"]["threads"] == 1
    by_name = {b["backend"]: b for b in results["backends"]}
    for name in ("torch", "ort-cpu", "ort-int8"):
        backend = by_name[name]
        assert backend["status"] == "ok", backend
        assert [c["batch"] for c in backend["image"]] == [1, 2]
        for case in backend["image"]:
            _ok_case(case)
            assert case["achieved_gflops"] > 0
            assert 0 < case["peak_fraction"]
            assert case["peak_reference"] == ("cpu_int8" if name == "ort-int8" else "cpu_fp32")
    assert by_name["torch"]["info"]["torch_threads"] == 1
    assert by_name["ort-cpu"]["info"]["intra_op_threads"] == 1
    assert by_name["ort-cpu"]["info"]["providers"][0] == "CPUExecutionProvider"
    for case in by_name["ort-cpu"]["image"] + by_name["ort-cpu"]["text"]:
        _ok_case(case)
        assert case["ratio"]["vs_torch"] > 0
    assert all(c["status"] == "skipped" and c["reason"] for c in by_name["ort-int8"]["text"])
    agreement = by_name["ort-int8"]["agreement"]
    assert 0 <= agreement["label_map_mean"] <= 1 and 0 <= agreement["region_argmax_mean"] <= 1


def test_latency_lists_skipped_backends_with_reasons(
        latency_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = latency_run
    skipped = {item["what"]: item["reason"] for item in results["skipped"]}
    for backend in results["backends"]:
        if backend["status"] != "ok":
            assert backend["status"] == "skipped" and backend["reason"]
            assert skipped[backend["backend"]] == backend["reason"]
            assert backend["reason"] in stdout
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        cuda = next(b for b in results["backends"] if b["backend"] == "ort-cuda")
        assert cuda["status"] == "skipped" and "CUDAExecutionProvider" in cuda["reason"]
    for e2e in results["e2e"]:
        assert e2e["status"] == "ok" or e2e["reason"]


def test_latency_roofline_and_targets(latency_run: tuple[dict[str, Any], str]) -> None:
    results, _ = latency_run
    flops = results["flops"]
    assert flops["torch_counter_per_image"] == flops["image_per_image"]["total"]
    assert results["peaks_gflops"]["cpu_fp32"] > 0
    assert results["peak"]["start"]["cpu_fp32"]["threads"] == 1
    for target in results["targets"]:
        assert {"target", "value", "goal", "met"} <= set(target)
        assert target["met"] in (True, False, None)
        assert target["value"] is not None or target["why"]
    assign = results["assign"]
    assert assign["status"] == "ok" and {c["output"] for c in assign["cases"]} == {"window",
                                                                                   "image"}
    for case in assign["cases"]:
        _ok_case(case)


def test_latency_isolated_workers_and_interleaving(bench_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    run_script("latency.py", "--bundle", str(bench_bundle), "--backends", "ort-cpu,ort-int8",
               "--batch", "1", "--labels", "1", "--e2e", "cpu:fp32", "--peak-size", "128",
               "--interleave", "--out", str(out), *QUICK)
    results = json.loads(out.read_text())
    assert [b["backend"] for b in results["backends"]] == ["ort-cpu", "ort-int8"]
    for backend in results["backends"]:
        assert backend["status"] == "ok" and backend["interleaved"] == ["ort-cpu", "ort-int8"]
        _ok_case(backend["image"][0])
    int8 = results["backends"][1]["image"][0]
    assert int8["ratio"]["vs_ort-cpu"] > 0 and int8["interleaved"] == ["ort-cpu", "ort-int8"]
    (e2e,) = results["e2e"]
    assert e2e["status"] == "ok", e2e
    assert e2e["cases"][0]["stages_median_ms"]["image"] > 0


def test_latency_user_errors(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--bundle",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a segclip bundle" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- assign.py ---------------------------------------------------------------------------------
def test_assign_json_rows(assign_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = assign_run
    cpu = [r for r in results["rows"] if r["device"] == "cpu"]
    assert [(r["size"], r["labels"]) for r in cpu] == [([40, 40], 3), ([40, 40], 7),
                                                       ([64, 64], 3), ([64, 64], 7)]
    for row in cpu:
        for key in ("fused_ms", "naive_ms", "fused_peak_mb", "naive_peak_mb",
                    "naive_regions_ms", "naive_regions_peak_mb"):
            assert row[key] > 0, key
        assert row["speedup_naive"] == pytest.approx(row["naive_ms"] / row["fused_ms"])
    if not any(r["device"] == "cuda" for r in results["rows"]):
        assert results["skipped"] and results["skipped"][0]["reason"]
        assert results["skipped"][0]["reason"] in stdout


# ---- report.py ---------------------------------------------------------------------------------
def test_report_markdown(latency_run: tuple[dict[str, Any], str],
                         assign_run: tuple[dict[str, Any], str], tmp_path: Path) -> None:
    paths = []
    for name, (results, _) in (("latency", latency_run), ("assign", assign_run)):
        path = tmp_path / results["machine_slug"] / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(results))
        paths.append(str(path))
    out = tmp_path / "README.md"
    run_script("report.py", *paths, "--out", str(out))
    text = out.read_text()
    for heading in ("## Latency", "### Image tower", "### Text tower", "### Roofline",
                    "### Targets", "### Skipped", "## Label assignment"):
        assert heading in text, heading
    assert "| ort-cpu | 1 |" in text and "| ort-cuda | - | skipped |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Plots skipped: matplotlib is not installed" in text
    else:
        for plot in ("latency-vs-batch.png", "latency-roofline.png", "assign-time.png"):
            assert (Path(paths[0]).parent / plot).stat().st_size > 0
            assert plot in text


# ---- derived figures on GPU-shaped results (no GPU needed) -------------------------------------
def _fake_case(key: str, size: int, ms: float) -> dict[str, Any]:
    return {key: size, "status": "ok", "latency": summarize([ms / 1e3] * 5),
            "throughput_per_s": size / (ms / 1e3),
            "memory": {"rss_mb": 10.0, "rss_peak_mb": 10.0, "rss_peak_delta_mb": 1.0}}


def test_summary_of_tensorrt_results() -> None:
    from bench._summary import derive, tower_rows

    trt_cases = [{**_fake_case("batch", 1, 2.0), "engine_only": _fake_case("batch", 1, 0.8)},
                 {**_fake_case("batch", 128, 50.0),
                  "engine_only": _fake_case("batch", 128, 10.0)}]
    results = {
        "backends": [
            {"backend": "torch-cuda", "status": "ok", "image": [_fake_case("batch", 1, 8.0)],
             "text": []},
            {"backend": "trt-fp16", "status": "ok", "image": trt_cases, "text": []},
            {"backend": "ort-cuda", "status": "skipped", "reason": "no CUDAExecutionProvider"}],
        "flops": {"image_per_image": {"total": 30e9}, "text_per_label": {"total": 6e9}},
        "peak": {"start": {"cpu_fp32": {"peak_gflops": 200.0},
                           "gpu": {"size": 8192, "fp16": {"median_gflops": 600_000.0}}},
                 "end": None},
        "e2e": []}
    derive(results)
    batch1 = results["backends"][1]["image"][0]
    assert batch1["ratio"]["vs_torch-cuda"] == pytest.approx(4.0)
    assert batch1["engine_only"]["peak_reference"] == "gpu_fp16"
    assert batch1["engine_only"]["peak_fraction"] == pytest.approx(30e9 / 0.8e-3 / 600e12)
    targets = {t["target"]: t for t in results["targets"]}
    latency = next(t for name, t in targets.items() if "ms at batch 1" in name)
    throughput = next(t for name, t in targets.items() if "img/s at batch 128" in name)
    assert latency["value"] == pytest.approx(0.8) and latency["met"] is True
    assert throughput["value"] == pytest.approx(12_800) and throughput["met"] is False
    rows = tower_rows(results, "image")
    assert "engine only (device-resident input): 0.800 ms" in rows[1][-1]
    assert rows[3][:3] == ["ort-cuda", "-", "skipped"]

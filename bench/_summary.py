"""Derived figures of a latency run: same-run ratios, roofline fractions, targets, table rows.

Shared by bench/latency.py (printed) and bench/report.py (markdown). Ratios are always taken
between measurements of the same run; "x torch" = torch eager median / this median (> 1: faster).
"""

from __future__ import annotations

from typing import Any

from bench._stats import ratio
from bench._towers import PEAK_REFERENCE

BASELINES = ("torch", "torch-cuda", "ort-cpu")
DERIVED = ("ratio", "achieved_gflops", "peak_reference", "peak_fraction",
           "peak_fraction_adjusted")
# targets (read from the output; never asserted in tests)
ORT_VS_TORCH = 1.6
ORT_PEAK_FRACTION = 0.85
INT8_VS_FP32 = 2.5
INT8_AGREEMENT = 0.99
E2E_VS_TOWER = 1.15
BEST_CPU_VS_FP32 = {1: 3.5, 8: 5.0}  # best reduced-precision CPU variant / ORT fp32, per batch
OV_BF16_VS_FP32 = 2.3
REDUCED_CPU = ("ort-int8", "ov-bf16", "ov-int8", "torch-bf16")
TRT_FP16_BATCH1_MS = 1.0
TRT_FP16_BATCH128_IMG_S = 13_500


def _ok(cases: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {c[key]: c for c in cases if c.get("status") == "ok"}


def medians(results: dict[str, Any], stage: str, key: str) -> dict[str, dict[Any, float]]:
    """backend -> {batch or label count -> median ms} of the backends that ran."""
    out = {}
    for backend in results["backends"]:
        if backend.get("status") == "ok":
            out[backend["backend"]] = {k: c["latency"]["median_ms"]
                                       for k, c in _ok(backend[stage], key).items()}
    return out


def _uncontended(rate: float, sched: dict[str, float] | None) -> float | None:
    """`rate` scaled to the time the threads actually ran: rate / (1 - run-queue wait share).
    Exact for always-runnable threads (a GEMM); conservative for spinning thread pools."""
    if not sched or sched.get("contention") is None or sched["contention"] >= 0.95:
        return None
    return rate / (1.0 - sched["contention"])


def peaks(results: dict[str, Any]) -> dict[str, float]:
    """Matmul ceilings in GFLOP/s: cpu_fp32, cpu_bf16, cpu_int8 (GOP/s) and gpu_<precision>,
    each the higher of the run's start and end measurements (the higher ceiling gives the
    lower, conservative fraction), and cpu_fp32_adjusted, the same corrected for the run-queue
    wait while it was measured."""
    out: dict[str, float] = {}
    runs = [p for p in (results.get("peak", {}).get(w) for w in ("start", "end")) if p]
    cpu = [p["cpu_fp32"] for p in runs if p.get("cpu_fp32")]
    if cpu:
        out["cpu_fp32"] = max(c["peak_gflops"] for c in cpu)
        adjusted = [_uncontended(c["peak_gflops"], c.get("sched")) for c in cpu]
        if all(a is not None for a in adjusted):
            out["cpu_fp32_adjusted"] = max(adjusted)
    for key in ("cpu_bf16", "cpu_int8"):
        rates = [p[key]["median_gflops"] for p in runs if "median_gflops" in (p.get(key) or {})]
        if rates:
            out[key] = max(rates)
    for p in runs:
        for name, rate in (p.get("gpu") or {}).items():
            if isinstance(rate, dict):
                out[f"gpu_{name}"] = max(out.get(f"gpu_{name}", 0.0), rate["median_gflops"])
    return out


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Add `ratio`, `achieved_gflops` and `peak_fraction` to every measured tower case."""
    ceilings = peaks(results)
    flops = results.get("flops") or {}
    per_item = {"image": (flops.get("image_per_image") or {}).get("total"),
                "text": (flops.get("text_per_label") or {}).get("total")}
    for stage, key in (("image", "batch"), ("text", "labels")):
        table = medians(results, stage, key)
        for backend in results["backends"]:
            if backend.get("status") != "ok":
                continue
            for case in backend[stage]:
                if case.get("status") != "ok":
                    continue
                for item in (case, case.get("engine_only") or {}):  # derive afresh
                    for stale in DERIVED:
                        item.pop(stale, None)
                median = case["latency"]["median_ms"]
                case["ratio"] = {f"vs_{b}": ratio(table[b].get(case[key]), median)
                                 for b in BASELINES if b in table and b != backend["backend"]
                                 and table[b].get(case[key])}
                if per_item[stage]:
                    reference = PEAK_REFERENCE.get(backend["backend"])
                    for item in (case, case.get("engine_only")):
                        if not item or "latency" not in item:
                            continue
                        achieved = (per_item[stage] * case[key]
                                    / (item["latency"]["median_ms"] / 1e3) / 1e9)
                        item["achieved_gflops"] = achieved
                        if reference in ceilings:
                            item["peak_reference"] = reference
                            item["peak_fraction"] = achieved / ceilings[reference]
                        adjusted = _uncontended(achieved, item.get("sched"))
                        if f"{reference}_adjusted" in ceilings and adjusted is not None:
                            item["peak_fraction_adjusted"] = (
                                adjusted / ceilings[f"{reference}_adjusted"])
    results["peaks_gflops"] = ceilings
    results["targets"] = targets(results)
    return results


def _target(name: str, value: float | None, goal: float, higher_is_better: bool,
            why: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher_is_better else value <= goal)
    entry = {"target": name, "value": value, "goal": goal, "met": met}
    if value is None:
        entry["why"] = why or "not measured in this run"
    return entry


def _backend(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    for b in results["backends"]:
        if b["backend"] == name:
            return b
    return None


def _why(results: dict[str, Any], name: str) -> str:
    b = _backend(results, name)
    if b is None:
        return f"{name} was not requested"
    return f"{name} skipped: {b.get('reason')}" if b.get("status") != "ok" else ""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The published performance targets, evaluated on whatever this run measured (met: None =
    not measured)."""
    out = []
    image = {name: _ok(b["image"], "batch") for name in ("ort-cpu", "ort-int8", "trt-fp16")
             if (b := _backend(results, name)) and b.get("status") == "ok"}
    for batch, case in image.get("ort-cpu", {}).items():
        out.append(_target(f"ORT fp32 image tower >= {ORT_VS_TORCH}x torch eager (batch {batch})",
                           case.get("ratio", {}).get("vs_torch"), ORT_VS_TORCH, True,
                           _why(results, "torch")))
        out.append(_target(f"ORT fp32 image tower >= {ORT_PEAK_FRACTION:.0%} of measured fp32 "
                           f"matmul peak (batch {batch})", case.get("peak_fraction"),
                           ORT_PEAK_FRACTION, True))
        if "peak_fraction_adjusted" in case:
            out.append(_target(f"ORT fp32 image tower >= {ORT_PEAK_FRACTION:.0%} of measured fp32 "
                               f"matmul peak, both corrected for run-queue wait (batch {batch})",
                               case["peak_fraction_adjusted"], ORT_PEAK_FRACTION, True))
    for batch, case in image.get("ort-int8", {}).items():
        out.append(_target(f"ORT int8 image tower >= {INT8_VS_FP32}x ORT fp32 (batch {batch})",
                           case.get("ratio", {}).get("vs_ort-cpu"), INT8_VS_FP32, True,
                           _why(results, "ort-cpu")))
    int8 = _backend(results, "ort-int8")
    if int8 and int8.get("agreement"):
        for key in ("label_map_mean", "region_argmax_mean"):
            out.append(_target(f"ORT int8 pixel agreement with fp32 ({key}) >= "
                               f"{INT8_AGREEMENT:.0%}", int8["agreement"][key], INT8_AGREEMENT,
                               True))
    out += _low_precision_targets(results)
    for e2e in results.get("e2e", []):
        what = f"end-to-end segment ({e2e.get('device')}, {e2e.get('variant')})"
        if e2e.get("status") != "ok":
            out.append(_target(f"{what} <= {E2E_VS_TOWER}x image tower", None, E2E_VS_TOWER,
                               False, e2e.get("reason", "")))
            continue
        for case in e2e["cases"]:
            tower, source = e2e_reference(e2e, case)
            out.append(_target(
                f"{what[:-1]}, {case['labels']} labels, {e2e['windows']} windows) <= "
                f"{E2E_VS_TOWER}x image tower ({source})",
                case["latency"]["median_ms"] / tower if tower else None, E2E_VS_TOWER, False,
                "no image-tower reference"))
    trt = {batch: case["engine_only"] if "latency" in case.get("engine_only", {}) else case
           for batch, case in image.get("trt-fp16", {}).items()}  # device-resident input
    batch1 = trt.get(1, {}).get("latency", {}).get("median_ms")
    out.append(_target(f"TensorRT fp16 image engine <= {TRT_FP16_BATCH1_MS} ms at batch 1 (H100)",
                       batch1, TRT_FP16_BATCH1_MS, False, _why(results, "trt-fp16")
                       or "batch 1 not measured"))
    out.append(_target(f"TensorRT fp16 engine >= {TRT_FP16_BATCH128_IMG_S} img/s at batch 128 "
                       f"(H100)", trt.get(128, {}).get("throughput_per_s"),
                       TRT_FP16_BATCH128_IMG_S, True,
                       _why(results, "trt-fp16") or "batch 128 not measured"))
    return out


def _low_precision_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The best reduced-precision CPU variant and OpenVINO bf16 against ORT fp32, per batch,
    and the pixel agreement of the OpenVINO and torch bf16 variants (as measured: on random
    weights they are not a verdict on precision, see bench/precision.py)."""
    out = []
    speed = {name: {c["batch"]: c.get("ratio", {}).get("vs_ort-cpu")
                    for c in _ok(b["image"], "batch").values()}
             for name in REDUCED_CPU
             if (b := _backend(results, name)) and b.get("status") == "ok"}
    for batch, goal in BEST_CPU_VS_FP32.items():
        ratios = {n: r[batch] for n, r in speed.items() if r.get(batch) is not None}
        best = max(ratios, key=ratios.__getitem__) if ratios else None
        out.append(_target(f"best CPU variant image tower >= {goal}x ORT fp32 (batch {batch}"
                           + (f"; {best})" if best else ")"), ratios.get(best) if best else None,
                           goal, True, "no reduced-precision CPU variant and ORT fp32 at this "
                                       "batch"))
    for batch in BEST_CPU_VS_FP32:
        if _backend(results, "ov-bf16") is not None:
            out.append(_target(f"OpenVINO bf16 image tower >= {OV_BF16_VS_FP32}x ORT fp32 (batch "
                               f"{batch})", speed.get("ov-bf16", {}).get(batch),
                               OV_BF16_VS_FP32, True, _why(results, "ov-bf16")
                               or f"batch {batch} or ort-cpu not measured"))
    for name in REDUCED_CPU[1:]:
        backend = _backend(results, name)
        if backend and backend.get("agreement"):
            out.append(_target(f"{name} label-map agreement with ORT fp32 >= "
                               f"{INT8_AGREEMENT:.0%}", backend["agreement"]["label_map_mean"],
                               INT8_AGREEMENT, True))
    return out


def e2e_reference(e2e: dict[str, Any], case: dict[str, Any]) -> tuple[float | None, str]:
    """The image-tower time an end-to-end case is compared with, and where it comes from."""
    tower = e2e.get("tower") or {}
    if tower.get("status") == "ok":
        return tower["latency"]["median_ms"], f"{tower['backend']} batch {tower['batch']}"
    image = (case.get("stages_median_ms") or {}).get("image")
    return image, "the Segmenter's own image stage"


E2E_HEADER = ["labels", "median ms [95% CI]", "p90 ms", "p99 ms", "first call ms",
              "stages (median ms)", "tower ms", "x tower", "run-queue wait %"]


def e2e_rows(e2e: dict[str, Any]) -> list[list[str]]:
    rows = []
    for case in e2e["cases"]:
        lat = case["latency"]
        tower, source = e2e_reference(e2e, case)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in case.get("stages_median_ms", {}).items())
        rows.append([str(case["labels"]),
                     f"{lat['median_ms']:.2f} [{lat['median_ci_ms'][0]:.2f}, "
                     f"{lat['median_ci_ms'][1]:.2f}]", fmt(lat["p90_ms"]), fmt(lat["p99_ms"]),
                     fmt(case.get("first_call_ms")), stages,
                     f"{fmt(tower)} ({source})",
                     fmt(lat["median_ms"] / tower if tower else None, ".3f"),
                     contention(case)])
    return rows


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def tower_rows(results: dict[str, Any], stage: str) -> list[list[str]]:
    """Table rows of one tower stage: one per (backend, size), skipped ones with the reason."""
    key, unit = ("batch", "img/s") if stage == "image" else ("labels", "labels/s")
    rows = []
    for backend in results["backends"]:
        if backend.get("status") != "ok":
            rows.append([backend["backend"], "-", "skipped", *[""] * 10,
                         str(backend.get("reason"))])
            continue
        for case in backend[stage]:
            if case.get("status") != "ok":
                rows.append([backend["backend"], str(case[key]), "skipped", *[""] * 10,
                             str(case["reason"])])
                continue
            lat, ratios = case["latency"], case.get("ratio", {})
            rows.append([
                backend["backend"], str(case[key]),
                f"{lat['median_ms']:.2f} [{lat['median_ci_ms'][0]:.2f}, "
                f"{lat['median_ci_ms'][1]:.2f}]",
                fmt(lat["p90_ms"]), fmt(lat["p99_ms"]), str(lat["n"]),
                f"{case['throughput_per_s']:.1f} {unit}",
                fmt(case["memory"]["rss_peak_delta_mb"], ".1f"),
                fmt(ratios.get("vs_torch"), ".2f"),
                fmt(case.get("achieved_gflops"), ".1f"),
                fmt(100 * case["peak_fraction"], ".1f") if "peak_fraction" in case else "-",
                fmt(100 * case["peak_fraction_adjusted"], ".1f")
                if "peak_fraction_adjusted" in case else "-",
                contention(case), _note(case),
            ])
    return rows


TOWER_HEADER = ["backend", "size", "median ms [95% CI]", "p90 ms", "p99 ms", "n", "throughput",
                "peak RSS delta MB", "x torch", "GFLOP/s", "% peak", "% peak (wait-adj.)",
                "run-queue wait %", "note"]


def contention(case: dict[str, Any]) -> str:
    """Share of the case's thread time spent waiting for a core other processes held."""
    sched = case.get("sched")
    return "-" if not sched else f"{100 * sched['contention']:.0f}"


def _note(case: dict[str, Any]) -> str:
    notes = [f"{v:.2f}x {k[3:]}" for k, v in case.get("ratio", {}).items()
             if k != "vs_torch" and v is not None]
    engine = case.get("engine_only")
    if engine and "latency" not in engine:
        notes.append(f"engine only: skipped, {engine.get('reason')}")
    elif engine:
        notes.append(f"engine only (device-resident input): {engine['latency']['median_ms']:.3f}"
                     f" ms, {engine['throughput_per_s']:.0f}/s, "
                     f"{100 * engine.get('peak_fraction', 0):.1f}% peak")
    return ", ".join(notes)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in results.get("targets", []):
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        rows.append([t["target"], fmt(t["value"], ".3f"), str(t["goal"]), status,
                     t.get("why", "")])
    return rows

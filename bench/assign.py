"""Fused label assignment (runtime/assign.py) vs the naive ways, in time and peak memory.

    python bench/assign.py [--sizes 224,512,1024] [--labels 21,60,171] [--out FILE.json]

For each output size H = W and label count T, one window of the paper model's shape (L = 8
regions on a 14 x 14 grid, D = 512) is assigned by every variant of bench/_assign_variants.py:
`fused` (the runtime), `naive_regions` ([L, H, W] upsampling + argmax) and `naive_scores` (the
official [T, H, W] score map). Times: warm-up, then the variants called round-robin (one call
each per round, so that load from other processes hits all alike), median / p90 / p99 with
bootstrap CIs.
Peak memory: one more call under `tracemalloc`, which sees numpy's allocations (timed calls run
without it). Same-run ratios naive / fused are printed; JSON rows:
`{"size": [H, W], "labels": T, "device": ..., "fused_ms": ..., "naive_ms": ...,
"fused_peak_mb": ..., "naive_peak_mb": ...}` with `naive_*` = the [T, H, W] score-map variant
and the [L, H, W] one under `naive_regions_*`. On a GPU: the runtime's fused CUDA kernel
(`segclip.runtime.assign_cuda`, checked against the numpy reference first) against torch
versions of the naive variants, each returning the label map on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/assign.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

TARGET_SPEEDUP = 20.0
TARGET_MEMORY = 20.0
TARGET_CASE = (512, 171)  # (size, labels) the targets are read at


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_ints, default=[224, 512, 1024])
    parser.add_argument("--labels", type=_ints, default=[21, 60, 171])
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--pattern", choices=("smooth", "random"), default="smooth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="BLAS threads of numpy (the naive score map's product uses them; "
                             "the fused assignment is single-threaded numpy)")
    parser.add_argument("--variants", default="fused,naive_regions,naive_scores",
                        help="numpy variants to time (bench/_assign_variants.py)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=15.0)
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON results (default: "
                                                 "bench/results/<machine>/assign.json)")
    return parser.parse_args(argv)


def traced_peak_mb(run: Any) -> float:
    """Peak bytes numpy/Python allocated during one call of `run` (tracemalloc), in MiB."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def cpu_case(variants: dict[str, Any], window: Any, size: int, limits: Any) -> dict[str, Any]:
    from bench._measure import SchedClock, time_interleaved
    from bench._stats import summarize

    runs = {name: (lambda fn=fn: fn(window, (size, size))) for name, fn in variants.items()}
    clock = SchedClock()
    samples = time_interleaved(runs, limits)  # round-robin: fair ratios on a shared machine
    sched = clock.read()
    return {name: {"latency": summarize(samples[name]), "sched": sched,
                   "peak_mb": traced_peak_mb(runs[name])} for name in runs}


def _cuda_fused(window: Any, size: int) -> tuple[Any, float]:
    """The runtime's CUDA kernel on one window (host arrays in, host label map out) and the
    bytes of the device buffers it uses (assignment, label table, taps, label map)."""
    from bench import _assign_variants as av
    from segclip.runtime.assign import region_labels
    from segclip.runtime.assign_cuda import assign_windows_cuda

    side = 224  # one S x S window covering the whole "resized image": plain resampling
    assign = window.assign[None]  # (1, L, h, w)

    def run() -> Any:
        labels = region_labels(av.scores_of(window), window.threshold)[None]  # (1, L)
        return assign_windows_cuda(assign, labels, (side, side), side, (size, size))

    regions = assign.shape[1]
    buffers = assign.nbytes + 2 * regions + 4 * 6 * size + 4 * 2 * size + 2 * size * size
    return run, buffers / 2 ** 20


def gpu_case(window: Any, size: int, limits: Any) -> tuple[dict[str, Any], str | None]:
    """Naive torch variants (label map copied to the host, as the fused kernel returns it) and
    the runtime's fused CUDA kernel; (measurements, why the kernel was skipped or None)."""
    import numpy as np
    import torch

    from bench import _assign_variants as av
    from bench._measure import time_calls
    from bench._stats import summarize

    inputs = av.torch_inputs(window, "cuda")
    out: dict[str, Any] = {}
    for name, fn in (("naive_regions", av.torch_naive_regions),
                     ("naive_scores", av.torch_naive_scores)):
        def run(fn: Any = fn) -> Any:
            return fn(inputs, (size, size)).cpu()

        stats = summarize(time_calls(run, limits, torch.cuda.synchronize))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out[name] = {"latency": stats, "peak_mb": peak,
                     "memory_method": "torch.cuda.max_memory_allocated"}
    try:
        fused, buffers_mb = _cuda_fused(window, size)
        expected = av.naive_regions(window, (size, size))
        if not np.array_equal(fused(), expected):
            return out, "the CUDA kernel's label map differs from the numpy reference"
    except Exception as e:  # no cuda-python / NVRTC: the runtime's own error
        return out, f"segclip.runtime.assign_cuda unusable here: {type(e).__name__}: {e}"
    out["fused"] = {"latency": summarize(time_calls(fused, limits)), "peak_mb": buffers_mb,
                    "memory_method": "the kernel's device buffers (counted)"}
    return out, None


def _row(size: int, labels: int, device: str, measured: dict[str, Any]) -> dict[str, Any]:
    def median(name: str) -> float | None:
        return measured[name]["latency"]["median_ms"] if name in measured else None

    def peak(name: str) -> float | None:
        return measured[name]["peak_mb"] if name in measured else None

    row: dict[str, Any] = {"size": [size, size], "labels": labels, "device": device,
                           "fused_ms": median("fused"), "naive_ms": median("naive_scores"),
                           "naive_regions_ms": median("naive_regions"),
                           "fused_peak_mb": peak("fused"), "naive_peak_mb": peak("naive_scores"),
                           "naive_regions_peak_mb": peak("naive_regions"),
                           "variants": measured}
    for key in ("naive", "naive_regions"):
        ms, mb = row[f"{key}_ms"], row[f"{key}_peak_mb"]
        row[f"speedup_{key}"] = ms / row["fused_ms"] if ms and row["fused_ms"] else None
        row[f"memory_ratio_{key}"] = (mb / row["fused_peak_mb"]
                                      if mb and row["fused_peak_mb"] else None)
    return row


def _gpu_reason(no_gpu: bool) -> str | None:
    if no_gpu:
        return "--no-gpu"
    try:
        import torch
    except ImportError:
        return "torch is not installed (the naive GPU variants use it)"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_rows(rows: list[dict[str, Any]]) -> None:
    from bench._summary import text_table

    header = ["device", "size", "labels", "fused ms", "naive [T,H,W] ms", "x", "naive [L,H,W] ms",
              "x", "fused MB", "naive [T,H,W] MB", "x", "naive [L,H,W] MB", "x"]
    table = [[r["device"], "x".join(map(str, r["size"])), str(r["labels"]), _fmt(r["fused_ms"]),
              _fmt(r["naive_ms"]), _fmt(r["speedup_naive"], ".1f"), _fmt(r["naive_regions_ms"]),
              _fmt(r["speedup_naive_regions"], ".1f"), _fmt(r["fused_peak_mb"], ".1f"),
              _fmt(r["naive_peak_mb"], ".1f"), _fmt(r["memory_ratio_naive"], ".1f"),
              _fmt(r["naive_regions_peak_mb"], ".1f"),
              _fmt(r["memory_ratio_naive_regions"], ".1f")]
             for r in rows]
    print(text_table(header, table))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before numpy loads its BLAS
    from bench import _assign_variants as av
    from bench._machine import describe, load_average, machine_info, machine_slug
    from bench._measure import LoopLimits

    machine = machine_info()
    print(describe(machine), flush=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if not callable(getattr(av, n, None))]
    if unknown or "fused" not in names:
        print(f"error: --variants must include fused and name functions of "
              f"bench/_assign_variants.py, got {unknown or names}", file=sys.stderr)
        raise SystemExit(2)
    variants = {name: getattr(av, name) for name in names}
    limits = LoopLimits(warmup=args.warmup, min_iters=args.min_iters, max_iters=args.max_iters,
                        min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                        warmup_seconds=args.max_seconds)
    gpu_reason = _gpu_reason(args.no_gpu)
    rows, skipped = [], []
    for size in args.sizes:
        for labels in args.labels:
            window = av.make_window(labels, args.regions, args.grid, pattern=args.pattern,
                                    seed=args.seed)  # the same assignment for every T
            start = time.perf_counter()
            rows.append(_row(size, labels, "cpu", cpu_case(variants, window, size, limits)))
            print(f"cpu {size}x{size} T={labels}: {time.perf_counter() - start:.1f} s",
                  flush=True)
            if gpu_reason is None:
                measured, why = gpu_case(window, size, limits)
                rows.append(_row(size, labels, "cuda", measured))
                if why:
                    skipped.append({"what": f"cuda fused {size}x{size} T={labels}",
                                    "reason": why})
    if gpu_reason is not None:
        skipped.append({"what": "cuda (all cases)", "reason": gpu_reason})
    print()
    print_rows(rows)
    target = next((r for r in rows if r["device"] == "cpu"
                   and (r["size"][0], r["labels"]) == TARGET_CASE), None)
    if target is not None:
        print(f"\ntarget at {TARGET_CASE[0]}^2, {TARGET_CASE[1]} labels (cpu, vs the [T,H,W] "
              f"naive): speed {target['speedup_naive']:.1f}x (goal >= {TARGET_SPEEDUP:.0f}x), "
              f"peak memory {target['memory_ratio_naive']:.1f}x less (goal >= "
              f"{TARGET_MEMORY:.0f}x)")
    for item in skipped:
        print(f"skipped: {item['what']}: {item['reason']}")
    results = {"benchmark": "assign", "machine": machine, "machine_slug": machine_slug(machine),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": {k: (str(v) if isinstance(v, Path) else v)
                            for k, v in vars(args).items()},
               "window": {"regions": args.regions, "grid": args.grid, "dim": 512,
                          "pattern": args.pattern},
               "memory_method": "tracemalloc peak of one extra call (numpy allocations); "
                                "torch.cuda.max_memory_allocated on GPU",
               "rows": rows, "skipped": skipped, "load_average_end": load_average()}
    out = args.out or ROOT / "bench" / "results" / machine_slug(machine) / "assign.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()

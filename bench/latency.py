"""Latency, throughput and memory of the SegCLIP stages per backend, with a roofline.

    python bench/latency.py --bundle DIR [--checkpoint CKPT | --preset NAME]
        [--backends torch,ort-cpu,ort-int8,ort-cuda,trt-fp16,trt-fp32] [--batch 1,8,32]
        [--labels 1,20,171] [--threads N] [--out FILE.json]

Stages: image tower per batch, text tower per label count, label assignment (runtime/assign.py
on real tower outputs), end-to-end `Segmenter.segment` (labels cached). Each case: warm-up, sync
before every clock read on GPU, median / p90 / p99 with 95% bootstrap CIs, throughput, peak host
RSS (and device memory on GPU). PyTorch eager is the baseline of every "x torch" ratio, taken
within this run. The roofline compares achieved FLOP/s (analytic count, bench/_flops.py) with the
matmul peak measured at the start and the end of the same run (bench/_peak.py).

Every job runs in its own Python process (thread pools, allocators and peak RSS stay apart);
`--no-isolate` runs them here instead (faster; for tests). On a machine shared with other work,
`--interleave` times the CPU backends in one process round-robin, so that the others' load hits
them alike and the ratios stay fair (memory figures are then the shared process's); every case
reports its threads' run-queue wait (time other processes held the cores). Backends that
cannot run here are listed as skipped with the reason. Threads are pinned: ORT intra-op =
torch intra-op = --threads, inter-op 1, and OMP/MKL/OpenBLAS thread variables are set to the
same value in the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/latency.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

DEFAULT_BACKENDS = "torch,torch-cuda,ort-cpu,ort-int8,ort-cuda,trt-fp16,trt-fp32"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# CPU backends that --interleave times together
INTERLEAVABLE = ("torch", "torch-bf16", "ort-cpu", "ort-int8", "ov-f32", "ov-bf16", "ov-int8")


class UsageError(Exception):
    """A bad option or input: one line on stderr, exit code 2."""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _size(text: str) -> list[int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 375x500), got {text!r}")
    return [int(p) for p in parts]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="weights of the torch baseline")
    parser.add_argument("--preset", help="torch baseline with random weights of this preset "
                                         "(default: the preset matching the bundle)")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"comma-separated, of: torch, torch-bf16, torch-cuda, ort-cpu, "
                             f"ort-int8, ort-cuda, ov-f32, ov-bf16, ov-int8, trt-fp16, trt-fp32 "
                             f"(default {DEFAULT_BACKENDS})")
    parser.add_argument("--batch", type=_ints, default=[1, 8, 32], help="image batches")
    parser.add_argument("--labels", type=_ints, default=[1, 20, 171], help="label counts")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads of every CPU backend (default: usable CPUs)")
    parser.add_argument("--e2e-size", type=_size, default=[375, 500],
                        help="HxW of the end-to-end image (default 375x500, a VOC-sized photo)")
    parser.add_argument("--e2e", default="cpu:fp32,cpu:int8,cuda",
                        help="end-to-end Segmenter runs: cpu:VARIANT (a CPU variant of "
                             "runtime/variants.py: fp32, fp16, int8, ov-f32, ov-bf16, ov-int8, "
                             "auto) and/or cuda (the runtime's pick: TensorRT, else ONNX Runtime "
                             "CUDA)")
    parser.add_argument("--trt-build", type=Path,
                        help="build missing TensorRT image engines into this folder")
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="side of the square fp32 GEMMs that measure the CPU peak")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--no-isolate", action="store_true",
                        help="run every job in this process (faster, less fair)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the CPU backends (torch, torch-bf16, ort-*, ov-*) in one "
                             "process, round-robin, for fair ratios on a machine shared with "
                             "other work")
    parser.add_argument("--out", type=Path, help="JSON results (default: "
                                                 "bench/results/<machine>/latency.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_model(manifest: dict[str, Any], checkpoint: Path | None,
                  preset: str | None) -> tuple[Any, str, str | None]:
    """(config or None, where it came from, preset for the torch baseline)."""
    from segclip.config import PRESETS

    facts = ("image_size", "patch_size", "num_centers", "embed_dim", "context_length")
    model = manifest["model"]

    def mismatch(config: Any) -> list[str]:
        return [f"{k}: {getattr(config, k)} vs bundle {model[k]}" for k in facts
                if k in model and getattr(config, k) != model[k]]

    if checkpoint is not None:
        if not checkpoint.is_file():
            raise UsageError(f"--checkpoint {checkpoint} does not exist")
        from segclip.checkpoint import read_checkpoint
        from segclip.config import ModelConfig

        config = ModelConfig.from_dict(read_checkpoint(checkpoint)["config"])
        if mismatch(config):
            raise UsageError(f"--checkpoint {checkpoint} does not fit the bundle: "
                             f"{'; '.join(mismatch(config))}")
        return config, f"checkpoint {checkpoint.name}", None
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
        if mismatch(PRESETS[preset]):
            raise UsageError(f"--preset {preset} does not fit the bundle: "
                             f"{'; '.join(mismatch(PRESETS[preset]))}")
        return PRESETS[preset], f"preset {preset} (random weights)", preset
    matched = [name for name, config in PRESETS.items() if not mismatch(config)]
    if len(matched) == 1:
        return (PRESETS[matched[0]], f"preset {matched[0]} matched to the bundle's model facts "
                                     f"(random weights)", matched[0])
    return None, "unknown: no checkpoint and no preset matches the bundle", None


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_isolated(job: str, settings: Any, workdir: Path) -> dict[str, Any]:
    """Run one job in a fresh interpreter; its JSON result, or a failure record."""
    settings_file = workdir / "settings.json"
    result_file = workdir / f"{job.replace(':', '_')}.json"
    settings_file.write_text(json.dumps(settings.to_dict()))
    command = [sys.executable, str(Path(__file__).resolve()), "--bundle", settings.bundle,
               "--worker", job, "--settings", str(settings_file), "--result", str(result_file)]
    proc = subprocess.run(command, env=_worker_env(settings.threads), capture_output=True,
                          text=True)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"status": "failed", "reason": f"worker exit {proc.returncode}: "
                                              + " | ".join(tail)}
    return json.loads(result_file.read_text())


def run_jobs(jobs: list[str], settings: Any, isolate: bool) -> dict[str, dict[str, Any]]:
    from bench._latency_jobs import run_job

    results = {}
    with tempfile.TemporaryDirectory(prefix="segclip-bench-") as tmp:
        for index, job in enumerate(jobs):
            key = f"{job}#{index}" if job in results else job
            start = time.perf_counter()
            print(f"[{index + 1}/{len(jobs)}] {job} ...", flush=True)
            if isolate:
                results[key] = run_isolated(job, settings, Path(tmp))
            else:
                try:
                    results[key] = run_job(job, settings)
                except Exception as e:  # recorded like a failed worker; the run goes on
                    results[key] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            status = results[key].get("status", "ok")
            reason = results[key].get("reason", "")
            print(f"    {status} in {time.perf_counter() - start:.1f} s"
                  + (f": {reason}" if reason else ""), flush=True)
    return results


def _gpu_present(machine: dict[str, Any]) -> bool:
    return bool(machine.get("gpu", {}).get("gpus"))


def collect(args: argparse.Namespace) -> dict[str, Any]:
    from bench._flops import TowerShape, count_with_torch, image_tower_flops, text_tower_flops
    from bench._latency_jobs import Settings
    from bench._machine import describe, machine_info, machine_slug
    from bench._towers import BACKENDS, read_manifest

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise UsageError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    try:
        manifest = read_manifest(args.bundle)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    config, source, preset = resolve_model(manifest, args.checkpoint, args.preset)
    machine = machine_info()
    print(describe(machine), flush=True)
    print(f"threads: {args.threads} intra-op (ORT, torch), 1 inter-op; model: {source}",
          flush=True)
    limits = {"warmup": args.warmup, "min_iters": args.min_iters, "max_iters": args.max_iters,
              "min_seconds": args.min_seconds, "max_seconds": args.max_seconds}
    settings = Settings(bundle=str(args.bundle.resolve()),
                        checkpoint=str(args.checkpoint.resolve()) if args.checkpoint else None,
                        preset=preset, threads=args.threads, batches=args.batch,
                        labels=args.labels, limits=limits, e2e_size=args.e2e_size,
                        trt_build=str(args.trt_build) if args.trt_build else None,
                        peak_size=args.peak_size)
    specs = [d.strip() for d in args.e2e.split(",") if d.strip()]
    bad = [d for d in specs if d != "cuda" and not d.startswith("cpu:")]
    if bad:
        raise UsageError(f"--e2e takes cpu:VARIANT (fp32, fp16, int8, ov-f32, ov-bf16, "
                         f"ov-int8, auto) and cuda, got {bad}")
    runnable = [d for d in specs if d != "cuda" or _gpu_present(machine)]
    together = [b for b in backends if b in INTERLEAVABLE] if args.interleave else []
    jobs = (["peak"] + ([f"interleaved:{','.join(together)}"] if together else [])
            + [f"backend:{b}" for b in backends if b not in together] + ["assign"]
            + [f"segment:{d}" for d in runnable] + ["peak"])
    raw = run_jobs(jobs, settings, not args.no_isolate)
    if together:
        shared = raw.get(f"interleaved:{','.join(together)}", {})
        for name, result in zip(together, shared.get("backends") or [shared] * len(together)):
            raw[f"backend:{name}"] = result
    e2e = [raw[f"segment:{d}"] for d in runnable]
    e2e += [{"device": "cuda", "variant": "runtime default", "status": "skipped",
             "reason": "no CUDA GPU on this machine"} for d in specs if d not in runnable]
    flops = None
    if config is not None:
        shape = TowerShape.from_config(config)
        flops = {"image_per_image": image_tower_flops(shape),
                 "text_per_label": text_tower_flops(shape), "shape": shape.__dict__,
                 "counted": "matrix products only (FLOP = 2 x MAC); see bench/_flops.py"}
        try:
            flops["torch_counter_per_image"] = count_with_torch(config, images=1)
        except ImportError:
            flops["torch_counter_per_image"] = None
    backend_results = [raw.get(f"backend:{b}", {"status": "failed"}) for b in backends]
    for name, result in zip(backends, backend_results):
        result.setdefault("backend", name)
    return {"benchmark": "latency", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine, "machine_slug": machine_slug(machine),
            "bundle": {"path": str(args.bundle), "model": manifest["model"],
                       "files": manifest["files"], "engines": manifest.get("engines", [])},
            "model_source": source, "settings": settings.to_dict(), "flops": flops,
            "peak": {"start": raw.get("peak"), "end": raw.get(f"peak#{len(jobs) - 1}")},
            "backends": backend_results, "assign": raw.get("assign"), "e2e": e2e,
            "skipped": skipped(backend_results, raw.get("assign"), e2e)}


def skipped(backends: list[dict[str, Any]], assign: dict[str, Any] | None,
            e2e: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every backend, case and stage that did not run, with its reason."""
    out = []
    for b in backends:
        if b.get("status") != "ok":
            out.append({"what": b["backend"], "reason": b.get("reason", "failed")})
            continue
        for stage, key in (("image", "batch"), ("text", "labels")):
            out += [{"what": f"{b['backend']} {stage} {key} {c[key]}", "reason": c["reason"]}
                    for c in b[stage] if c.get("status") != "ok"]
    if assign and assign.get("status") != "ok":
        out.append({"what": "assign", "reason": assign.get("reason", "failed")})
    out += [{"what": f"segment {e.get('device')} {e.get('variant')}",
             "reason": e.get("reason", "failed")} for e in e2e if e.get("status") != "ok"]
    return out


def print_summary(results: dict[str, Any]) -> None:
    from bench._summary import (
        E2E_HEADER,
        TOWER_HEADER,
        e2e_rows,
        target_rows,
        text_table,
        tower_rows,
    )

    for stage in ("image", "text"):
        header = [*TOWER_HEADER]
        header[1] = "batch" if stage == "image" else "labels"
        print(f"\n{stage} tower")
        print(text_table(header, tower_rows(results, stage)))
    assign = results.get("assign") or {}
    if assign.get("status") == "ok":
        print("\nlabel assignment (numpy, fused)")
        print(text_table(["labels", "output", "size", "median ms", "p99 ms", "peak RSS delta MB"],
                         [[str(c["labels"]), c["output"], "x".join(map(str, c["size"])),
                           f"{c['latency']['median_ms']:.2f}", f"{c['latency']['p99_ms']:.2f}",
                           f"{c['memory']['rss_peak_delta_mb']:.1f}"] for c in assign["cases"]]))
    for e2e in results["e2e"]:
        if e2e.get("status") == "ok":
            print(f"\nend-to-end segment ({e2e['device']}, {e2e['variant']}, image "
                  f"{e2e['image_size']}, {e2e['windows']} windows)")
            print(text_table(E2E_HEADER, e2e_rows(e2e)))
    print("\npeaks (GFLOP/s): " + ", ".join(f"{k} {v:.1f}"
                                            for k, v in results["peaks_gflops"].items()))
    loads = [(p or {}).get("load_average") for p in results["peak"].values()]
    print(f"load average (1, 5, 15 min) at the start / end peak measurement: {loads}")
    print("\nskipped:")
    for item in results["skipped"]:
        print(f"  {item['what']}: {item['reason']}")
    print("\ntargets (read, not asserted):")
    print(text_table(["target", "value", "goal", "status", "why"], target_rows(results)))


def worker_main(args: argparse.Namespace) -> None:
    from bench._latency_jobs import Settings, run_job

    settings = Settings(**json.loads(args.settings.read_text()))
    result = run_job(args.worker, settings)
    args.result.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    from bench._summary import derive

    try:
        results = derive(collect(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(results)
    out = args.out or ROOT / "bench" / "results" / results["machine_slug"] / "latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()

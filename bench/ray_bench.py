"""segclip on Ray against the same work without Ray, on one machine (docs/ray.md "Figures").

    python bench/ray_bench.py data --bundle DIR [--images 160] [--rounds 2] [--out FILE.json]
    python bench/ray_bench.py serve --bundle DIR [--requests 96] [--rounds 2] [--concurrency 16]

`data`: `run_images` (plain `segclip-run`, ONNX Runtime's default threads) and `run_images_ray`
with 1 actor (all CPUs, one ONNX Runtime thread per CPU) and 2 actors (half the CPUs each), on
the same synthetic JPEGs and labels, interleaved per round, each into a fresh folder. Ray is
started once before the rounds (its start-up time is reported apart); actor start-up is inside
each timed run. Reported: images/s per configuration (median over rounds) and the ratio to plain.

`serve`: `segclip-serve` (uvicorn, default threads) and, on one local Ray, two Serve applications
of the same bundle: 1 replica with all CPUs, and 2 replicas with half each. Each round sends
`--requests` requests from `--concurrency` client threads to each of the three in turn
(`bench/serve.py`'s client: multipart, keep-alive). Reported: requests/s, client p50/p99
latency, errors, mean batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/ray_bench.py` puts bench/, not the repo, first
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("data", "serve"))
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=int, default=160, help="data: images per run")
    parser.add_argument("--requests", type=int, default=96, help="serve: per server and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--size", default="375x500", help="HxW of the synthetic photos")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _write_images(folder: Path, count: int, size: str) -> None:
    from PIL import Image

    from bench._inputs import synthetic_scene

    height, width = (int(v) for v in size.lower().split("x"))
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        Image.fromarray(synthetic_scene(height, width, seed)).save(
            folder / f"scene{seed:04d}.jpg", quality=90)


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="segclip-bench-ray-") as scratch:
        return _bench_data(args, Path(scratch))


def _bench_data(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """`bench_data` with its input images and outputs under `root` (removed afterwards)."""
    import ray

    from bench._inputs import label_names
    from segclip.runtime.ray_run import run_images_ray
    from segclip.runtime.runner import run_images

    _write_images(root / "in", args.images, args.size)
    labels, cpus = label_names(args.labels), _cpus()
    began = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING")
    ray_start_s = time.perf_counter() - began
    configs = {"plain": lambda out: run_images(args.bundle, labels, [root / "in"], out,
                                               device="cpu", progress=False),
               "ray_1_actor": lambda out: run_images_ray(
                   args.bundle, labels, [root / "in"], out, device="cpu", progress=False,
                   actors=1, num_cpus=cpus),
               "ray_2_actors": lambda out: run_images_ray(
                   args.bundle, labels, [root / "in"], out, device="cpu", progress=False,
                   actors=2, num_cpus=cpus / 2)}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    try:
        for round_ in range(args.rounds):
            for name, run in configs.items():
                began = time.perf_counter()
                report = run(root / f"out-{name}-{round_}")
                walls[name].append(time.perf_counter() - began)
                assert report.processed == args.images and not report.failed, report.table()
                print(f"round {round_ + 1} {name}: {walls[name][-1]:.1f} s", flush=True)
    finally:
        ray.shutdown()
    rates = {name: args.images / statistics.median(w) for name, w in walls.items()}
    return {"bench": "ray-data", "images": args.images, "size": args.size, "cpus": cpus,
            "labels": len(labels), "ray_start_s": round(ray_start_s, 2),
            "wall_s": walls, "images_per_s": {k: round(v, 2) for k, v in rates.items()},
            "ratio_to_plain": {k: round(v / rates["plain"], 3) for k, v in rates.items()}}


def _wait_ready(url: str, times: int = 8) -> None:
    import httpx

    ready, deadline = 0, time.monotonic() + 300
    while ready < times:  # several in a row: every replica warmed up
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {url} not ready after 300 s")
        try:
            ready = ready + 1 if httpx.get(url + "/readyz", timeout=5).status_code == 200 else 0
        except httpx.TransportError:
            ready = 0
        time.sleep(0.1)


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from bench._inputs import label_names
    from bench._serve_direct import SERVER_QUEUE
    from bench.serve import encode_bodies, make_images, run_server, start_server
    from segclip.runtime.serve.ray import RayServeOptions, build_app
    from segclip.runtime.serve.settings import ServeSettings

    labels, cpus = label_names(args.labels), _cpus()
    bodies = encode_bodies(make_images(args.size), labels)
    plain_args = argparse.Namespace(bundle=args.bundle, max_batch=16, max_wait_ms=5.0,
                                    timeout_s=600.0, threads=None, variant=None,
                                    server_cpus=None)
    scratch = tempfile.TemporaryDirectory(prefix="segclip-bench-")  # the plain server's log
    process, plain_url = start_server(plain_args, Path(scratch.name) / "log")
    port = int(plain_url.rsplit(":", 1)[1]) + 1
    settings = ServeSettings(queue=SERVER_QUEUE, timeout_s=600.0)  # as start_server's
    try:
        ray.init(address="local", num_cpus=2 * cpus, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = {"segclip-serve": plain_url}
        for name, replicas in (("ray-1-replica", 1), ("ray-2-replicas", 2)):
            options = RayServeOptions(bundle=str(args.bundle), device="cpu", replicas=replicas,
                                      num_cpus=cpus / replicas, name=name, settings=settings)
            serve.run(build_app(options), name=name, route_prefix=f"/{name}")
            urls[name] = f"http://127.0.0.1:{port}/{name}"
        raw: dict[str, list[dict]] = {name: [] for name in urls}
        for url in urls.values():
            _wait_ready(url)
            run_server(url, bodies, 8, 2)  # warm-up: label set, both towers
        for round_ in range(args.rounds):
            for name, url in urls.items():
                raw[name].append(run_server(url, bodies, args.requests, args.concurrency))
                print(f"round {round_ + 1} {name}: {raw[name][-1]['wall_s']:.1f} s",
                      flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
        scratch.cleanup()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return {"bench": "ray-serve", "concurrency": args.concurrency, "cpus": cpus,
            "requests_per_round": args.requests, "rounds": args.rounds, "size": args.size,
            "labels": len(labels), "servers": {name: _summary(runs) for name, runs in raw.items()}}


def _summary(runs: list[dict]) -> dict[str, Any]:
    from bench._stats import percentile

    latencies = [s * 1e3 for r in runs for s in r["latencies_s"]]
    if not latencies:
        statuses = sorted({s for r in runs for s in r["error_statuses"]})
        raise SystemExit(f"error: every request failed (HTTP statuses {statuses})")
    batches = [b for r in runs for b in r["batch_sizes"]]
    ok = sum(r["requests"] - r["errors"] for r in runs)
    return {"requests_per_s": round(ok / sum(r["wall_s"] for r in runs), 2),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "errors": sum(r["errors"] for r in runs),
            "batch_size_mean": round(sum(batches) / max(1, len(batches)), 2)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = bench_data(args) if args.kind == "data" else bench_serve(args)
    results["load_average_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

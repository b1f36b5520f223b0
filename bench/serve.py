"""segclip-serve under a bounded client load, against the same work through `Segmenter` directly.

    python bench/serve.py --bundle DIR [--concurrency 1,4,16] [--requests 96] [--rounds 3]
        [--labels 20] [--size 375x500] [--threads N] [--max-batch 16] [--max-wait-ms 5]
        [--variant fp32] [--timeout-s 600] [--server-cpus 0] [--client-cpus 1]
        [--client lean|stdlib] [--out FILE.json]

Each round starts `segclip-serve` on 127.0.0.1 (a free port) and a process with a `Segmenter` on
the same bundle with the same threads (both fresh each round: see `DirectProcess`), then runs,
for every concurrency level, first the direct baseline and then the server, so load from other
work hits both alike. At concurrency 1 the baseline is `Segmenter.segment` on the encoded image
(decoding included), alternated request by request with the server (each pair's server /
direct ratio is reported too), and each pair is followed by the same request through the app
in the baseline's process without HTTP (`InProcessApp`) and by a `GET /healthz` round trip. At
concurrency c > 1 the baseline is `Segmenter.segment_batch` on chunks of min(c, max_batch)
images. The server gets `--requests` requests per level and round from c client threads (one
keep-alive connection each; requests serialized once before timing (h11), responses parsed by
httptools, or `--client stdlib`: `http.client`; the label map PNG in the response, its JSON
parsed).

Reported per level: requests/s, client latency p50/p90/p99, the server's per-stage
p50/p90/p99 (`timings_ms`), errors, batch sizes; the server's RSS after warm-up and at the end
of each round. Ratios: server latency / direct latency at concurrency 1 (and the app without
HTTP / direct), server throughput / direct batched throughput at the highest concurrency. With
the lean client on Linux a server latency is also taken to the reply's arrival at the client's
socket (the kernel's receive timestamp): what the server and the network took, without the
client's CPU waking up to read it; each round's median pair ratio is reported both ways.
`--server-cpus` pins the server and the baseline's process, `--client-cpus` the client threads
(as if the clients ran on other machines); without them nothing is pinned.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/serve.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

from bench._serve_clients import CLIENTS, Reply  # noqa: E402 - after the path fix above
from bench._serve_direct import (  # noqa: E402
    SERVER_QUEUE,
    STARTUP_S,
    DirectProcess,
    after_one,
    pin,
)

STAGES = ("queue", "decode", "preprocess", "text", "image", "assign", "encode", "total")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=96, help="per level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--size", default="375x500", help="HxW of the synthetic photos")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="the server's --timeout-s (long: a CPU batch of 16 takes seconds)")
    parser.add_argument("--server-cpus", type=_cpus, default=None,
                        help="CPUs for the server and the direct baseline, e.g. 0 (Linux)")
    parser.add_argument("--client-cpus", type=_cpus, default=None,
                        help="CPUs for the client threads, e.g. 1: clients off the server's "
                             "CPUs, as when they run on other machines")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="lean",
                        help="lean: requests serialized once (h11), responses parsed by "
                             "httptools; stdlib: http.client")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _cpus(text: str) -> frozenset[int]:
    """'0', '0,1' or '0-3' -> CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (e.g. 0 or 0,1 or 0-3)"
                                         ) from None
    return frozenset(cpus)


def _plain(value: Any) -> Any:
    """An option as JSON holds it."""
    if isinstance(value, Path):
        return str(value)
    return sorted(value) if isinstance(value, frozenset) else value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "segclip.runtime.serve.cli", "--engine", str(args.bundle),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--queue", str(SERVER_QUEUE), "--timeout-s", str(args.timeout_s)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.variant:
        command += ["--variant", args.variant]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:  # whatever stops the start (a bad CPU list, a timeout, Ctrl-C), no server is left behind
        if args.server_cpus:  # before the server starts its engine threads, which inherit it
            os.sched_setaffinity(process.pid, args.server_cpus)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"error: segclip-serve exited: {log.read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"error: segclip-serve not ready after {STARTUP_S} s")
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.wait()
        raise


def make_images(size: str, count: int = 8) -> list[bytes]:
    from PIL import Image

    from bench._inputs import synthetic_scene

    height, width = (int(v) for v in size.lower().split("x"))
    out = []
    for seed in range(count):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(height, width, seed)).save(buffer, format="JPEG",
                                                                   quality=90)
        out.append(buffer.getvalue())
    return out


def encode_bodies(images: list[bytes], labels: list[str]) -> list[tuple[bytes, str]]:
    """(multipart body, its Content-Type) per image: field `image` (JPEG) and `labels` (JSON)."""
    from urllib3 import encode_multipart_formdata

    return [encode_multipart_formdata({"labels": json.dumps(labels),
                                       "image": ("image.jpg", data, "image/jpeg")})
            for data in images]


def run_server(url: str, bodies: list[tuple[bytes, str]], requests: int, concurrency: int,
               client_cpus: frozenset[int] | None = None, client: str = "lean",
               ) -> dict[str, Any]:
    def load(worker: int) -> list[Reply]:
        session = CLIENTS[client](url, bodies)
        try:
            return [session.post(index) for index in range(worker, requests, concurrency)]
        finally:
            session.close()

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency, initializer=pin, initargs=(client_cpus,)) as pool:
        results = [r for rs in pool.map(load, range(concurrency)) for r in rs]
    wall = time.perf_counter() - began
    return _server_result(results, wall)


def run_paired(direct: DirectProcess, url: str, bodies: list[tuple[bytes, str]], requests: int,
               client_cpus: frozenset[int] | None = None, client: str = "lean",
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[float]]]:
    """Concurrency 1 as pairs: each image through `Segmenter.segment` (in `direct`), then at
    once through the server, so both see the same moment's load; also each pair's server /
    direct ratio. After each pair: the same request through the app in `direct`'s process
    without HTTP (the direct result's `in_process_s`), and a `GET /healthz` round trip (the
    server's `pings_s`: what HTTP on this machine costs a request that does no work). The
    requests go out from a client thread (on `client_cpus`); each is timed there. The ratios
    come in the client (`client`) and at its socket (`socket`, where the client can tell).

    Every timed call comes `after_one` on the next image on its own side: the sides share the
    CPU, and a call right after another process's model runs on caches that process filled."""
    direct_s, served, pings, in_process = [], [], [], []
    ratios: dict[str, list[float]] = {"client": [], "socket": []}
    session = CLIENTS[client](url, bodies)
    poster = ThreadPoolExecutor(1, initializer=pin, initargs=(client_cpus,))
    try:
        for index in range(requests):
            direct_s.append(direct.segment(index))
            reply = poster.submit(after_one, session.post, index).result()
            served.append(reply)
            if reply.status == 200:
                ratios["client"].append(reply.latency_s / direct_s[-1])
                if reply.at_socket_s is not None:
                    ratios["socket"].append(reply.at_socket_s / direct_s[-1])
            in_process.append(direct.app(index))
            pings.append(poster.submit(session.ping).result())
    finally:
        poster.shutdown()
        session.close()
    return ({"latencies_s": direct_s, "wall_s": sum(direct_s), "images": requests, "chunk": 1,
             "in_process_s": in_process},
            {**_server_result(served, sum(r.latency_s for r in served)), "pings_s": pings},
            ratios)


def _server_result(results: list[Reply], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    return {"latencies_s": [r.latency_s for r in ok], "wall_s": wall,
            "at_socket_s": [r.at_socket_s for r in ok if r.at_socket_s is not None],
            "errors": len(results) - len(ok), "requests": len(results),
            "error_statuses": sorted(r.status for r in results if r.status != 200),
            "stages_ms": {s: [r.body["timings_ms"][s] for r in ok] for s in STAGES},
            "batch_sizes": [r.body["batch_size"] for r in ok]}


def _pcts(values_ms: list[float]) -> dict[str, float]:
    from bench._stats import percentile

    if not values_ms:
        return {}
    return {f"p{q}_ms": round(percentile(values_ms, q), 3) for q in (50, 90, 99)}


def summarize_level(direct: list[dict], server: list[dict]) -> dict[str, Any]:
    from bench._stats import summarize

    d_lat = [s for r in direct for s in r["latencies_s"]]
    s_lat = [s for r in server for s in r["latencies_s"]]
    d_images = sum(r["images"] for r in direct)
    s_ok = sum(r["requests"] - r["errors"] for r in server)
    stages = {s: _pcts([v for r in server for v in r["stages_ms"][s]]) for s in STAGES}
    batches = [b for r in server for b in r["batch_sizes"]]
    pings = [p for r in server for p in r.get("pings_s", [])]
    in_process = [t for r in direct for t in r.get("in_process_s", [])]
    level = {"direct": {"chunk": direct[0]["chunk"], "calls": len(d_lat),
                       "latency_per_call": summarize(d_lat),
                       "images_per_s": d_images / sum(r["wall_s"] for r in direct)},
            "server": {"requests": sum(r["requests"] for r in server),
                       "errors": sum(r["errors"] for r in server),
                       "error_statuses": sorted(s for r in server for s in r["error_statuses"]),
                       "requests_per_s": s_ok / sum(r["wall_s"] for r in server),
                       "latency": summarize(s_lat), "stages_ms": stages,
                       "batch_size_mean": sum(batches) / max(1, len(batches)),
                       "batch_size_max": max(batches, default=0)}}
    at_socket = [t for r in server for t in r.get("at_socket_s", [])]
    if at_socket:
        level["server"]["latency_at_socket"] = summarize(at_socket)
    if pings:
        level["server"]["healthz_round_trip"] = summarize(pings)
    if in_process:
        level["direct"]["app_in_process"] = summarize(in_process)
    return level


def collect(args: argparse.Namespace) -> dict[str, Any]:
    from bench._inputs import label_names
    from bench._machine import machine_info, machine_slug
    from bench._stats import percentile

    levels = [int(c) for c in args.concurrency.split(",")]
    labels = label_names(args.labels)
    images = make_images(args.size)
    bodies = encode_bodies(images, labels)
    info = machine_info()
    raw: dict[int, dict[str, list]] = {c: {"direct": [], "server": []} for c in levels}
    # concurrency 1: per-pair server / direct latency, in the client and at its socket
    paired: dict[str, list[float]] = {"client": [], "socket": []}
    round_medians: dict[str, list[float]] = {"client": [], "socket": []}
    rss: list[dict[str, int]] = []  # per round: the server's RSS after warm-up and at the end
    # the server log lives as long as the run (a server that fails to start has it quoted)
    with tempfile.TemporaryDirectory(prefix="segclip-bench-serve-") as scratch:
        for round_ in range(args.rounds):  # a fresh server and direct process each round
            process, url = start_server(args, Path(scratch) / "server.log")
            direct: DirectProcess | None = None
            try:
                direct = DirectProcess(args, images, labels, bodies)
                direct.run(4, 1)  # warm both sides
                run_server(url, bodies, 4, 1, args.client_cpus, args.client)
                rss.append({"after_warm_up": _rss_kib(process.pid)})
                server_affinity = sorted(os.sched_getaffinity(process.pid))
                for c in levels:
                    if c == 1:
                        d, served, pair_ratios = run_paired(direct, url, bodies, args.requests,
                                                            args.client_cpus, args.client)
                        raw[c]["direct"].append(d)
                        raw[c]["server"].append(served)
                        for where, values in pair_ratios.items():
                            paired[where] += values
                            if values:
                                round_medians[where].append(round(percentile(values, 50), 4))
                    else:
                        raw[c]["direct"].append(direct.run(args.requests, c))
                        raw[c]["server"].append(run_server(url, bodies, args.requests, c,
                                                           args.client_cpus, args.client))
                    print(f"round {round_ + 1}/{args.rounds} concurrency {c}: done", flush=True)
                rss[-1]["end"] = _rss_kib(process.pid)
            finally:
                if direct is not None:
                    direct.close()
                process.terminate()
                process.wait(timeout=60)
    results = {c: summarize_level(raw[c]["direct"], raw[c]["server"]) for c in levels}
    if 1 in results:
        results[1]["paired_ratios"] = [round(r, 4) for r in paired["client"]]
        results[1]["paired_ratios_at_socket"] = [round(r, 4) for r in paired["socket"]]
        results[1]["paired_medians_by_round"] = round_medians
    c1, top = results.get(1), results[max(levels)]
    ratios = {}
    if c1:
        direct_p50 = c1["direct"]["latency_per_call"]["median_ms"]
        ratios["latency_c1_server_over_direct"] = c1["server"]["latency"]["median_ms"] / direct_p50
        ratios["latency_c1_paired_median"] = (percentile(paired["client"], 50)
                                              if paired["client"] else None)
        at_socket = c1["server"].get("latency_at_socket")
        ratios["latency_c1_at_socket_over_direct"] = (at_socket["median_ms"] / direct_p50
                                                      if at_socket else None)
        ratios["latency_c1_app_in_process_over_direct"] = (
            c1["direct"]["app_in_process"]["median_ms"] / direct_p50)
    ratios[f"throughput_c{max(levels)}_server_over_direct_batched"] = (
        top["server"]["requests_per_s"] / top["direct"]["images_per_s"])
    return {"bench": "serve", "bundle": str(args.bundle), "machine": info,
            "machine_slug": machine_slug(info), "load_average_end": os.getloadavg(),
            "options": {k: _plain(v) for k, v in vars(args).items()},
            "labels": len(labels), "image_size": args.size,
            "rss_kib": {"rounds": rss, "after_warm_up": max(r["after_warm_up"] for r in rss),
                        "end": max(r["end"] for r in rss)},
            "server_affinity": server_affinity,
            "levels": {str(c): results[c] for c in levels}, "ratios": ratios,
            "targets": [{"target": "server latency at concurrency 1 <= 1.10x direct",
                         "value": ratios.get("latency_c1_server_over_direct")},
                        {"target": "server latency at concurrency 1, to the client's socket, "
                                   "<= 1.10x direct",
                         "value": ratios.get("latency_c1_at_socket_over_direct")},
                        {"target": f"server throughput at concurrency {max(levels)} >= 0.9x "
                                   f"direct batched",
                         "value": ratios[f"throughput_c{max(levels)}_server_over_direct_batched"]}]}


def print_summary(results: dict[str, Any]) -> None:
    print(f"\n{results['bundle']}: {results['labels']} labels, {results['image_size']} images, "
          f"load average at end {[round(v, 2) for v in results['load_average_end']]}")
    print("| concurrency | direct img/s | server req/s | direct p50 ms | server p50 / p90 / p99 "
          "ms | server image p50 ms | queue p50 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, level in results["levels"].items():
        d, s = level["direct"], level["server"]
        lat = s["latency"]
        print(f"| {c} | {d['images_per_s']:.1f} | {s['requests_per_s']:.1f} | "
              f"{d['latency_per_call']['median_ms']:.1f} (x{d['chunk']}) | "
              f"{lat['median_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f} | "
              f"{s['stages_ms']['image'].get('p50_ms', float('nan')):.1f} | "
              f"{s['stages_ms']['queue'].get('p50_ms', float('nan')):.2f} | "
              f"{s['batch_size_mean']:.2f} | {s['errors']} |")
    rss = results["rss_kib"]
    print("server RSS per round, after warm-up -> end: " + ", ".join(
        f"{r['after_warm_up'] / 1024:.1f} -> {r['end'] / 1024:.1f} MiB" for r in rss["rounds"]))
    in_process = results["ratios"].get("latency_c1_app_in_process_over_direct")
    if in_process is not None:
        print(f"concurrency 1, the app in process without HTTP / direct: {in_process:.3f}x "
              f"(p50 {results['levels']['1']['direct']['app_in_process']['median_ms']:.2f} ms)")
    ping = results["levels"].get("1", {}).get("server", {}).get("healthz_round_trip")
    if ping:
        print(f"concurrency 1, GET /healthz round trip (HTTP on this machine, no work): "
              f"p50 {ping['median_ms']:.3f} ms")
    paired = results["ratios"].get("latency_c1_paired_median")
    if paired is not None:
        print(f"concurrency 1, median of the per-request server / direct ratios: {paired:.3f}x")
        by_round = results["levels"]["1"].get("paired_medians_by_round", {})
        for where, medians in by_round.items():
            if medians:
                print(f"concurrency 1, that median per round ({where}): "
                      + ", ".join(f"{m:.3f}" for m in medians))
    for target in results["targets"]:
        value = target["value"]
        print(f"{target['target']}: {'-' if value is None else f'{value:.3f}x'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.bundle / "segclip.json").is_file():
        print(f"error: {args.bundle} is not a bundle directory (no segclip.json)",
              file=sys.stderr)
        raise SystemExit(2)
    results = collect(args)
    print_summary(results)
    name = f"serve-{args.bundle.name}.json"
    out = args.out or ROOT / "bench" / "results" / results["machine_slug"] / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()

"""bench/serve.py end to end on a tiny bundle: a server, a short bounded load at two
concurrencies, well-formed JSON whose counts and ratios follow from its own figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench_helpers import run_script

from bench._serve_clients import SO_TIMESTAMPNS

pytest.importorskip("fastapi")


def test_serve_bench_runs_and_reports(bench_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = run_script("serve.py", "--bundle", str(bench_bundle), "--concurrency", "1,3",
                      "--requests", "6", "--rounds", "1", "--labels", "4", "--size", "64x96",
                      "--threads", "1", "--out", str(out))
    results = json.loads(out.read_text())
    assert set(results["levels"]) == {"1", "3"}
    for level in results["levels"].values():
        server, direct = level["server"], level["direct"]
        assert server["requests"] == 6 and server["errors"] == 0
        assert server["latency"]["n"] == 6 and server["requests_per_s"] > 0
        assert direct["images_per_s"] > 0
        assert server["stages_ms"]["image"]["p50_ms"] <= server["stages_ms"]["total"]["p50_ms"]
    assert results["levels"]["3"]["direct"]["chunk"] == 3
    c1 = results["levels"]["1"]
    assert results["ratios"]["latency_c1_server_over_direct"] == pytest.approx(
        c1["server"]["latency"]["median_ms"] / c1["direct"]["latency_per_call"]["median_ms"])
    pairs = c1["paired_ratios"]  # each request's server / direct latency
    assert len(pairs) == 6 and c1["direct"]["latency_per_call"]["n"] == 6
    assert results["ratios"]["latency_c1_paired_median"] == pytest.approx(
        sorted(pairs)[2:4][0] / 2 + sorted(pairs)[2:4][1] / 2, rel=1e-3)
    assert "per-request server / direct ratios" in proc.stdout
    assert c1["paired_medians_by_round"]["client"] == [
        pytest.approx(results["ratios"]["latency_c1_paired_median"], abs=1e-4)]
    at_socket = c1["paired_ratios_at_socket"]
    if SO_TIMESTAMPNS is not None:  # the reply reaches the socket before the client reads it
        assert len(at_socket) == 6
        assert all(s <= c + 1e-3 for s, c in zip(at_socket, pairs))
        assert results["ratios"]["latency_c1_at_socket_over_direct"] == pytest.approx(
            c1["server"]["latency_at_socket"]["median_ms"]
            / c1["direct"]["latency_per_call"]["median_ms"])
        assert "to the client's socket" in proc.stdout
    assert results["rss_kib"]["after_warm_up"] > 0 and results["rss_kib"]["end"] > 0
    assert c1["server"]["healthz_round_trip"]["n"] == 6  # one GET /healthz after each pair
    assert results["options"]["client"] == "lean"
    assert "server latency at concurrency 1" in proc.stdout and "| 3 |" in proc.stdout


def test_serve_bench_pins_server_and_clients(bench_bundle: Path, tmp_path: Path) -> None:
    """Pinned, two rounds (a fresh server and direct process each), the http.client client."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    server, client = cpus[0], cpus[-1]
    out = tmp_path / "serve.json"
    run_script("serve.py", "--bundle", str(bench_bundle), "--concurrency", "1,2",
               "--requests", "4", "--rounds", "2", "--labels", "2", "--size", "48x64",
               "--threads", "1", "--server-cpus", str(server), "--client-cpus", str(client),
               "--client", "stdlib", "--out", str(out))
    results = json.loads(out.read_text())
    assert len(results["rss_kib"]["rounds"]) == 2
    assert all(level["server"]["requests"] == 8 for level in results["levels"].values())
    assert results["server_affinity"] == [server]
    assert results["options"]["server_cpus"] == [server]
    assert results["options"]["client_cpus"] == [client]
    assert all(level["server"]["errors"] == 0 for level in results["levels"].values())
    # http.client cannot tell when a reply reached the socket: no such figure, not a made-up one
    assert results["ratios"]["latency_c1_at_socket_over_direct"] is None
    assert "latency_at_socket" not in results["levels"]["1"]["server"]


def test_serve_bench_refuses_a_bad_cpu_list(bench_bundle: Path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    proc = subprocess.run([sys.executable, str(bench), "--bundle", str(bench_bundle),
                           "--server-cpus", "zero"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a CPU list" in proc.stderr


def test_a_failed_server_start_leaves_no_server(bench_bundle: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import subprocess

    from bench import serve as bench_serve

    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(bench_serve.subprocess, "Popen", Recorded)
    args = argparse.Namespace(bundle=bench_bundle, max_batch=4, max_wait_ms=5.0, timeout_s=60.0,
                              threads=1, variant=None, server_cpus=frozenset({1_000_000}))
    with pytest.raises(OSError):  # no such CPU: the affinity call fails after the start
        bench_serve.start_server(args, tmp_path / "log")
    assert len(started) == 1 and started[0].poll() is not None

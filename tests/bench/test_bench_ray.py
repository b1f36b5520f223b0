"""bench/ray_bench.py end to end on a tiny bundle: both modes run on a local Ray bound to
127.0.0.1 (started and stopped by the script), and their JSON follows from its own figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench_helpers import run_script

pytest.importorskip("ray")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.ray


def test_ray_bench_data(bench_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    run_script("ray_bench.py", "data", "--bundle", str(bench_bundle), "--images", "6",
               "--rounds", "1", "--labels", "3", "--size", "48x64", "--out", str(out))
    results = json.loads(out.read_text())
    rates = results["images_per_s"]
    assert set(rates) == {"plain", "ray_1_actor", "ray_2_actors"} and results["images"] == 6
    for name, rate in rates.items():
        assert rate > 0
        assert results["ratio_to_plain"][name] == pytest.approx(rate / rates["plain"], abs=2e-3)


def test_ray_bench_serve(bench_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    run_script("ray_bench.py", "serve", "--bundle", str(bench_bundle), "--requests", "6",
               "--rounds", "1", "--concurrency", "2", "--labels", "3", "--size", "48x64",
               "--out", str(out))
    servers = json.loads(out.read_text())["servers"]
    assert set(servers) == {"segclip-serve", "ray-1-replica", "ray-2-replicas"}
    for figures in servers.values():  # every request answered, through each route prefix
        assert figures["errors"] == 0 and figures["requests_per_s"] > 0
        assert 1 <= figures["batch_size_mean"] <= 2
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]

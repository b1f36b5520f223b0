"""`segclip-serve --ray` (runtime/serve/ray.py): the app on 2 Ray Serve replicas over HTTP on
127.0.0.1 answers /v1/segment with the label maps of segclip-run (byte for byte), shares
registered label sets across replicas, serves /readyz and /metrics, and answers client errors
with problem+json; `RayEngine` refuses past its queue (503) and batches concurrent jobs. One
in-process Ray (127.0.0.1, 2 CPUs) for the module, Serve and Ray stopped at the end."""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serve_support import assert_problem, free_port, image_bytes, segment_multipart
from typer.testing import CliRunner

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")

LABELS = ["red square", "blue circle", "cat"]
KEY = "k3y-for-tests"
STARTUP_S = 120.0


@pytest.fixture(scope="module")
def deployment(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from segclip.runtime.serve.ray import build_app

    keys = tmp_path_factory.mktemp("ray-serve") / "keys.txt"
    keys.write_text(f"# test key\n{KEY}\n")
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"bundle": str(tiny_bundle), "device": "cpu", "replicas": "2",
                             "max_body_mb": "1", "api_key_file": str(keys)}),
                  name="segclip", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(deployment: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        ready, until = 0, time.monotonic() + STARTUP_S
        while ready < 6 and time.monotonic() < until:  # both replicas warmed up
            ready = ready + 1 if client.get("/readyz").status_code == 200 else 0
            time.sleep(0.05)
        assert ready >= 6, "the replicas did not become ready"
        yield client


@pytest.fixture(scope="module")
def reference(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """segclip-run's label-map PNGs for three images at two thresholds."""
    from segclip.runtime.runner import run_images

    root = tmp_path_factory.mktemp("ray-serve-run")
    images = {}
    for seed, (height, width) in enumerate([(90, 150), (64, 64), (120, 70)]):
        images[seed] = root / f"img{seed}.png"
        images[seed].write_bytes(image_bytes(height, width, seed))
    pngs = {}
    for threshold in (0.0, 0.5):
        out = root / f"out{threshold}"
        report = run_images(tiny_bundle, LABELS, list(images.values()), out, threshold=threshold,
                            device="cpu", progress=False)
        assert report.processed == len(images) and not report.failed
        for seed in images:
            pngs[seed, threshold] = (out / f"img{seed}.png").read_bytes()
    return {"images": images, "pngs": pngs}


def test_two_replicas_serve_the_app(client: httpx.Client) -> None:
    from ray import serve

    status = serve.status().applications["segclip"]
    states = status.deployments["SegclipReplica"].replica_states
    assert states == {"RUNNING": 2}, states
    assert client.get("/healthz").json() == {"status": "alive"}
    model = client.get("/v1/model").json()
    assert model["backend"] == "onnxruntime/CPUExecutionProvider" and model["ready"] is True
    assert model["limits"]["max_body_mb"] == 1.0
    assert "<html" in client.get("/").text.lower()


def test_label_maps_equal_segclip_run(client: httpx.Client, reference: dict) -> None:
    jobs = [(seed, threshold) for seed in reference["images"] for threshold in (0.0, 0.5)] * 3

    def one(job: tuple[int, float]) -> tuple[tuple[int, float], bytes, int]:
        seed, threshold = job
        data = reference["images"][seed].read_bytes()
        response = segment_multipart(client, data, LABELS, threshold=str(threshold))
        assert response.status_code == 200, response.text
        body = response.json()
        return job, base64.b64decode(body["label_map"]["data"]), body["batch_size"]

    with ThreadPoolExecutor(8) as pool:  # concurrent: batched within and across replicas
        answers = list(pool.map(one, jobs))
    for job, png, batch_size in answers:
        assert png == reference["pngs"][job], job
        assert 1 <= batch_size <= 16
    plain = client.post("/v1/segment", files={"image": ("a.png", reference["images"][1]
                                                        .read_bytes(), "image/png")},
                        data={"labels": "\n".join(LABELS)}, headers={"Accept": "image/png"})
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
    assert plain.headers["x-segclip-labels"] == '["red square", "blue circle", "cat"]'


def test_label_sets_are_shared_by_the_replicas(client: httpx.Client, reference: dict) -> None:
    registered = client.post("/v1/label-sets", json={"labels": LABELS}).json()
    assert registered["labels"] == LABELS
    store = ray.get_actor("segclip-label-sets", namespace="segclip")
    assert ray.get(store.get.remote(registered["id"])) == LABELS
    data = reference["images"][0].read_bytes()
    for _ in range(10):  # each request may land on either replica
        response = segment_multipart(client, data, label_set=registered["id"], threshold="0.5")
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["label_map"]["data"]) == \
            reference["pngs"][0, 0.5]
    assert_problem(segment_multipart(client, data, label_set="ls_unknown"), 422, "label_set")


def test_metrics_and_readiness(client: httpx.Client) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'segclip_requests_total{method="GET",route="/readyz",status="200"}' in metrics.text


def test_client_errors_are_problems(deployment: str, client: httpx.Client) -> None:
    good = image_bytes(40, 40, 3)
    b64 = base64.b64encode(good).decode()
    with httpx.Client(base_url=deployment, timeout=30) as anonymous:
        assert_problem(segment_multipart(anonymous, good, LABELS), 401, "API key")
    assert_problem(client.post("/v1/segment", content=b"{nope",
                               headers={"content-type": "application/json"}), 400, "JSON")
    assert_problem(segment_multipart(client, b"\0" * (1024 * 1024 + 1), LABELS), 413,
                   "--max-body-mb")
    assert_problem(segment_multipart(client, b"not an image at all", LABELS), 415, "image")
    assert_problem(client.post("/v1/segment", json={"image": b64, "labels": []}), 422, "empty")
    assert_problem(segment_multipart(client, good, LABELS, threshold="1.5"), 422, "threshold")


async def _engine_scenario(bundle: str) -> dict:
    """Inside a Serve replica (`@serve.batch` needs one): three jobs fill a RayEngine's queue
    of 3 while its batch window is open, a fourth is refused, the three run as one batch."""
    from ray import serve

    from segclip.runtime.segmenter import Segmenter
    from segclip.runtime.serve.engine import QueueFull
    from segclip.runtime.serve.ray import RayEngine
    from segclip.runtime.serve.requests import SegmentJob
    from segclip.runtime.serve.settings import ServeSettings

    images = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)]
    settings = ServeSettings(max_batch=4, max_wait_ms=1000, queue=3)  # 3 jobs: not full
    engine = RayEngine(Segmenter(bundle, device="cpu", threads=1), settings, serve)
    await engine.start()
    try:
        jobs = [asyncio.ensure_future(engine.segment(SegmentJob(image, tuple(LABELS), None)))
                for image in images]
        await asyncio.sleep(0.05)
        depth_waiting = engine.queue_depth
        try:
            await engine.segment(SegmentJob(images[0], tuple(LABELS), None))
            refused = ""
        except QueueFull as e:
            refused = str(e)
        results = await asyncio.gather(*jobs)
        return {"waiting": depth_waiting, "refused": refused, "after": engine.queue_depth,
                "batch_sizes": [r.batch_size for r in results],
                "first": [r.first_in_batch for r in results],
                "maps": [r.result.label_map for r in results]}
    finally:
        await engine.close()


def test_ray_engine_batches_and_refuses_past_its_queue(deployment: str,
                                                       tiny_bundle: Path) -> None:
    from ray import cloudpickle, serve

    from segclip.runtime.segmenter import Segmenter

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class EngineProbe:
        async def run(self, bundle: str) -> dict:
            return await _engine_scenario(bundle)

    handle = serve.run(EngineProbe.bind(), name="engine-probe", route_prefix=None)
    try:
        outcome = handle.run.remote(str(tiny_bundle)).result(timeout_s=STARTUP_S)
    finally:
        serve.delete("engine-probe")
    assert outcome["waiting"] == 3 and "already waiting" in outcome["refused"]
    assert outcome["after"] == 0
    assert outcome["batch_sizes"] == [3, 3, 3] and sum(outcome["first"]) == 1
    images = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)]
    with Segmenter(tiny_bundle, device="cpu") as segmenter:
        for image, label_map in zip(images, outcome["maps"]):
            np.testing.assert_array_equal(label_map, segmenter.segment(image, LABELS).label_map)


def test_without_ray_installed_one_line(tiny_bundle: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from segclip.runtime.serve.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(app, ["--engine", str(tiny_bundle), "--ray", "--port",
                                      str(free_port())])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'segclip[ray]'" in lines[0], result.stderr


def test_bad_bundle_is_one_line_before_ray_starts(tmp_path: Path) -> None:
    from segclip.runtime.serve.cli import app

    result = CliRunner().invoke(app, ["--engine", str(tmp_path / "missing"), "--ray",
                                      "--replicas", "2", "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0]
    bad = CliRunner().invoke(app, ["--engine", str(tmp_path), "--ray", "--replicas", "0"])
    assert bad.exit_code == 2 and "replicas must be >= 1" in bad.stderr
    plain = CliRunner().invoke(app, ["--engine", str(tmp_path), "--replicas", "2"])
    assert plain.exit_code == 2 and "--replicas only apply with --ray" in plain.stderr

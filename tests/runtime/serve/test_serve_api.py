"""segclip-serve through a real server process on 127.0.0.1 (docs/serve.md): every route, the
label map equal to segclip-run's file byte for byte, RLE masks that decode to the label map, label
sets, metrics, and each client-error status as an RFC 9457 problem."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serve_support import Server, assert_problem, image_bytes, segment_multipart, serve
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("pycocotools")

LABELS = ["red square", "blue circle", "cat"]
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_bundle, tmp_path_factory.mktemp("serve-api"), "--max-body-mb", "1",
               "--max-pixels", str(MAX_PIXELS)) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def run_outputs(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """segclip-run's label-map PNGs for three images at two thresholds (the reference). The
    third is over `INLINE_PIXELS`, so the server decodes and encodes it in its codec threads."""
    from segclip.runtime.runner import run_images
    from segclip.runtime.serve.route import INLINE_PIXELS

    sizes = [(90, 150), (64, 64), (600, 900)]
    assert sizes[0][0] * sizes[0][1] <= INLINE_PIXELS < sizes[2][0] * sizes[2][1] <= MAX_PIXELS
    root = tmp_path_factory.mktemp("serve-run")
    images = {}
    for seed, (height, width) in enumerate(sizes):
        path = root / f"img{seed}.png"
        path.write_bytes(image_bytes(height, width, seed))
        images[seed] = path
    pngs = {}
    for threshold in (0.0, 0.5):
        out = root / f"out{threshold}"
        report = run_images(tiny_bundle, LABELS, list(images.values()), out, threshold=threshold,
                            device="cpu", progress=False)
        assert report.processed == len(images) and not report.failed
        for seed in images:
            pngs[seed, threshold] = (out / f"img{seed}.png").read_bytes()
    return {"images": images, "pngs": pngs}


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_health_ready_model_docs_page(client: httpx.Client, tiny_bundle: Path) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    model = client.get("/v1/model").json()
    manifest = json.loads((tiny_bundle / "segclip.json").read_text())
    assert model["image_size"] == manifest["model"]["image_size"]
    assert model["ready"] is True and model["backend"].startswith("onnxruntime/")
    assert len(model["manifest_sha256"]) == 64
    assert model["limits"]["max_pixels"] == MAX_PIXELS and model["limits"]["max_body_mb"] == 1
    spec = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/label-sets", "/v1/model", "/healthz", "/readyz"} <= set(
        spec["paths"])
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "/v1/segment" in page.text


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_label_map_equals_segclip_run(client: httpx.Client, run_outputs: dict,
                                      threshold: float) -> None:
    for seed, path in run_outputs["images"].items():
        expected = run_outputs["pngs"][seed, threshold]
        data = path.read_bytes()
        by_form = segment_multipart(client, data, LABELS, threshold=str(threshold))
        assert by_form.status_code == 200, by_form.text
        body = by_form.json()
        assert base64.b64decode(body["label_map"]["data"]) == expected
        assert body["labels"] == LABELS and body["threshold"] == threshold
        label_map = _decode_png(expected)
        assert (body["height"], body["width"]) == label_map.shape
        names = ["background", *LABELS]
        assert body["counts"] == {n: int((label_map == i).sum()) for i, n in enumerate(names)}
        assert sum(body["fractions"].values()) == pytest.approx(1.0)
        assert set(body["timings_ms"]) >= {"queue", "decode", "text", "image", "assign",
                                           "encode", "total"}
        by_json = client.post("/v1/segment", json={
            "image": base64.b64encode(data).decode(), "labels": LABELS, "threshold": threshold})
        assert base64.b64decode(by_json.json()["label_map"]["data"]) == expected
        as_png = client.post("/v1/segment", headers={"Accept": "image/png"}, json={
            "image": base64.b64encode(data).decode(), "labels": LABELS, "threshold": threshold})
        assert as_png.headers["content-type"] == "image/png" and as_png.content == expected
        assert json.loads(as_png.headers["x-segclip-labels"]) == LABELS


def test_rle_masks_decode_to_the_label_map_and_overlay(client: httpx.Client,
                                                       run_outputs: dict) -> None:
    from pycocotools import mask as coco_mask

    data = run_outputs["images"][0].read_bytes()
    body = segment_multipart(client, data, LABELS, threshold="0",
                             outputs='["label_map", "masks", "overlay"]').json()
    label_map = _decode_png(base64.b64decode(body["label_map"]["data"]))
    assert [m["label"] for m in body["masks"]] == LABELS
    covered = np.zeros(label_map.shape, bool)
    for value, mask in enumerate(body["masks"], start=1):
        rle = {"size": mask["rle"]["size"], "counts": mask["rle"]["counts"].encode()}
        decoded = coco_mask.decode(rle).astype(bool)  # (H, W)
        assert mask["rle"]["size"] == list(label_map.shape)
        np.testing.assert_array_equal(decoded, label_map == value)
        covered |= decoded
    assert covered.all()  # threshold 0: no background pixel
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"]["data"])))
    assert overlay.format == "JPEG" and overlay.height == body["height"]
    assert overlay.width > body["width"]  # the legend panel


def test_label_sets(client: httpx.Client, server: Server, run_outputs: dict) -> None:
    registered = client.post("/v1/label-sets", json={"labels": LABELS})
    assert registered.status_code == 200
    ident = registered.json()["id"]
    assert registered.json()["labels"] == LABELS
    assert client.post("/v1/label-sets", json={"labels": LABELS}).json()["id"] == ident
    data = run_outputs["images"][1].read_bytes()
    before = _metric(client, 'segclip_label_set_cache_total{result="hit"}')
    body = segment_multipart(client, data, None, label_set=ident, threshold="0.5").json()
    assert base64.b64decode(body["label_map"]["data"]) == run_outputs["pngs"][1, 0.5]
    assert body["timings_ms"]["text"] == 0.0  # embedded once, at registration
    assert _metric(client, 'segclip_label_set_cache_total{result="hit"}') == before + 1
    assert_problem(segment_multipart(client, data, None, label_set="ls_nope"), 422,
                   "unknown label_set")


def test_scores_output(client: httpx.Client, run_outputs: dict) -> None:
    from segclip.runtime.serve.app import HAS_SCORES

    data = run_outputs["images"][0].read_bytes()
    response = segment_multipart(client, data, LABELS, outputs="scores,label_map")
    if not HAS_SCORES:  # a runtime whose SegmentResult has no scores refuses the output
        assert_problem(response, 422, "scores")
        return
    scores = response.json()["scores"]
    assert list(scores)[-len(LABELS):] == LABELS
    assert all(0.0 <= value <= 1.0 for value in scores.values())


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics(client: httpx.Client, run_outputs: dict) -> None:
    segment_multipart(client, run_outputs["images"][1].read_bytes(), LABELS)
    client.post("/v1/segment", content=b"{", headers={"content-type": "application/json"})
    text = client.get("/metrics").text
    assert 'segclip_requests_total{method="POST",route="/v1/segment",status="200"}' in text
    assert 'segclip_requests_total{method="POST",route="/v1/segment",status="400"}' in text
    for stage in ("queue", "decode", "text", "image", "assign", "encode", "total"):
        assert f'segclip_stage_seconds_count{{stage="{stage}"}}' in text
    assert _metric(client, "segclip_batch_size_count") >= 1
    assert "segclip_queue_depth 0.0" in text and "segclip_ready 1.0" in text


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # 4e8 pixels in a few kB
    return buffer.getvalue()


def test_open_image_reads_the_size_without_decoding() -> None:
    from segclip.runtime.serve.problems import Problem
    from segclip.runtime.serve.requests import decode_image, open_image

    data = image_bytes(30, 40, 0)
    opened = open_image(data, MAX_PIXELS)
    assert opened.size == (40, 30) and opened.tile  # header read, its tiles not yet decoded
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_image(opened, MAX_PIXELS), reference)
    assert np.array_equal(decode_image(data, MAX_PIXELS), reference)
    for bad, status in ((b"not an image", 415), (b"", 400), (_bomb_png(), 413)):
        with pytest.raises(Problem) as refused:
            open_image(bad, MAX_PIXELS)
        assert refused.value.status == status
    with pytest.raises(Problem) as refused:
        open_image(data, 1199)  # one pixel under 30 x 40
    assert refused.value.status == 413 and "--max-pixels" in refused.value.detail


def test_client_errors_are_problems(client: httpx.Client) -> None:
    good = image_bytes(40, 40, 3)
    b64 = base64.b64encode(good).decode()
    assert_problem(client.post("/v1/segment", content=b"{nope",
                               headers={"content-type": "application/json"}), 400, "JSON")
    assert_problem(client.post("/v1/segment", json={"labels": LABELS}), 400, "image")
    assert_problem(client.post("/v1/segment", json={"image": "%%%", "labels": LABELS}), 400,
                   "base64")
    assert_problem(client.post("/v1/segment", json={"image": b64}), 400, "labels")
    assert_problem(client.post("/v1/segment", json={"image": b64, "labels": LABELS,
                                                    "label_set": "x"}), 400, "labels")
    assert_problem(client.post("/v1/segment", files={"labels": (None, "cat")}), 400,
                   "image")
    assert_problem(client.get("/v1/nothing"), 404)
    assert_problem(client.get("/v1/segment"), 405)
    assert_problem(client.post("/v1/segment", content=b"x" * 10,
                               headers={"content-type": "text/plain"}), 415, "content type")
    assert_problem(segment_multipart(client, b"not an image at all", LABELS), 415, "image")
    assert_problem(segment_multipart(client, good[: len(good) // 2], LABELS), 415)
    bad_labels = {"empty": ([], "empty"), "duplicate": (["cat", "Cat "], "duplicate"),
                  "background": (["cat", "Background"], "background"),
                  "many": ([f"l{i}" for i in range(1001)], "1001 labels"),
                  "long": (["x" * 201], "201 characters"), "blank": (["cat", " "], "empty"),
                  "type": ("cat", "list")}
    for labels, fragment in bad_labels.values():
        assert_problem(client.post("/v1/segment", json={"image": b64, "labels": labels}), 422,
                       fragment)
    assert_problem(segment_multipart(client, good, ["cat", "CAT"]), 422, "duplicate")
    for threshold in ("1.5", "-0.1", "abc"):
        assert_problem(segment_multipart(client, good, LABELS, threshold=threshold), 422,
                       "threshold")
    assert_problem(segment_multipart(client, good, LABELS, outputs='["masks", "png"]'), 422,
                   "png")
    assert_problem(client.post("/v1/label-sets", json={"labels": ["a", "a"]}), 422, "duplicate")
    assert_problem(client.post("/v1/label-sets", content=b"[", headers={
        "content-type": "application/json"}), 400, "JSON")


def test_size_limits_are_413(client: httpx.Client) -> None:
    big = b"\0" * (1024 * 1024 + 1)
    assert_problem(segment_multipart(client, big, LABELS), 413, "--max-body-mb")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed count is checked
        for _ in range(40):
            yield b"x" * 32768

    assert_problem(client.post("/v1/segment", content=chunks(),
                               headers={"content-type": "application/json"}), 413,
                   "--max-body-mb")
    too_many = image_bytes(1001, 1000, 4, fmt="JPEG")
    assert_problem(segment_multipart(client, too_many, LABELS), 413, "--max-pixels")
    bomb = _bomb_png()
    assert len(bomb) < 200_000
    assert_problem(segment_multipart(client, bomb, LABELS), 413, "pixels")
    sliver = image_bytes(1, 1100, 5)  # 1100 windows after the short-side resize
    assert_problem(segment_multipart(client, sliver, LABELS), 413, "windows")
    assert client.get("/healthz").status_code == 200  # the server survived


def test_serve_imports_no_torch() -> None:
    code = ("import sys, segclip.runtime.serve, segclip.runtime.serve.app, "
            "segclip.runtime.serve.cli, segclip.runtime.serve.engine; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_cli_bad_bundle_is_one_line_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segclip.runtime.serve.cli import app

    result = CliRunner().invoke(app, ["--engine", str(tmp_path / "missing"), "--port", "1"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.splitlines()) == 1
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("# no keys\n")
    result = CliRunner().invoke(app, ["--engine", str(tmp_path), "--api-key-file", str(keyfile)])
    assert result.exit_code == 2 and "holds no key" in result.output

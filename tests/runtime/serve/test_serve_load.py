"""segclip-serve under concurrent load through a real server process (docs/serve.md "Batching"):
16 clients x 25 requests with mixed label sets and thresholds give exactly the sequential
`Segmenter` results while requests share batches; server RSS grows < 5 % over 2,000 requests."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serve_support import Server, image_bytes, segment_multipart, serve
from PIL import Image

pytest.importorskip("fastapi")

LABEL_SETS = [["red square", "blue circle", "cat"], ["dog", "tree"],
              ["sky", "grass", "road", "car", "person"]]
THRESHOLDS = [0.0, 0.5]
SIZES = [(48, 64), (64, 48), (96, 128), (70, 70), (64, 200), (33, 90), (128, 96), (80, 60)]
CLIENTS, PER_CLIENT = 16, 25


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_bundle, tmp_path_factory.mktemp("serve-load"), "--max-batch", "8",
               "--max-wait-ms", "5") as running:
        yield running


def _case(client: int, index: int) -> tuple[int, int, int]:
    return (client * PER_CLIENT + index) % len(SIZES), (client + index) % len(LABEL_SETS), \
        index % len(THRESHOLDS)


def test_concurrent_mixed_requests_equal_sequential(server: Server, tiny_bundle: Path) -> None:
    from segclip.runtime.segmenter import Segmenter
    from segclip.runtime.serve.responses import label_png

    images = [image_bytes(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    expected = {}
    with Segmenter(tiny_bundle, device="cpu", threads=1) as segmenter:  # the sequential truth
        for i, data in enumerate(images):
            array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for s, labels in enumerate(LABEL_SETS):
                for t, threshold in enumerate(THRESHOLDS):
                    result = segmenter.segment(array, labels, threshold)
                    expected[i, s, t] = (label_png(result.label_map, len(labels)),
                                         result.counts)

    def run_client(client_id: int) -> list[tuple[tuple[int, int, int], dict]]:
        out = []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for index in range(PER_CLIENT):
                i, s, t = _case(client_id, index)
                response = segment_multipart(client, images[i], LABEL_SETS[s],
                                             threshold=str(THRESHOLDS[t]))
                assert response.status_code == 200, response.text
                out.append(((i, s, t), response.json()))
        return out

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(run_client, range(CLIENTS)) for r in rs]
    assert len(results) == CLIENTS * PER_CLIENT
    for key, body in results:
        png, counts = expected[key]
        assert base64.b64decode(body["label_map"]["data"]) == png, key
        assert body["counts"] == counts and body["labels"] == LABEL_SETS[key[1]]
    batched = max(body["batch_size"] for _, body in results)
    assert 1 < batched <= 8  # requests shared image-engine batches, within --max-batch
    with httpx.Client(base_url=server.url) as client:
        metrics = client.get("/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("segclip_batch_size_count"))
    assert count < CLIENTS * PER_CLIENT


def test_rss_growth_under_5_percent_over_2000_requests(server: Server) -> None:
    images = [image_bytes(32 + 8 * i, 40, 100 + i) for i in range(4)]

    def run(client_id: int, count: int) -> int:
        ok = 0
        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Accept": "image/png"}) as client:
            for index in range(count):
                labels = LABEL_SETS[(client_id + index) % len(LABEL_SETS)]
                response = segment_multipart(client, images[index % len(images)], labels)
                ok += response.status_code == 200 and json.loads(
                    response.headers["x-segclip-labels"]) == labels
        return ok

    with ThreadPoolExecutor(8) as pool:  # warm: allocator pools and caches reach steady state
        assert sum(pool.map(run, range(8), [25] * 8)) == 200
    before = server.rss_kib()
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(run, range(8), [250] * 8)) == 2000
    after = server.rss_kib()
    assert after < before * 1.05, f"RSS grew from {before} to {after} KiB"

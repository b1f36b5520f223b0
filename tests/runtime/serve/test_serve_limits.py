"""segclip-serve limits through a real server process (docs/serve.md "Errors"): API-key refusal
(401) and the queue-full 503 with Retry-After under a burst of concurrent requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _serve_support import Server, assert_problem, image_bytes, segment_multipart, serve

pytest.importorskip("fastapi")

KEY = "s3cret-key-for-tests"
LABELS = ["red square", "blue circle"]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve-limits")
    keys = tmp / "keys.txt"
    keys.write_text(f"# keys\nother-key\n{KEY}\n")
    with serve(tiny_bundle, tmp, "--api-key-file", str(keys), "--queue", "1", "--max-batch", "1",
               "--max-wait-ms", "0") as running:
        yield running


def test_api_key_is_required_on_v1_routes(server: Server) -> None:
    data = image_bytes(32, 32, 0)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/v1/model",):
            body = assert_problem(client.get(path), 401, "API key")
            assert body["title"] == "Unauthorized"
        assert_problem(client.get("/v1/model", headers={"Authorization": "Bearer wrong"}), 401)
        assert_problem(client.get("/v1/model", headers={"X-API-Key": KEY + "x"}), 401)
        assert_problem(client.post("/v1/label-sets", json={"labels": LABELS}), 401)
        refused = segment_multipart(client, data, LABELS)
        assert_problem(refused, 401)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/healthz").status_code == 200  # probes stay open
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"}).is_success
        assert client.get("/v1/model", headers={"X-API-Key": "other-key"}).is_success
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert segment_multipart(client, data, LABELS).status_code == 200


def test_queue_full_is_503_with_retry_after(server: Server) -> None:
    # 2 x 1800 pixels -> about 28 windows each: long enough that a burst piles up behind one
    data = image_bytes(100, 2800, 1)
    headers = {"X-API-Key": KEY}

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120, headers=headers) as client:
            return segment_multipart(client, data, LABELS, outputs="label_map")

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1 and statuses[200] >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert_problem(response, 503, "busy")
            assert response.headers["retry-after"] == "1"
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        assert segment_multipart(client, data, LABELS).status_code == 200  # and it recovers
        text = client.get("/metrics").text
        assert 'route="/v1/segment",status="503"' in text

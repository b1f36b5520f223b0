"""segclip-serve --workers 2 through a real server: two worker processes on one port, each with
its own engine, answer the same results as one (docs/serve.md "Command")."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _serve_support import Server, image_bytes, segment_multipart, serve

pytest.importorskip("fastapi")

LABELS = ["red square", "blue circle"]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tiny_bundle, tmp_path_factory.mktemp("serve-workers"), "--workers", "2") as run:
        yield run


def test_two_workers_serve_the_same_results(server: Server, tiny_bundle: Path) -> None:
    from segclip.runtime.segmenter import Segmenter
    from segclip.runtime.serve.responses import label_png

    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children.read_text().split()]
    assert sum(b"spawn_main" in c for c in commands) == 2  # the workers (not the tracker)
    data = image_bytes(48, 80, 7)
    with Segmenter(tiny_bundle, device="cpu", threads=1) as segmenter:
        from io import BytesIO

        from PIL import Image

        expected = label_png(segmenter.segment(Image.open(BytesIO(data)), LABELS, 0.0).label_map,
                             len(LABELS))

    def one(_: int) -> bytes:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = segment_multipart(client, data, LABELS, threshold="0")
            assert response.status_code == 200, response.text
            return base64.b64decode(response.json()["label_map"]["data"])

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(one, range(12))) == {expected}

"""`POST /v1/segment` answers alike through its plain ASGI entry (`SegclipAPI` hands it over
before FastAPI) and through the route FastAPI declares: same statuses, bodies, headers and
counted metrics, for answers and for problems (runtime/serve/route.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from _serve_support import assert_problem, image_bytes

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = ("cat", "dog", "sky")
KEY = "secret-key"


class FakeEngine:
    """Labels each image in horizontal bands, one per label (no model)."""

    ready, queue_depth, idle = True, 0, True

    async def start(self) -> None: ...

    async def warm_up(self) -> None: ...

    async def close(self) -> None: ...

    def model_info(self) -> dict:
        return {}

    async def segment(self, job):
        from segclip.runtime.segmenter import SegmentResult
        from segclip.runtime.serve.engine import EngineResult

        height, width = job.image.shape[:2]
        bands = np.arange(height, dtype=np.uint16)[:, None] * (len(job.labels) + 1) // height
        label_map = np.repeat(bands, width, axis=1)  # (H, W) values 0..T
        counts = np.bincount(label_map.ravel(), minlength=len(job.labels) + 1)
        names = ("background", *job.labels)
        result = SegmentResult(label_map, job.labels, dict(zip(names, map(int, counts))),
                               {n: float(c) / label_map.size for n, c in zip(names, counts)},
                               {"preprocess": 0.0, "text": 0.0, "image": 0.0, "assign": 0.0,
                                "total": 0.0}, "fake", job.threshold or 0.5,
                               {label: 0.5 for label in job.labels})
        return EngineResult(result, 0.0, 1, True)


def _requests(data: bytes) -> list[dict]:
    files = {"image": ("a.png", data, "image/png")}
    return [
        {"files": files, "data": {"labels": "\n".join(LABELS), "threshold": "0.3"}},
        {"json": {"image": __import__("base64").b64encode(data).decode(), "labels": LABELS,
                  "outputs": ["label_map", "masks", "scores"]}},
        {"files": files, "data": {"labels": json.dumps(LABELS)},
         "headers": {"Accept": "image/png"}},
        {"files": files, "data": {"labels": "cat\nCAT"}},  # 422 duplicate
        {"files": files, "data": {"labels": "cat", "threshold": "2"}},  # 422 threshold
        {"content": b"plain", "headers": {"Content-Type": "text/plain"}},  # 415
        {"files": {"image": ("a.png", b"not an image", "image/png")},
         "data": {"labels": "cat"}},  # 415
        {"files": files},  # 400 neither labels nor label_set
        {"files": files, "data": {"labels": "cat"}, "key": None},  # 401
    ]


def _answers(fast: bool, data: bytes) -> tuple[list[tuple], bytes]:
    from segclip.runtime.serve.app import build_app
    from segclip.runtime.serve.settings import ServeSettings

    app = build_app(FakeEngine(), ServeSettings(api_keys=frozenset({KEY})))
    handler = app.segment_route
    if not fast:
        app.segment_route = None  # every request through FastAPI's route
    answers = []
    with TestClient(app) as client:
        for request in _requests(data):
            request = dict(request)
            key = request.pop("key", KEY)
            headers = {**request.pop("headers", {}), **({"X-API-Key": key} if key else {})}
            response = client.post("/v1/segment", headers=headers, **request)
            body = response.content
            if response.headers["content-type"] == "application/json":
                parsed = response.json()
                parsed.pop("timings_ms")
                body = json.dumps(parsed, sort_keys=True).encode()
            headers = {k: v for k, v in response.headers.items()
                       if k in ("content-type", "www-authenticate", "x-segclip-labels")}
            answers.append((response.status_code, headers, body, response))
        metrics = client.get("/metrics").content
    assert handler is not None
    return answers, metrics


def test_plain_entry_answers_as_fastapi_route() -> None:
    data = image_bytes(30, 40, 1)
    fast, fast_metrics = _answers(True, data)
    slow, slow_metrics = _answers(False, data)
    statuses = [a[0] for a in fast]
    assert statuses == [200, 200, 200, 422, 422, 415, 415, 400, 401]
    for (status, headers, body, _), (status2, headers2, body2, _) in zip(fast, slow):
        assert (status, headers, body) == (status2, headers2, body2)
    for status, _, _, response in fast[3:]:
        assert_problem(response, status)
    label_map = np.asarray(Image.open(io.BytesIO(fast[2][2])))
    assert label_map.shape == (30, 40) and label_map.max() == len(LABELS)
    counted = [line for line in fast_metrics.decode().splitlines()
               if line.startswith("segclip_requests_total") and "/v1/segment" in line]
    assert len(counted) == 5  # statuses 200, 400, 401, 415, 422
    assert 'status="200"} 3.0' in "\n".join(counted)
    assert 'status="422"} 2.0' in "\n".join(counted)
    slow_counted = [line for line in slow_metrics.decode().splitlines()
                    if line.startswith("segclip_requests_total") and "/v1/segment" in line]
    assert sorted(counted) == sorted(slow_counted)
    # the answers' metrics, recorded once each reply is written, alike through both entries
    recorded = ("segclip_stage_seconds_count", "segclip_batch_size_count",
                "segclip_label_set_cache_total")
    fast_recorded, slow_recorded = ([line for line in text.decode().splitlines()
                                     if line.startswith(recorded)]
                                    for text in (fast_metrics, slow_metrics))
    assert 'segclip_stage_seconds_count{stage="total"} 3.0' in fast_recorded
    assert "segclip_batch_size_count 3.0" in fast_recorded
    assert fast_recorded == slow_recorded


@pytest.mark.parametrize("cpus", [1, 4])
def test_codec_work_on_the_loop_when_the_engine_is_idle_or_the_process_has_one_cpu(
        cpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With more CPUs a busy engine's requests are decoded and encoded in the codec threads
    (they overlap the engine); on one CPU a thread could only take turns with the loop."""
    from segclip.runtime.serve import route
    from segclip.runtime.serve.metrics import Metrics
    from segclip.runtime.serve.settings import ServeSettings

    monkeypatch.setattr(route, "CODEC_THREADS", cpus)
    small, large = route.INLINE_PIXELS, route.INLINE_PIXELS + 1
    seen = {}
    for idle in (True, False):
        engine = FakeEngine()
        engine.idle = idle
        segment = route.SegmentRoute(engine, ServeSettings(), Metrics(), {})
        try:
            seen[idle] = (segment._inline(small), segment._inline(large))
        finally:
            segment.close()
    assert seen[True] == (True, False)  # idle: small images on the loop, whatever the CPUs
    assert seen[False] == ((True, False) if cpus == 1 else (False, False))

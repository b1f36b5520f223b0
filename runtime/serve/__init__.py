"""segclip.runtime.serve: the HTTP service `segclip-serve` (docs/serve.md), torch-free.

Layers, each usable without the next (a Ray Serve deployment reuses all but `engine.py`):

- `settings.ServeSettings`: the limits and batching knobs (frozen dataclass, validated).
- `problems`: RFC 9457 problem+json errors (`Problem` exception, FastAPI handlers).
- `requests`: parses and validates a segment request (multipart or JSON, body-size limit,
  labels, threshold, outputs, image decoding with the pixel limit) into a `SegmentJob`.
- `responses`: label-map PNG (the bytes `segclip-run` writes), COCO RLE masks, overlay JPEG.
- `metrics.Metrics`: Prometheus collectors in a per-app `CollectorRegistry`.
- `engine`: the `Engine` protocol below and `LocalEngine`, which batches concurrent requests
  through one `Segmenter` (a bounded asyncio queue and one worker thread).
- `app.build_app(engine, settings) -> FastAPI`: the routes, bound to any `Engine`.

The engine interface (all that `build_app` calls; every coroutine runs on the app's loop):

    class Engine(Protocol):
        ready: bool                       # True once warm_up() has run both towers
        queue_depth: int                  # jobs waiting (a gauge; 0 when not queued locally)
        idle: bool                        # optional: nothing queued or running (the app then
                                          # decodes / encodes small images inline)
        async def start(self) -> None     # on app startup (create queues/workers)
        async def warm_up(self) -> None   # run both towers once, then set ready
        async def segment(self, job: SegmentJob) -> EngineResult   # raises QueueFull
        async def register_label_set(self, labels: tuple[str, ...]) -> float  # text ms
        def model_info(self) -> dict      # bundle facts, variant, backend, sha256
        async def close(self) -> None     # on app shutdown

`SegmentJob` (requests.py) holds the decoded (H, W, 3) uint8 image, the validated label tuple
and the threshold (None: the bundle's); `EngineResult` (engine.py) the `SegmentResult`, the
queue wait in ms and the size of the batch the job ran in. `segment` raises `QueueFull`
(engine.py) when the queue is full; the app turns it into 503 with Retry-After, and applies
`--timeout-s` around the call (504).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "build_app": "segclip.runtime.serve.app",
    "ServeSettings": "segclip.runtime.serve.settings",
    "LocalEngine": "segclip.runtime.serve.engine",
    "EngineResult": "segclip.runtime.serve.engine",
    "QueueFull": "segclip.runtime.serve.engine",
    "SegmentJob": "segclip.runtime.serve.requests",
    "Problem": "segclip.runtime.serve.problems",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Prometheus metrics of `segclip-serve` (docs/serve.md "Metrics"), in a per-app registry so two
apps in one process (tests, Ray replicas) never share or clash."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("queue", "decode", "text", "image", "assign", "encode", "total")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests by route and status, per-stage latency, batch sizes, queue depth, label sets."""

    def __init__(self, queue_depth: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("segclip_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.stage_seconds = Histogram("segclip_stage_seconds",
                                       "Latency of each stage of POST /v1/segment",
                                       ["stage"], buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.batch_size = Histogram("segclip_batch_size", "Images per image-engine batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("segclip_queue_depth", "Segment jobs waiting for the engine",
                                 registry=self.registry)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        self.label_sets = Counter("segclip_label_set_cache",
                                  "Label-set embedding lookups: hit (cached) or miss (computed)",
                                  ["result"], registry=self.registry)
        self.ready = Gauge("segclip_ready", "1 once warm-up has run", registry=self.registry)
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        self._cache = {result: self.label_sets.labels(result) for result in ("hit", "miss")}

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, histogram in self._stages.items():  # children looked up once, at start
            if stage in timings_ms:
                histogram.observe(timings_ms[stage] / 1e3)

    def label_set_lookup(self, hit: bool) -> None:
        self._cache["hit" if hit else "miss"].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

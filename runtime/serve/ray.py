"""`segclip-serve --ray`: the same app on Ray Serve replicas (docs/ray.md "Online",
docs/architecture.md "Python API").

Each replica of the deployment holds one `Segmenter` and serves the app of `app.build_app`
(same routes, problem+json errors, page, metrics) through `@serve.ingress`; the app is built in
the replica (`__serve_build_asgi_app__`), so its lifespan starts and warms up that replica's
engine. `RayEngine` fulfils the app's engine interface with `@serve.batch`: concurrent requests
of a replica are gathered up to `max_batch` images, waiting at most `max_wait_ms`, and run as one
`Segmenter.segment_each` call in a worker thread; past `queue` waiting jobs a request gets 503.
Registered label sets are kept in one small actor shared by the replicas, so an id registered
through one replica works on every other.

    serve run segclip.runtime.serve.ray:build_app bundle=/models/demo replicas=2

`build_app(args)` takes one mapping, as Serve's application builders do: `bundle` and, all
optional, `device`, `variant`, `threads`, `replicas`, `max_replicas` (> replicas: autoscaling
between them), `num_cpus`, `num_gpus` (per replica), `name`, and the `ServeSettings` fields
(`max_batch`, `max_wait_ms`, `queue`, `timeout_s`, `max_body_mb`, `max_pixels`, ...) plus
`api_key_file`. Values may be strings (`serve run key=value`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import typing
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from segclip.runtime._ray import import_ray, ray_session
from segclip.runtime.serve.app import LabelSets
from segclip.runtime.serve.engine import EngineResult, LocalEngine, QueueFull
from segclip.runtime.serve.settings import ServeConfigError, ServeSettings, read_api_keys

APP_NAME = "segclip"
STORE_NAMESPACE = "segclip"
STORE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RayServeOptions:
    """The deployment: bundle, replicas and their resources, and the app's settings."""

    bundle: str
    device: str = "auto"
    variant: str | None = None
    threads: int | None = None  # ONNX Runtime threads per replica (default: its num_cpus)
    replicas: int = 1
    max_replicas: int | None = None  # above `replicas`: autoscale between the two
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    name: str = APP_NAME  # Serve application name (and of its label-set store)
    settings: ServeSettings = field(default_factory=ServeSettings)
    dense: dict[str, Any] = field(default_factory=dict)  # DenseSegmenter options (dense bundles)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ServeConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ServeConfigError(f"max-replicas must be >= replicas ({self.replicas}), got "
                                   f"{self.max_replicas}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ServeConfigError(f"num-cpus must be > 0 and num-gpus >= 0 per replica, got "
                                   f"{self.num_cpus} and {self.num_gpus}")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RayServeOptions:
        """Options from a flat mapping (module docstring); string values are converted."""
        args = dict(args)
        if "bundle" not in args:
            raise ServeConfigError("build_app needs bundle=PATH (the bundle directory)")
        settings = {k: args.pop(k) for k in list(args)
                    if k in ServeSettings.__dataclass_fields__}
        key_file = args.pop("api_key_file", None)
        unknown = set(args) - set(cls.__dataclass_fields__)
        if unknown:
            raise ServeConfigError(f"unknown option(s) {sorted(unknown)}; known: "
                                   f"{sorted(set(cls.__dataclass_fields__) - {'settings'})}, "
                                   f"{sorted(ServeSettings.__dataclass_fields__)}, api_key_file")
        if key_file:
            settings["api_keys"] = read_api_keys(key_file)
        return cls(**_typed(cls, args), settings=ServeSettings(**_typed(ServeSettings,
                                                                         settings)))


def _typed(kind: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with strings converted to the int/float of `kind`'s fields."""
    hints = typing.get_type_hints(kind)
    out = {}
    for name, value in values.items():
        hint = str(hints.get(name, ""))
        if isinstance(value, str) and hint not in ("<class 'str'>",):
            if value.lower() in ("none", "null", ""):
                value = None
            else:
                number = float if "float" in hint else int if "int" in hint else None
                try:
                    value = number(value) if number else value
                except ValueError as e:
                    raise ServeConfigError(f"{name} must be a number, got {value!r}") from e
        out[name] = value
    return out


class _Failed:
    """A job's own error, carried through `@serve.batch` and raised in its request."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RayEngine(LocalEngine):
    """The app's engine in a Serve replica: `@serve.batch` in place of the local queue."""

    def __init__(self, segmenter: Any, settings: ServeSettings, serve: Any) -> None:
        super().__init__(segmenter, settings)
        self._waiting = 0  # jobs accepted and not yet in a running batch
        self._batched = serve.batch(max_batch_size=settings.max_batch,
                                    batch_wait_timeout_s=settings.max_wait_ms / 1e3,
                                    )(self._run_batch)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def start(self) -> None:
        """Nothing to start: `@serve.batch` makes its queue on the first call."""

    async def segment(self, job: Any) -> EngineResult:
        if self._waiting >= self.settings.queue:
            raise QueueFull(f"{self._waiting} requests are already waiting in this replica")
        ticket = {"queued": time.perf_counter(), "waiting": True}
        self._waiting += 1
        try:
            outcome = await self._batched((job, ticket))
        finally:
            self._leave_queue(ticket)  # timed out or cancelled before its batch ran
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    def _leave_queue(self, ticket: dict[str, Any]) -> None:
        if ticket["waiting"]:
            ticket["waiting"] = False
            self._waiting -= 1

    async def _run_batch(self, items: list[tuple[Any, dict[str, Any]]]) -> list[Any]:
        started = time.perf_counter()
        for _, ticket in items:
            self._leave_queue(ticket)
        results = await self._in_worker([job for job, _ in items])
        return [_Failed(r) if isinstance(r, Exception) else
                EngineResult(r, (started - ticket["queued"]) * 1e3, len(items), index == 0)
                for index, (r, (_, ticket)) in enumerate(zip(results, items))]


class SharedLabelSets(LabelSets):
    """`LabelSets` backed by one actor of the application, so every replica knows every id."""

    def __init__(self, capacity: int, store: Any, ray: Any) -> None:
        super().__init__(capacity)
        self._store, self._ray = store, ray

    def add(self, labels: tuple[str, ...]) -> str:
        key = super().add(labels)
        self._store.put.remote(key, list(labels))
        return key

    def get(self, key: str) -> tuple[str, ...]:
        if key not in self._sets:  # registered through another replica, or dropped here
            labels = self._ray.get(self._store.get.remote(key), timeout=STORE_TIMEOUT_S)
            if labels is not None:
                LabelSets.add(self, tuple(labels))
        return super().get(key)


class _LabelSetStore:
    """The registered label sets of an application (bounded, least recently used dropped)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sets: OrderedDict[str, list[str]] = OrderedDict()

    def put(self, key: str, labels: list[str]) -> None:
        self.sets[key] = labels
        self.sets.move_to_end(key)
        while len(self.sets) > self.capacity:
            self.sets.popitem(last=False)

    def get(self, key: str) -> list[str] | None:
        if key in self.sets:
            self.sets.move_to_end(key)
        return self.sets.get(key)


def _store(ray: Any, name: str, capacity: int) -> Any:
    actor = ray.remote(num_cpus=0)(_LabelSetStore)
    return actor.options(name=f"{name}-label-sets", namespace=STORE_NAMESPACE,
                         get_if_exists=True, lifetime="detached").remote(capacity)


def _deployment(serve: Any, options: RayServeOptions) -> Any:
    from segclip.runtime.serve.app import build_app as build_fastapi_app

    @serve.ingress()
    class SegclipReplica:
        """One replica: a Segmenter, its RayEngine, and the app bound to them."""

        def __init__(self, options: RayServeOptions) -> None:
            import ray

            from segclip.runtime.segmenter import Segmenter

            settings = options.settings
            threads = options.threads or max(1, int(options.num_cpus))
            segmenter = Segmenter(options.bundle, device=options.device,
                                  variant=options.variant, max_pixels=settings.max_pixels,
                                  threads=threads, **options.dense)
            self.engine = RayEngine(segmenter, settings, serve)
            self.settings = settings
            self.label_sets = SharedLabelSets(settings.label_sets,
                                              _store(ray, options.name, settings.label_sets),
                                              ray)

        def __serve_build_asgi_app__(self) -> Any:
            return build_fastapi_app(self.engine, self.settings, label_sets=self.label_sets)

    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas and options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": options.replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.settings.max_batch}}
    return serve.deployment(
        SegclipReplica, name="SegclipReplica",
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        max_ongoing_requests=options.settings.queue + options.settings.max_batch,
        max_constructor_retry_count=2, **scaling)


def build_app(args: Mapping[str, Any] | RayServeOptions) -> Any:
    """The Serve application (module docstring): `serve.run(build_app({"bundle": "b/"}))`."""
    import_ray()
    from ray import serve

    options = args if isinstance(args, RayServeOptions) else RayServeOptions.from_args(args)
    from segclip.runtime.bundle import Bundle

    Bundle.open(options.bundle)  # a missing or corrupt bundle fails here, not in each replica
    return _deployment(serve, options).bind(options)


def serve_forever(options: RayServeOptions, host: str = "127.0.0.1", port: int = 8000,
                  address: str | None = None, ready: Any = None) -> None:
    """Deploy on Ray (a local Ray on 127.0.0.1 without `address`) and serve until interrupted;
    then delete the application and, for a local Ray, stop it."""
    local_cpus = max(os.cpu_count() or 1, int(-(-options.replicas * options.num_cpus // 1)))
    application = build_app(options)
    with ray_session(address, num_cpus=None if address else local_cpus) as ray:
        from ray import serve

        present = ray.cluster_resources().get("GPU", 0)
        if not address and options.num_gpus * options.replicas > present:
            raise ServeConfigError(  # the replicas would wait for GPUs forever
                f"{options.replicas} replica(s) x {options.num_gpus:g} GPU(s) asked for, but this "
                f"machine's Ray has {present:g} GPU(s); lower --num-gpus or --replicas")

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one line below says where
        serve.start(http_options={"host": host, "port": port})
        try:
            try:
                serve.run(application, name=options.name, route_prefix="/")
            except (RuntimeError, ray.exceptions.RayError) as e:
                raise ServeConfigError(f"the deployment failed: {_replica_error(serve, options)}"
                                       f"{' '.join(str(e).split())[:300]}") from e
            print(f"segclip-serve on Ray: http://{host}:{port} ({options.replicas} replica(s))",
                  file=sys.stderr, flush=True)
            if ready is not None:
                ready()
            _wait_for_signal()
        finally:
            serve.shutdown()


def _replica_error(serve: Any, options: RayServeOptions) -> str:
    """The last line of a replica's start-up error (e.g. the device it could not use), or ""."""
    try:
        application = serve.status().applications.get(options.name)
        message = application.deployments["SegclipReplica"].message if application else ""
    except (KeyError, AttributeError, RuntimeError):
        return ""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return f"{lines[-1][:500]}; " if lines else ""


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: Any) -> None:
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        while not stop["now"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)


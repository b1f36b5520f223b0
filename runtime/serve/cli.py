"""`segclip-serve`: serve a bundle over HTTP (docs/serve.md).

    segclip-serve --engine bundle/                     # http://127.0.0.1:8000, page at /
    segclip-serve --engine bundle/ --host 0.0.0.0 --api-key-file keys.txt --workers 2

The bundle opens and its engines load before the port is bound, so a bad bundle, device or option
prints one line and exits with code 2. Warm-up (both towers once) runs after binding; `/readyz`
answers 200 once it is done. With `--workers N`, N processes share the port, each with its own
engine and batching queue. Thin typer wrapper over `build_app` and `LocalEngine`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from segclip.cli._exit import fail, new_app
from segclip.errors import MissingDependencyError, SegclipError
from segclip.runtime.dense_cli import AreaThd, BackgroundNames, LogitScale, PamrSteps, dense_options
from segclip.runtime.variants import VARIANTS

DEFAULT_MAX_PIXELS = 100_000_000  # = segclip.runtime.images.DEFAULT_MAX_PIXELS (kept import-free)
ENV_CONFIG = "SEGCLIP_SERVE_CONFIG"  # JSON of the options, read by each --workers process
# warnings and errors only; access lines off (below that level they would never print, yet
# uvicorn would still build each one's client address and path per response)
UVICORN_LOGS: dict[str, Any] = {"log_level": "warning", "access_log": False}
app = new_app(help="Serve a segclip bundle over HTTP (batching, metrics, a demo page).")


def _require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import pycocotools  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"segclip-serve needs {e.name}; install the serve extra: "
                                     f"pip install 'segclip[serve]'") from e


def create_app(config: dict[str, Any]) -> Any:
    """The app of one process from the CLI's options (a `Segmenter`, a `LocalEngine`)."""
    from segclip.runtime.segmenter import Segmenter
    from segclip.runtime.serve.app import build_app
    from segclip.runtime.serve.engine import LocalEngine
    from segclip.runtime.serve.settings import ServeSettings

    settings = ServeSettings(**{**config["settings"],
                                "api_keys": frozenset(config["settings"]["api_keys"])})
    segmenter = Segmenter(config["engine"], device=config["device"], variant=config["variant"],
                          max_pixels=settings.max_pixels, threads=config["threads"],
                          **config.get("dense", {}))
    return build_app(LocalEngine(segmenter, settings), settings)


def create_app_from_env() -> Any:
    """`create_app` with the options in $SEGCLIP_SERVE_CONFIG (uvicorn --workers factory)."""
    return create_app(json.loads(os.environ[ENV_CONFIG]))


@app.command()
def main(
    engine: Annotated[Path, typer.Option(
        "--engine", help="Bundle directory, or its image.onnx / image.fp16.onnx / image.plan.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to bind.")] = 8000,
    device: Annotated[str, typer.Option(
        "--device", help="auto|cpu|cuda|cuda:N; auto: TensorRT, else ONNX Runtime CUDA, "
        "else CPU.")] = "auto",
    variant: Annotated[Optional[str], typer.Option(
        "--variant", help=f"Image graph: {'|'.join(VARIANTS)} [default: the file --engine "
        "names, else fp32].")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Images per image-tower call across requests.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", help="Longest a batch waits for requests still arriving.")] = 5.0,
    queue: Annotated[int, typer.Option(
        "--queue", help="Requests waiting for the engine; more get 503.")] = 64,
    timeout_s: Annotated[float, typer.Option(
        "--timeout-s", help="Per-request limit in seconds; past it 504.")] = 30.0,
    max_body_mb: Annotated[float, typer.Option(
        "--max-body-mb", help="Request body limit in MiB; over it 413.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", help="Image pixel limit, read from the header; over it 413.")
    ] = DEFAULT_MAX_PIXELS,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="File of API keys (one per line); /v1/* then needs one.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Server processes, each with its own engine.")] = 1,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="ONNX Runtime intra-op threads per process.")] = None,
    background_names: BackgroundNames = None,
    pamr: PamrSteps = 0,
    area_thd: AreaThd = None,
    logit_scale: LogitScale = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Serve on Ray Serve replicas (docs/ray.md).", rich_help_panel="Ray")
    ] = False,
    address: Annotated[Optional[str], typer.Option(
        "--address", help="With --ray: the Ray cluster to join (default: a local Ray on "
        "127.0.0.1).", rich_help_panel="Ray")] = None,
    replicas: Annotated[int, typer.Option(
        "--replicas", help="With --ray: replicas, each with its own engine.",
        rich_help_panel="Ray")] = 1,
    max_replicas: Annotated[Optional[int], typer.Option(
        "--max-replicas", help="With --ray: autoscale from --replicas up to this many.",
        rich_help_panel="Ray")] = None,
    num_cpus: Annotated[float, typer.Option(
        "--num-cpus", help="With --ray: CPUs per replica.", rich_help_panel="Ray")] = 1.0,
    num_gpus: Annotated[float, typer.Option(
        "--num-gpus", help="With --ray: GPUs per replica.", rich_help_panel="Ray")] = 0.0,
) -> None:
    """Serve the bundle at --engine: POST /v1/segment, the demo page at /, /metrics."""
    try:
        _require_serve_extra()
        from segclip.runtime.serve.settings import ServeConfigError, ServeSettings, read_api_keys

        if workers < 1:
            raise ServeConfigError(f"workers must be >= 1, got {workers}")
        keys = read_api_keys(api_key_file) if api_key_file is not None else frozenset()
        settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue,
                                 timeout_s=timeout_s, max_body_mb=max_body_mb,
                                 max_pixels=max_pixels, api_keys=keys)
        dense = dense_options(engine, background_names, pamr, area_thd, logit_scale)
        config = {"engine": str(engine), "device": device, "variant": variant,
                  "threads": threads, "dense": dense,
                  "settings": {**asdict(settings), "api_keys": sorted(keys)}}
        ray_only = {"--address": address is not None, "--replicas": replicas != 1,
                    "--max-replicas": max_replicas is not None, "--num-cpus": num_cpus != 1.0,
                    "--num-gpus": num_gpus != 0.0}
        if not ray and any(ray_only.values()):
            given = ", ".join(name for name, set_ in ray_only.items() if set_)
            raise ServeConfigError(f"{given} only apply with --ray; add --ray or drop them")
        if ray:
            from segclip.runtime.serve.ray import RayServeOptions, serve_forever

            if workers != 1:
                raise ServeConfigError("--workers starts local processes; with --ray use "
                                       "--replicas")
            serve_forever(RayServeOptions(
                bundle=str(engine), device=device, variant=variant, threads=threads,
                replicas=replicas, max_replicas=max_replicas, num_cpus=num_cpus,
                num_gpus=num_gpus, settings=settings, dense=dense), host=host, port=port,
                address=address)
            return
        application = create_app(config)  # opens the bundle and loads the engines: fail here
    except SegclipError as e:
        raise fail(e) from None
    import uvicorn

    if workers == 1:
        uvicorn.run(application, host=host, port=port, **UVICORN_LOGS)
        return
    application.state.engine.segmenter.close()  # each worker process opens its own
    os.environ[ENV_CONFIG] = json.dumps(config)
    uvicorn.run("segclip.runtime.serve.cli:create_app_from_env", factory=True, host=host,
                port=port, workers=workers, **UVICORN_LOGS)


if __name__ == "__main__":
    app()

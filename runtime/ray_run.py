"""`segclip-run --ray`: the batch run of `segclip.runtime.runner` on Ray Data (docs/ray.md,
docs/architecture.md "Command contracts").

The driver plans the run exactly as `run_images` does (same inputs, output names, skip-existing
test, summary) and checks what it can before Ray starts: the inputs exist, the labels file is
valid, the bundle opens. The images still to do become a dataset of (index, source, name) rows,
streamed through `map_batches` over a pool of `actors` actors (`concurrency=actors`), each
holding one `Segmenter` with `num_cpus` CPUs (its ONNX Runtime threads) and `num_gpus` GPUs.
An actor reads each image straight from its path or URI, segments it with `Segmenter.segment`
(the call `segclip-run` makes) and writes the result triple with the runner's writer: local
folders atomically (temp file + rename, JSON last), URIs (`s3://...`) via pyarrow filesystems,
JSON last. Only small status rows (error, timings, backend) go back to the driver, which draws
the progress bar and fills the same `RunReport`. The files are those `segclip-run` writes,
byte for byte for the label maps; the JSON differs only in timings.

A run stopped at any point leaves complete triples and, at most, files without their JSON; a
second run with `skip_existing` does exactly the images whose JSON is missing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segclip.runtime import _uri
from segclip.runtime._ray import ray_session, unwrap_ray_error
from segclip.runtime.errors import ImageError, OutputError, RuntimeSegclipError
from segclip.runtime.images import DEFAULT_MAX_PIXELS, load_image
from segclip.runtime.runner import (
    IMAGE_SUFFIXES,
    OVERLAY_SUFFIX,
    RunItem,
    RunReport,
    _discard,
    _write_result,
    collect_images,
    plan_outputs,
    result_extra,
    run_record,
    sanitize_name,
    up_to_date,
)

DEFAULT_BATCH_IMAGES = 4  # images per actor call: small, so the pool stays balanced


def _decode(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file's bytes (the checks of `images.load_image`)."""
    from PIL import Image

    if not data:
        raise ImageError(f"image file {uri} is empty (0 bytes); replace it with a real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                return load_image(image, max_pixels)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {uri} is over Pillow's decompression-bomb limit ({e}); "
                         f"downscale it first") from e
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read {uri} as an image ({e}); pass a PNG, JPEG or other "
                         f"image file Pillow can open") from e


def plan_sources(inputs: Sequence[str | os.PathLike], out: str) -> list[tuple[str, str]]:
    """(source, output name) per image, in input order: local inputs exactly as `segclip-run`
    plans them; URIs listed one level deep and named by the same rule."""
    texts = [str(raw) for raw in inputs]
    if not any(_uri.is_uri(t) for t in texts) and not _uri.is_uri(out):
        return [(str(i.source), i.name) for i in plan_outputs(collect_images(texts), Path(out))]
    sources: list[str] = []
    for text in texts:
        found = (_uri.list_images(text, IMAGE_SUFFIXES) if _uri.is_uri(text)
                 else [str(p) for p in collect_images([text])])
        sources.extend(s for s in found if s not in sources)
    if not sources:
        raise ImageError("no images given; pass image files, folders or URIs")
    taken: set[str] = set()
    planned = []
    for source in sources:
        stem = source.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        base = name = sanitize_name(stem)
        counter = 1
        while name.casefold() in taken or any(
                _uri.join(out, f"{name}{s}") in sources for s in (".png", OVERLAY_SUFFIX, ".json")):
            counter += 1
            name = f"{base}_{counter}"
        taken.add(name.casefold())
        planned.append((source, name))
    return planned


def _complete(out: str, name: str, record: dict[str, Any]) -> bool:
    """The triple exists and its JSON was made for `record`."""
    if _uri.is_uri(out):
        files = [_uri.join(out, f"{name}{s}") for s in (".png", OVERLAY_SUFFIX, ".json")]
        if not _uri.all_exist(files):
            return False
        try:
            payload = json.loads(_uri.read_bytes(files[-1]))
        except (ImageError, ValueError):
            return False
        return isinstance(payload, dict) and payload.get("run") == record
    item = RunItem(Path(), name, Path(out))
    return item.complete() and up_to_date(item.json, record)


class SegmentActor:
    """One `Segmenter` in a Ray actor: segments a batch of rows and writes their files.

    `config` (engine, names, out, max_pixels, segmenter_options) is a class attribute of the
    subclass `_actor_class` makes, so it travels to the workers with the class.
    """

    config: dict[str, Any] = {}

    def __init__(self) -> None:
        self._setup(**self.config)

    def _setup(self, engine: str, names: Sequence[str], out: str, max_pixels: int,
               segmenter_options: dict[str, Any]) -> None:
        from segclip.runtime.segmenter import Segmenter

        self.fatal = ""
        self.out, self.max_pixels = out, max_pixels
        self.remote_out = _uri.is_uri(out)
        try:
            self.segmenter = Segmenter(engine, max_pixels=max_pixels, **segmenter_options)
            self.names = self.segmenter.labels(list(names))
            self._make_out()
        except RuntimeSegclipError as e:  # reported by the driver as the run's one-line error
            self.fatal = " ".join(str(e).split())
            return
        self.extra = result_extra(self.segmenter, run_record(
            engine, self.names, self.segmenter.threshold, segmenter_options.get("variant")))

    def _make_out(self) -> None:
        if self.remote_out:
            _uri.make_dir(self.out)
            return
        try:
            Path(self.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the output folder {self.out}: {e}") from e

    def _one(self, source: str, name: str) -> dict[str, float]:
        """Segment one image and write its triple; the timings of `segclip-run`. For a remote
        output the files are written to a folder of their own first, removed after upload."""
        where: Any = source if _uri.is_uri(source) else Path(source)  # a URI stays text
        if not self.remote_out:
            return self._segment(source, RunItem(where, name, Path(self.out)))
        with tempfile.TemporaryDirectory(prefix="segclip-ray-") as scratch:
            return self._segment(source, RunItem(where, name, Path(scratch)))

    def _segment(self, source: str, item: RunItem) -> dict[str, float]:
        remote_in = _uri.is_uri(source)
        try:
            began = time.perf_counter()
            image = (_decode(_uri.read_bytes(source), source, self.max_pixels) if remote_in
                     else load_image(item.source, self.max_pixels))  # (H, W, 3) uint8
            load_ms = (time.perf_counter() - began) * 1e3
            result = self.segmenter.segment(image, self.names)
            result.timings["load"] = load_ms
            result.timings["total"] += load_ms
            _write_result(item, image, result, self.extra)
            if self.remote_out:
                for path in item.files:  # the JSON last: it marks completion
                    _uri.upload(path.read_bytes(), _uri.join(self.out, path.name))
        except BaseException:
            _discard(item)
            if self.remote_out:
                for path in item.files:
                    _uri.delete(_uri.join(self.out, path.name))
            raise
        return dict(result.timings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors, timings = [], []
        for source, name in zip(batch["source"], batch["name"]):
            if self.fatal:
                errors.append(""), timings.append("{}")
                continue
            try:
                timings.append(json.dumps(self._one(str(source), str(name))))
                errors.append("")
            except RuntimeSegclipError as e:
                errors.append(" ".join(str(e).split()) or type(e).__name__)
                timings.append("{}")
        count = len(errors)
        info = "" if self.fatal else json.dumps(self.segmenter.backend_info)
        backend = "" if self.fatal else self.segmenter.backend
        return {"index": batch["index"], "error": np.array(errors, dtype=object),
                "timings": np.array(timings, dtype=object),
                "fatal": np.array([self.fatal] * count, dtype=object),
                "backend": np.array([backend] * count, dtype=object),
                "backend_info": np.array([info] * count, dtype=object)}


def _actor_class(config: dict[str, Any]) -> type[SegmentActor]:
    return type("SegmentActor", (SegmentActor,), {"config": config,
                                                  "__qualname__": "SegmentActor.configured"})


def _actor_resources(ray: Any, device: str, num_cpus: float, num_gpus: float | None,
                     local: bool) -> tuple[float, float]:
    """CPUs and GPUs per actor; on a local Ray, refuse GPUs it does not have (the pool would
    wait for them forever; a cluster's autoscaler may still add GPU nodes)."""
    if num_cpus <= 0:
        raise RuntimeSegclipError(f"--num-cpus must be > 0 per actor, got {num_cpus}")
    present = ray.cluster_resources().get("GPU", 0)
    if num_gpus is None:  # one GPU per actor where the device asks for or allows one
        num_gpus = 1.0 if device.startswith("cuda") or (device == "auto" and present > 0) else 0.0
    if num_gpus < 0:
        raise RuntimeSegclipError(f"--num-gpus must be >= 0 per actor, got {num_gpus}")
    if local and num_gpus > present:
        raise RuntimeSegclipError(
            f"each actor asks for {num_gpus:g} GPU(s) but this machine's Ray has {present:g}; "
            f"pass --device cpu, or --num-gpus 0 to run --device cuda without Ray GPU slots")
    return float(num_cpus), float(num_gpus)


def run_images_ray(engine: str | os.PathLike, labels: str | os.PathLike | Sequence[str],
                   inputs: Sequence[str | os.PathLike], out: str | os.PathLike = "out/run",
                   threshold: float | None = None, device: str = "auto",
                   skip_existing: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                   progress: bool = True, report_error: Callable[[str], None] | None = None,
                   address: str | None = None, actors: int = 1,
                   batch_images: int = DEFAULT_BATCH_IMAGES, num_cpus: float = 1.0,
                   num_gpus: float | None = None, **segmenter_options: Any) -> RunReport:
    """Segment every input on a Ray Data actor pool and write `segclip-run`'s files to `out`.

    Args:
        engine: bundle directory (or its image graph), readable at the same path on every node.
        inputs: image files, folders, or URIs of either (`s3://bucket/dir`).
        out: a local folder (shared by every node of a cluster) or a URI.
        address: Ray cluster to join; None starts a local Ray on 127.0.0.1 for this run.
        actors: size of the actor pool (each actor holds one Segmenter).
        batch_images: images per actor call.
        num_cpus, num_gpus: resources per actor (GPUs default to 1 with a GPU device).
        segmenter_options: passed to `Segmenter` (batch_size, variant, cache_dir, ...).
    Raises:
        RuntimeSegclipError subclasses for anything wrong before the first image (nothing is
        written then); per-image errors are collected in `RunReport.failed`.
    """
    from tqdm import tqdm

    from segclip.runtime.bundle import Bundle
    from segclip.runtime.labels import load_labels

    if actors < 1 or batch_images < 1:
        raise RuntimeSegclipError(f"--actors and --batch-size must be >= 1, got {actors} and "
                                  f"{batch_images}")
    say = report_error or (lambda line: tqdm.write(line, file=sys.stderr))
    out = str(out)
    if not _uri.is_uri(out) and Path(out).exists() and not Path(out).is_dir():
        raise OutputError(f"--out {out} exists and is not a directory; choose another path")
    planned = plan_sources(inputs, out)
    names = load_labels(labels)
    Bundle.open(engine)  # a missing or corrupt bundle fails here, before Ray starts
    report = RunReport(out=Path(out) if not _uri.is_uri(out) else out,  # type: ignore[arg-type]
                       total=len(planned))
    record = run_record(engine, names, threshold, segmenter_options.get("variant"))
    todo = [(i, s, n) for i, (s, n) in enumerate(planned)
            if not (skip_existing and _complete(out, n, record))]
    report.skipped = len(planned) - len(todo)
    if not todo:
        return report
    local_cpus = max(os.cpu_count() or 1, int(np.ceil(actors * num_cpus)))
    with ray_session(address, num_cpus=None if address else local_cpus) as ray:
        cpus, gpus = _actor_resources(ray, device, num_cpus, num_gpus, local=not address)
        options = {"device": device, "threshold": threshold,
                   "threads": max(1, int(cpus)), **segmenter_options}
        _run_pool(ray, todo, planned, engine, names, out, max_pixels, options, actors,
                  batch_images, cpus, gpus, report, say, progress)
    return report


def _run_pool(ray: Any, todo: list[tuple[int, str, str]], planned: list[tuple[str, str]],
              engine: Any, names: Sequence[str], out: str, max_pixels: int,
              options: dict[str, Any], actors: int, batch_images: int, cpus: float,
              gpus: float, report: RunReport, say: Callable[[str], None], progress: bool,
              ) -> None:
    import importlib

    from tqdm import tqdm

    ray_data = importlib.import_module("ray.data")
    context = ray_data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    rows = [{"index": i, "source": s, "name": n} for i, s, n in todo]
    dataset = ray_data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_images)))
    actor = _actor_class({"engine": str(engine), "names": list(names), "out": out,
                          "max_pixels": max_pixels, "segmenter_options": options})
    results = dataset.map_batches(
        actor, batch_size=batch_images, batch_format="numpy",
        compute=ray_data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus)
    failed: list[tuple[int, Any, str]] = []
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the bar below says how it goes
    bar = tqdm(total=len(todo), desc="segclip-run --ray", unit="img", disable=not progress,
               file=sys.stderr)
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for index, error, timing, fatal, backend, info in zip(
                    batch["index"], batch["error"], batch["timings"], batch["fatal"],
                    batch["backend"], batch["backend_info"]):
                if fatal:
                    raise RuntimeSegclipError(str(fatal))
                if backend and not report.backend:
                    report.backend, report.backend_info = str(backend), json.loads(str(info))
                source = planned[int(index)][0]
                if error:
                    failed.append((int(index), source if _uri.is_uri(source) else Path(source),
                                   str(error)))
                    where = "" if source in str(error) else f"{source}: "
                    say(f"error: {where}{error} (skipped; continuing)")
                else:
                    report.processed += 1
                    report.timings.append(json.loads(str(timing)))
                bar.update(1)
    except ray.exceptions.RayError as e:
        cause = unwrap_ray_error(e)
        if isinstance(cause, RuntimeSegclipError):
            raise cause from None
        raise
    finally:
        bar.close()
    report.failed.extend((source, error) for _, source, error in sorted(failed))

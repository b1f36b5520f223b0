"""The batch run behind `segclip-run` (docs/architecture.md "Command contracts"): images in, result
files out.

For each input image, `OUT/NAME.png` (label map: 0 background, i = i-th label; palette PNG up to
255 labels), `OUT/NAME_overlay.jpg` (tinted image + legend) and `OUT/NAME.json` (labels, image
size, per-label pixel counts and fractions summing to 1 with background, timings, backend). Each
file is written atomically and the JSON last, so a complete triple is recognisable;
`skip_existing` skips exactly the images whose triple exists (and `NAME_conf.png` when a
confidence map is asked for) and whose JSON records the same bundle, labels, threshold and variant
(`run_record`).

Everything that can be checked up front is checked before OUT is touched: the inputs exist, the
labels file is valid, the bundle opens and its engines load on the device. A bad image among
many does not stop the run: its error is reported (one line), any file already written for it is
removed, the other images are processed, and the run ends with `failed` set, which the CLI turns
into exit code 2 after the summary.

Output names: the image's file stem with characters outside letters, digits, `_`, `-` and `.`
replaced by `_` and leading dots dropped, so a name never leaves OUT or hides; two inputs with the
same name (from different folders) get `_2`, `_3`, ... in input order, which is stable, so a
second run finds the same names. Folders are scanned one level deep, in sorted order.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segclip.runtime._atomic import atomic_write_bytes
from segclip.runtime.errors import ImageError, OutputError, RuntimeSegclipError
from segclip.runtime.images import DEFAULT_MAX_PIXELS, load_image
from segclip.runtime.visualize import write_confidence_png, write_label_png, write_overlay_jpeg

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OVERLAY_SUFFIX = "_overlay.jpg"
CONFIDENCE_SUFFIX = "_conf.png"  # with --confidence: 8-bit max label probability per pixel
MAX_NAME = 120  # characters of an output name (before the collision suffix)
MAX_NAME_BYTES = 200  # its UTF-8 bytes: "_overlay.jpg", "_N" and the temp file's affixes fit 255
STAGE_KEYS = ("load", "preprocess", "image", "text", "assign", "write")


@dataclass(frozen=True)
class RunItem:
    """One input image and the three files it produces."""

    source: Path
    name: str
    out: Path

    @property
    def label_png(self) -> Path:
        return self.out / f"{self.name}.png"

    @property
    def overlay(self) -> Path:
        return self.out / f"{self.name}{OVERLAY_SUFFIX}"

    @property
    def json(self) -> Path:
        return self.out / f"{self.name}.json"

    @property
    def confidence_png(self) -> Path:
        return self.out / f"{self.name}{CONFIDENCE_SUFFIX}"

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.label_png, self.overlay, self.json  # the JSON last: it marks completion

    def complete(self) -> bool:
        return all(path.is_file() for path in self.files)


@dataclass
class RunReport:
    """What a run did: counts, per-image timings, failures, and the backend used."""

    out: Path
    backend: str = ""
    backend_info: dict[str, Any] = field(default_factory=dict)
    total: int = 0
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)

    def mean_ms(self, stage: str = "wall") -> float:
        values = [t.get(stage, 0.0) for t in self.timings]
        return sum(values) / len(values) if values else float("nan")

    def table(self) -> str:
        """The summary printed at the end of `segclip-run`."""
        info = self.backend_info
        engine = ", ".join(str(info[k]) for k in ("image", "variant", "precision") if k in info)
        header = ["images", "done", "skipped", "failed", "wall ms/img", "backend"]
        row = [str(self.total), str(self.processed), str(self.skipped), str(len(self.failed)),
               f"{self.mean_ms():.1f}" if self.timings else "-",
               f"{self.backend} ({engine})" if engine else self.backend]
        widths = [max(len(a), len(b)) for a, b in zip(header, row)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                 for line in (header, row)]
        if self.timings:
            stages = " | ".join(f"{k} {self.mean_ms(k):.1f}" for k in STAGE_KEYS)
            lines.append(f"mean ms per image: wall {self.mean_ms():.1f} = {stages} (+ rest)")
        lines.append(f"results in {self.out}")
        return "\n".join(lines)


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, and those one level inside named folders (sorted)."""
    if not inputs:
        raise ImageError("no images given; pass image files or folders of images")
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ImageError(f"input {path} does not exist; pass image files or folders")
        if path.is_dir():
            members = sorted(p for p in path.iterdir() if p.is_file()
                             and not p.name.startswith(".")
                             and p.suffix.lower() in IMAGE_SUFFIXES)
            if not members:
                raise ImageError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                 f"pass a folder of images or image files")
        else:
            members = [path]
        for member in members:
            key = member.resolve()
            if key not in seen:
                seen.add(key)
                found.append(member)
    return found


def sanitize_name(stem: str) -> str:
    """A safe output name for an image stem: no separators, no leading dots, not empty."""
    name = re.sub(r"[^\w.\-]+", "_", stem).lstrip(".")
    name = name[:MAX_NAME]
    while len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        name = name[:-1]
    name = name.rstrip(".") or "image"
    return name


def plan_outputs(images: Sequence[Path], out: Path) -> list[RunItem]:
    """One `RunItem` per image, names made unique (case-insensitively) in input order."""
    taken: set[str] = set()
    inputs = {p.resolve() for p in images}
    items = []
    for image in images:
        base = sanitize_name(image.stem)
        name, counter = base, 1
        while True:
            item = RunItem(image, name, out)
            clash = name.casefold() in taken or any(
                path.resolve() in inputs for path in item.files)  # never overwrite an input
            if not clash:
                break
            counter += 1
            name = f"{base}_{counter}"
        taken.add(name.casefold())
        items.append(item)
    return items


def _write_result(item: RunItem, image: Any, result: Any, extra: dict[str, Any]) -> None:
    write_label_png(item.label_png, result.label_map, len(result.labels))
    write_overlay_jpeg(item.overlay, image, result.label_map, result.labels)
    files = {"label_map": item.label_png.name, "overlay": item.overlay.name}
    if result.confidence is not None:
        write_confidence_png(item.confidence_png, result.confidence)
        files["confidence"] = item.confidence_png.name
    payload = {"image": str(item.source), "name": item.name, **result.to_json(), **extra,
               "files": files}
    try:
        atomic_write_bytes(item.json, (json.dumps(payload, indent=2, ensure_ascii=False)
                                       + "\n").encode("utf-8"))
    except OSError as e:
        raise OutputError(f"cannot write {item.json}: {e}") from e


def run_record(engine: str | os.PathLike, names: Sequence[str], threshold: float | None,
               variant: str | None, dense: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a result depends on: the bundle (folder and manifest hash), the labels, the
    threshold and the image-graph variant asked for (and a dense bundle's options: background
    names, PAMR, area_thd, logit scale). Every result JSON holds it under "run", and
    `skip_existing` keeps only results whose record is this one."""
    from segclip.runtime.bundle import Bundle

    bundle = Bundle.open(engine)
    chosen = bundle.threshold if threshold is None else float(threshold)
    record = {"bundle": str(Path(bundle.root).resolve()),
              "manifest_sha256": bundle.manifest_sha256,
              "labels": list(names), "threshold": chosen,
              "variant": variant or bundle.requested_variant or "default"}
    if dense:
        record["dense"] = {k: list(v) if isinstance(v, (tuple, list)) else v
                           for k, v in sorted(dense.items())}
    return record


def up_to_date(json_path: Path, record: dict[str, Any]) -> bool:
    """True when `json_path` exists and was written for exactly `record` (`run_record`)."""
    try:
        payload = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("run") == record


def result_extra(segmenter: Any, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every result JSON records about the run besides the result (`segclip-run --ray`
    writes the same)."""
    extra = {"bundle": str(segmenter.bundle.root), "backend_info": segmenter.backend_info}
    if record is not None:
        extra["run"] = record
    return extra


def _check_out(out: Path) -> None:
    """Refuse an OUT that cannot be created, before any image runs (nothing is created)."""
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create the output folder {out}: {ancestor} is not a "
                          f"directory; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create the output folder {out}: {ancestor} is not "
                          f"writable; choose another --out")


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {out}: {e}") from e


def _discard(item: RunItem) -> None:
    for path in (*item.files, item.confidence_png):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


DENSE_OPTIONS = ("background", "pamr", "area_thd", "logit_scale")  # DenseSegmenter's own


def run_images(engine: str | os.PathLike, labels: str | os.PathLike | Sequence[str],
               inputs: Sequence[str | os.PathLike], out: str | os.PathLike = "out/run",
               threshold: float | None = None, device: str = "auto",
               skip_existing: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
               progress: bool = True, report_error: Callable[[str], None] | None = None,
               **segmenter_options: Any) -> RunReport:
    """Segment every input image and write its result triple to `out` (module docstring).

    Args:
        engine: bundle directory, or its image.onnx / image.fp16.onnx / image.plan.
        labels: labels file (one per line) or list.
        report_error: called with one line per failed image (default: stderr).
        segmenter_options: passed to `Segmenter` (batch_size, cache_dir, threads, ...).
    Raises:
        RuntimeSegclipError subclasses for anything wrong before the first image (nothing is
        written then); per-image errors are collected in `RunReport.failed`.
    """
    from tqdm import tqdm

    from segclip.runtime.segmenter import Segmenter

    say = report_error or (lambda line: tqdm.write(line, file=sys.stderr))
    images = collect_images(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory; choose another path")
    segmenter = Segmenter(engine, device=device, threshold=threshold, max_pixels=max_pixels,
                          **segmenter_options)
    try:
        names = segmenter.labels(labels)
        report = RunReport(out=out, backend=segmenter.backend,
                           backend_info=segmenter.backend_info, total=len(images))
        items = plan_outputs(images, out)
        record = run_record(segmenter.bundle, names, segmenter.threshold,
                            segmenter_options.get("variant"),
                            {k: v for k, v in segmenter_options.items() if k in DENSE_OPTIONS})
        wants_confidence = bool(segmenter_options.get("confidence"))
        todo = [item for item in items
                if not (skip_existing and item.complete() and up_to_date(item.json, record)
                        and (item.confidence_png.is_file() or not wants_confidence))]
        report.skipped = len(items) - len(todo)
        suffix = " (skipped; continuing)" if len(todo) > 1 else ""
        if todo:
            _check_out(out)
        extra = result_extra(segmenter, record)
        # A lone image gets no bar: its result or its one error line is all that is shown.
        for item in tqdm(todo, desc="segclip-run", unit="img",
                         disable=not progress or len(todo) < 2, file=sys.stderr):
            try:
                began = time.perf_counter()
                image = load_image(item.source, max_pixels)  # (H, W, 3) uint8
                load_ms = (time.perf_counter() - began) * 1e3
                result = segmenter.segment(image, names)
                result.timings["load"] = load_ms
                result.timings["total"] += load_ms
                written = time.perf_counter()
                _make_out(out)  # only once an image succeeded: a failed lone image writes nothing
                _write_result(item, image, result, extra)
                done = time.perf_counter()
            except RuntimeSegclipError as e:
                _discard(item)
                message = " ".join(str(e).split())
                report.failed.append((item.source, message))
                where = "" if str(item.source) in message else f"{item.source}: "
                say(f"error: {where}{message}{suffix}")
                continue
            report.processed += 1
            report.timings.append({**result.timings, "write": (done - written) * 1e3,
                                   "wall": (done - began) * 1e3})
        return report
    finally:
        segmenter.close()

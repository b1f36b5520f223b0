"""End-to-end job of bench/latency.py: `Segmenter.segment` on a synthetic photo.

Per label count: a first call (it computes the label embeddings), then timed calls reusing the
label set, with the Segmenter's own per-stage timings (preprocess, image, text, assign), and on
the CPU the image tower alone at the photo's window count in this process: the denominator of
the end-to-end / tower ratio.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import _inputs
from bench._latency_jobs import Settings, e2e_geometry, timed_case
from bench._measure import HostMemory
from bench._towers import OrtRunner, Unavailable, read_manifest


def _segmenter_kwargs(segmenter_cls: Any, threads: int, variant: str | None) -> dict[str, Any]:
    names = inspect.signature(segmenter_cls.__init__).parameters  # Segmenter has a __new__
    kwargs: dict[str, Any] = {"threads": threads} if "threads" in names else {}
    if variant and "variant" in names:
        kwargs["variant"] = variant
    return kwargs


def run_segment(spec: str, settings: Settings) -> dict[str, Any]:
    """`Segmenter(bundle, device, variant).segment(image, labels)` per label count (labels
    cached after the first call), its per-stage timings, and (CPU) the image tower alone at the
    image's window count in this process, for the end-to-end / tower ratio.

    Args:
        spec: "cpu:fp32", "cpu:int8" (ONNX Runtime image graph) or "cuda" (the runtime's pick:
            TensorRT when the bundle has engines, else ONNX Runtime CUDA).
    """
    device, _, variant = spec.partition(":")
    head = {"device": device, "variant": variant or "runtime default"}
    try:
        from segclip.runtime import Segmenter
    except ImportError as e:
        return {**head, "status": "skipped",
                "reason": f"segclip.runtime.Segmenter is not available in this checkout ({e})"}
    bundle = Path(settings.bundle)
    size = read_manifest(bundle)["model"]["image_size"]
    out_hw, resized, count = e2e_geometry(settings, size)
    kwargs = _segmenter_kwargs(Segmenter, settings.threads, variant or None)
    try:
        segmenter = Segmenter(str(bundle), device=device, **kwargs)
    except Exception as e:  # a missing GPU, provider or graph: the runtime's own message
        return {**head, "status": "skipped",
                "reason": f"Segmenter(device={device!r}, {kwargs}) failed: "
                          f"{type(e).__name__}: {e}"}
    scene = _inputs.synthetic_scene(*out_hw, seed=settings.seed)
    memory = HostMemory()
    result: dict[str, Any] = {**head, "status": "ok", "segmenter_kwargs": kwargs,
                              "backend_info": getattr(segmenter, "backend_info", None),
                              "image_size": list(out_hw), "resized": list(resized),
                              "windows": count, "cases": []}
    for labels in settings.labels:
        names = _inputs.label_names(labels)
        start = time.perf_counter()
        first = segmenter.segment(scene, names)
        first_ms = (time.perf_counter() - start) * 1e3
        if np.asarray(first.label_map).shape != tuple(out_hw):
            raise RuntimeError(f"label map {np.asarray(first.label_map).shape} != {out_hw}")
        stages: list[dict[str, float]] = []

        def run(names: list[str] = names, stages: list = stages) -> Any:
            out = segmenter.segment(scene, names)
            stages.append(dict(getattr(out, "timings", {})))
            return out

        case = {"labels": labels, "first_call_ms": round(first_ms, 2),
                "note": "first call includes the text tower; timed calls reuse the label set"}
        case.update(timed_case(run, None, settings, "cpu", memory, 1))
        keys = sorted({k for t in stages for k in t})
        case["stages_median_ms"] = {k: float(np.median([t.get(k, 0.0) for t in stages]))
                                    for k in keys}
        result["cases"].append(case)
    result["tower"] = _segment_tower(device, variant, bundle, settings, count, size, memory)
    return result


def _segment_tower(device: str, variant: str, bundle: Path, settings: Settings, count: int,
                   size: int, memory: HostMemory) -> dict[str, Any]:
    """The image tower alone at `count` windows, as the e2e ratio's denominator (CPU: the
    same graph in a bench ONNX Runtime session; cuda: not timed here, the Segmenter's own
    "image" stage is the reference)."""
    if device != "cpu":
        return {"status": "skipped", "reason": "on cuda the ratio uses the Segmenter's own "
                                               "'image' stage timing"}
    try:
        if variant.startswith("ov-"):
            from bench._towers import OvRunner

            name = variant
            tower: Any = OvRunner(name, bundle, settings.threads)
        elif variant == "auto":
            return {"status": "skipped", "reason": "variant auto: the Segmenter's own 'image' "
                                                   "stage is the reference"}
        else:
            name = "ort-int8" if variant == "int8" else "ort-cpu"
            tower = OrtRunner(name, bundle, settings.threads)
    except Unavailable as e:
        return {"status": "skipped", "reason": str(e)}
    run = tower.image(_inputs.windows(count, size, settings.seed))
    return {**tower.info, "backend": name, "batch": count,
            **timed_case(run, tower.sync, settings, tower.device, memory, count)}

"""The measurements of bench/latency.py, one job per backend (each normally in its own process,
so that thread pools, allocators and peak RSS of one backend never touch another's).

Jobs: `peak` (matmul ceilings), `backend:<name>` (image tower per batch, text tower per label
count, and for ort-int8 the pixel agreement with ort-cpu), `interleaved:<names>` (the same for
several CPU backends timed round-robin in one process), `assign` (the runtime's fused label
assignment on real tower outputs), `segment:<spec>` (end-to-end `Segmenter.segment`:
bench/_e2e.py).
Legend: B images, S window side, L regions, T labels, D embedding width.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import _inputs
from bench._machine import load_average
from bench._measure import HostMemory, LoopLimits, SchedClock, device_memory_used, time_calls
from bench._stats import summarize
from bench._towers import OrtRunner, Runner, TorchRunner, Unavailable, read_manifest

AGREEMENT_IMAGES = 4
REDUCED = ("ort-int8", "ov-bf16", "ov-int8", "torch-bf16")  # agreement with ort-cpu measured
AGREEMENT_LABELS = 20


@dataclass
class Settings:
    """What every job needs (JSON round-trips it into worker processes)."""

    bundle: str
    checkpoint: str | None = None
    preset: str | None = None
    threads: int = 1
    batches: list[int] = field(default_factory=lambda: [1])
    labels: list[int] = field(default_factory=lambda: [1])
    limits: dict[str, Any] = field(default_factory=dict)
    e2e_size: list[int] = field(default_factory=lambda: [375, 500])
    trt_build: str | None = None
    peak_size: int = 2048  # side of the square GEMMs that measure the CPU peak
    seed: int = 0

    @property
    def loop(self) -> LoopLimits:
        return LoopLimits(**self.limits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_threads(threads: int) -> dict[str, Any]:
    """Pin torch's pools (when torch is used) to `threads` intra-op and 1 inter-op thread."""
    import sys

    if "torch" not in sys.modules:
        return {}
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed once parallel work ran (in-process mode)
        pass
    return {"torch_threads": torch.get_num_threads()}


def timed_case(run: Any, runner_sync: Any, settings: Settings, device: str,
                memory: HostMemory, units: int) -> dict[str, Any]:
    torch = None
    if device == "cuda":
        try:
            import torch

            torch.cuda.reset_peak_memory_stats()
        except (ImportError, RuntimeError):  # a torch-free GPU install: no device figures
            torch = None
    memory.reset()
    clock = SchedClock()
    samples = time_calls(run, settings.loop, runner_sync)
    case: dict[str, Any] = {"status": "ok", "latency": summarize(samples),
                            "memory": memory.read(), "sched": clock.read()}
    case["throughput_per_s"] = units / float(np.median(samples))
    if torch is not None:
        case["device_memory"] = {"used_mb": round((device_memory_used() or 0) / 2 ** 20, 1),
                                 "torch_peak_allocated_mb":
                                 round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
    return case


def make_runner(name: str, settings: Settings) -> Runner:
    bundle = Path(settings.bundle)
    if name in ("torch", "torch-bf16", "torch-cuda"):
        import torch

        from bench._towers import build_torch_model

        if name == "torch-cuda" and not torch.cuda.is_available():
            raise Unavailable("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
        if settings.checkpoint is None and settings.preset is None:
            raise Unavailable("no weights for PyTorch: the bundle holds ONNX graphs only; pass "
                              "--checkpoint CKPT, or --preset NAME for random weights")
        model = build_torch_model(Path(settings.checkpoint) if settings.checkpoint else None,
                                  settings.preset, settings.seed)
        runner = TorchRunner(model, "cuda" if name == "torch-cuda" else "cpu", settings.threads,
                             bf16=name == "torch-bf16")
        runner.info["weights"] = (f"checkpoint {Path(settings.checkpoint).name}"
                                  if settings.checkpoint else
                                  f"preset {settings.preset}, random (seed {settings.seed})")
        return runner
    if name.startswith("ort-"):
        return OrtRunner(name, bundle, settings.threads)
    if name.startswith("ov-"):
        from bench._towers import OvRunner

        return OvRunner(name, bundle, settings.threads)
    if name.startswith("trt-"):
        from bench._tensorrt import TrtRunner

        high = max(settings.batches)
        profile = (1, min(8, high), high)
        return TrtRunner(name, bundle, Path(settings.trt_build) if settings.trt_build else None,
                         profile, settings.threads)
    raise Unavailable(f"unknown backend {name!r}")


def run_backend(name: str, settings: Settings) -> dict[str, Any]:
    """Image tower per batch and text tower per label count on one backend."""
    bundle = Path(settings.bundle)
    manifest = read_manifest(bundle)
    size, context = manifest["model"]["image_size"], manifest["model"]["context_length"]
    if name.startswith("torch"):
        import torch  # noqa: F401  (so that set_threads pins it before the model is built)
    set_threads(settings.threads)
    memory = HostMemory()
    memory.reset()
    device_before = device_memory_used() if name.endswith(("cuda", "fp16", "fp32")) else None
    start = time.perf_counter()
    try:
        runner = make_runner(name, settings)
    except Unavailable as e:
        return {"backend": name, "status": "skipped", "reason": str(e)}
    result: dict[str, Any] = {"backend": name, "status": "ok", "device": runner.device,
                              "info": runner.info,
                              "load_seconds": round(time.perf_counter() - start, 3),
                              "load_memory": memory.read(), "image": [], "text": []}
    if device_before is not None:
        result["device_memory_before_mb"] = round(device_before / 2 ** 20, 1)
    for batch in settings.batches:
        case: dict[str, Any] = {"batch": batch}
        try:
            images = _inputs.windows(batch, size, settings.seed)
            case.update(timed_case(runner.image(images), runner.sync, settings, runner.device,
                                    memory, batch))
        except Unavailable as e:
            case.update(status="skipped", reason=str(e))
        engine_only = getattr(runner, "image_engine_only", None)
        if engine_only is not None:  # TensorRT: the plan alone on device-resident input
            try:
                case["engine_only"] = timed_case(engine_only(images), runner.engine.sync,
                                                  settings, runner.device, memory, batch)
            except Unavailable as e:
                case["engine_only"] = {"status": "skipped", "reason": str(e)}
        result["image"].append(case)
    for count in settings.labels:
        case = {"labels": count}
        try:
            tokens = _inputs.prompt_tokens(bundle, _inputs.label_names(count), context)
            run = runner.text(tokens)
            case.update(timed_case(run, runner.sync, settings, runner.device, memory, count))
        except Unavailable as e:
            case.update(status="skipped", reason=str(e))
        result["text"].append(case)
    if name in REDUCED:
        result["agreement"] = int8_agreement(runner, bundle, settings)
    return result


def run_interleaved(spec: str, settings: Settings) -> list[dict[str, Any]]:
    """The CPU backends of `spec` ("torch,ort-cpu,...") in one process, their cases timed
    round-robin (one call of each backend per round): load from other processes that comes and
    goes then slows all of them alike, so their ratios stay fair on a shared machine. Memory
    and run-queue figures are the shared process's (flagged `interleaved`)."""
    from bench._measure import time_interleaved

    names = spec.split(",")
    if any(n.startswith("torch") for n in names):
        import torch  # noqa: F401  (pinned by set_threads before the model is built)
    set_threads(settings.threads)
    bundle = Path(settings.bundle)
    model = read_manifest(bundle)["model"]
    size, context = model["image_size"], model["context_length"]
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    for name in names:
        start = time.perf_counter()
        try:
            runners[name] = make_runner(name, settings)
        except Unavailable as e:
            results[name] = {"backend": name, "status": "skipped", "reason": str(e)}
            continue
        results[name] = {"backend": name, "status": "ok", "device": runners[name].device,
                         "info": runners[name].info,
                         "load_seconds": round(time.perf_counter() - start, 3),
                         "image": [], "text": []}
    for name in runners:
        results[name]["interleaved"] = list(runners)
    memory = HostMemory()

    def sync() -> None:
        for runner in runners.values():
            runner.sync()

    stages = [("image", "batch", settings.batches, lambda n: _inputs.windows(n, size,
                                                                            settings.seed)),
              ("text", "labels", settings.labels, lambda n: _inputs.prompt_tokens(
                  bundle, _inputs.label_names(n), context))]
    for stage, key, sizes, make_input in stages:
        for count in sizes:
            data, fns = make_input(count), {}
            for name, runner in runners.items():
                try:
                    fns[name] = getattr(runner, stage)(data)
                except Unavailable as e:
                    results[name][stage].append({key: count, "status": "skipped",
                                                 "reason": str(e)})
            memory.reset()
            clock = SchedClock()
            samples = time_interleaved(fns, settings.loop, sync)
            shared = {"memory": memory.read(), "sched": clock.read(), "interleaved": list(fns)}
            for name, seconds in samples.items():
                results[name][stage].append({
                    key: count, "status": "ok", "latency": summarize(seconds),
                    "throughput_per_s": count / float(np.median(seconds)), **shared})
    for name in runners:
        if name in REDUCED:
            results[name]["agreement"] = int8_agreement(runners[name], bundle, settings)
    return [results[name] for name in names]


def _label_maps(outputs: list[np.ndarray], text: np.ndarray, manifest: dict[str, Any],
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, S) region index + 1 and (B, S, S) label maps from the image outputs."""
    from segclip.runtime.assign import assign_pixels, region_labels, region_scores

    global_, regions, assign = outputs
    inference = manifest["inference"]
    scores = region_scores(regions, global_, text, manifest["model"]["logit_scale"],
                           inference["top_k"])  # (B, L, T)
    identity = np.arange(1, assign.shape[1] + 1, dtype=np.uint16)  # region l -> l + 1
    region_maps = np.stack([assign_pixels(a, identity, (size, size)) for a in assign])
    label_maps = np.stack([assign_pixels(a, region_labels(s, inference["threshold"]),
                                         (size, size)) for a, s in zip(assign, scores)])
    return region_maps, label_maps


def int8_agreement(runner: Runner, bundle: Path, settings: Settings) -> dict[str, Any]:
    """Per-pixel agreement of a reduced-precision backend (ort-int8, ov-bf16, ov-int8,
    torch-bf16) with ort-cpu (fp32) on synthetic scenes: the region argmax (assign upsampled to
    S x S) and the final label map (20 labels, bundle defaults)."""
    manifest = read_manifest(bundle)
    size, context = manifest["model"]["image_size"], manifest["model"]["context_length"]
    reference = OrtRunner("ort-cpu", bundle, settings.threads)
    images = _inputs.windows(AGREEMENT_IMAGES, size, settings.seed + 100)
    tokens = _inputs.prompt_tokens(bundle, _inputs.label_names(AGREEMENT_LABELS), context)
    text = reference.text_outputs(tokens)  # (T, D)
    want = _label_maps(reference.image_outputs(images), text, manifest, size)
    got = _label_maps(runner.image_outputs(images), text, manifest, size)
    region = (got[0] == want[0]).reshape(AGREEMENT_IMAGES, -1).mean(axis=1)  # (B,)
    label = (got[1] == want[1]).reshape(AGREEMENT_IMAGES, -1).mean(axis=1)  # (B,)
    return {"reference": "ort-cpu (image.onnx, fp32)", "images": AGREEMENT_IMAGES,
            "labels": AGREEMENT_LABELS, "scenes": "synthetic shapes",
            "region_argmax_mean": float(region.mean()), "region_argmax_min": float(region.min()),
            "label_map_mean": float(label.mean()), "label_map_min": float(label.min())}


def e2e_geometry(settings: Settings, size: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    from segclip.runtime.windows import resized_size, window_grid

    height, width = settings.e2e_size
    resized = resized_size(height, width, size)
    grid = window_grid(*resized, size)
    return (height, width), resized, grid[0] * grid[1]


def run_assign(settings: Settings) -> dict[str, Any]:
    """Label assignment (runtime/assign.py, numpy) per label count, on real ort-cpu outputs:
    one S x S window, and the e2e image (its windows, at its original size)."""
    from segclip.runtime.assign import assign_pixels, assign_windows, region_labels, region_scores

    bundle = Path(settings.bundle)
    manifest = read_manifest(bundle)
    if manifest.get("kind") == "dense":  # docs/dense.md: no regions to assign
        return {"status": "skipped", "reason": "a dense bundle labels pixels with the dense "
                "protocol (timed by bench/dense.py and in end-to-end segment)"}
    size, context = manifest["model"]["image_size"], manifest["model"]["context_length"]
    scale, top_k = manifest["model"]["logit_scale"], manifest["inference"]["top_k"]
    threshold = manifest["inference"]["threshold"]
    out_hw, resized, count = e2e_geometry(settings, size)
    runner = OrtRunner("ort-cpu", bundle, settings.threads)
    global_, regions, assign = runner.image_outputs(_inputs.windows(count, size, settings.seed))
    memory = HostMemory()
    cases = []
    for labels in settings.labels:
        text = runner.text_outputs(_inputs.prompt_tokens(
            bundle, _inputs.label_names(labels), context))  # (T, D)

        def window() -> Any:
            scores = region_scores(regions[0], global_[0], text, scale, top_k)  # (L, T)
            return assign_pixels(assign[0], region_labels(scores, threshold), (size, size))

        def image() -> Any:
            scores = region_scores(regions, global_, text, scale, top_k)  # (n, L, T)
            table = np.stack([region_labels(s, threshold) for s in scores])  # (n, L)
            return assign_windows(assign, table, resized, size, out_hw)

        for name, run, shape in (("window", window, (size, size)), ("image", image, out_hw)):
            case = {"labels": labels, "output": name, "size": list(shape), "windows":
                    1 if name == "window" else count}
            case.update(timed_case(run, None, settings, "cpu", memory, 1))
            cases.append(case)
    return {"status": "ok", "device": "cpu", "implementation": "segclip.runtime.assign (numpy)",
            "steps": "region_scores + region_labels + assign_pixels/assign_windows",
            "cases": cases}


def run_peak(settings: Settings) -> dict[str, Any]:
    from bench._peak import cpu_fp32_peak, cpu_low_precision_peaks, gpu_peaks

    set_threads(settings.threads)
    clock = SchedClock()
    cpu = cpu_fp32_peak(settings.threads, settings.peak_size)
    cpu["sched"] = clock.read()
    low = cpu_low_precision_peaks(settings.threads, settings.peak_size)
    return {"cpu_fp32": cpu, **{f"cpu_{k}": v for k, v in low.items()}, "gpu": gpu_peaks(),
            "load_average": load_average()}


def run_job(job: str, settings: Settings) -> dict[str, Any]:
    """Dispatch one job by name (`peak`, `assign`, `backend:NAME`, `segment:SPEC`,
    `interleaved:NAME,NAME...`)."""
    kind, _, arg = job.partition(":")
    if kind == "peak":
        return run_peak(settings)
    if kind == "assign":
        return run_assign(settings)
    if kind == "backend":
        return run_backend(arg, settings)
    if kind == "segment":
        from bench._e2e import run_segment

        return run_segment(arg, settings)
    if kind == "interleaved":
        return {"status": "ok", "backends": run_interleaved(arg, settings)}
    raise ValueError(f"unknown job {job!r}")

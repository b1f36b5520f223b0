"""`variant="auto"` on the CPU (docs/architecture.md "Bundle contract"; docs/openvino.md
"Choosing a variant"): the fastest image-graph variant whose parity passed on this bundle, by a
short measured probe.

Candidates: fp32 (the reference graph, always), and every other CPU variant whose parity record
passed and that can run here (its file in the bundle, OpenVINO installed, bf16 on the CPU). Each
is loaded and timed on PROBE_RUNS calls at batch 1 after one warm-up call; the lowest median
wins. The result is cached as JSON in the OpenVINO cache folder of the bundle (keyed by the
machine, threads and library versions), so a restart loads the winner without probing again.
Legend: S window side.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from segclip.runtime._atomic import atomic_write_bytes
from segclip.runtime.bundle import Bundle
from segclip.runtime.errors import EngineError, RuntimeSegclipError
from segclip.runtime.variants import CPU_VARIANTS, is_openvino, parity_status

PROBE_RUNS = 3
PROBE_FILE = "auto-probe.json"
_ORT_FILE_KEYS = {"fp32": "image", "fp16": "image_fp16", "int8": "image_int8"}


def _load(bundle: Bundle, variant: str, threads: int | None, cache_dir: Any) -> Any:
    if is_openvino(variant):
        from segclip.runtime.backends.openvino import OpenVinoBackend, OpenVinoOptions

        return OpenVinoBackend(bundle, variant, OpenVinoOptions(threads=threads,
                                                                cache_dir=cache_dir))
    from segclip.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, "cpu", variant, threads)


def candidates(bundle: Bundle) -> tuple[list[str], dict[str, str]]:
    """(variants to probe, variant -> why it is left out)."""
    chosen, skipped = [], {}
    for variant in CPU_VARIANTS:
        passed, why = parity_status(bundle.manifest, variant)
        if variant == "fp32":
            chosen.append(variant)
        elif variant in _ORT_FILE_KEYS and _ORT_FILE_KEYS[variant] not in bundle.files:
            skipped[variant] = "not in the bundle"
        elif passed is not True:
            skipped[variant] = f"parity {'failed' if passed is False else 'not recorded'} ({why})"
        else:
            chosen.append(variant)
    return chosen, skipped


def _probe_ms(backend: Any, size: int) -> float:
    window = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    backend.run_image(window)  # warm-up: first-call allocations, lazy kernel selection
    times = []
    for _ in range(PROBE_RUNS):
        start = time.perf_counter()
        backend.run_image(window)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _cache_key(threads: int | None) -> str:
    import onnxruntime

    versions = [f"ort {onnxruntime.__version__}"]
    try:
        import openvino

        versions.append(f"ov {openvino.get_version()}")
    except ImportError:
        versions.append("no openvino")
    return " | ".join([platform.node(), platform.processor() or platform.machine(),
                       f"threads {threads}", *versions])


def _probe_file(bundle: Bundle, cache_dir: Any) -> Path:
    from segclip.runtime.backends.openvino import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / bundle.manifest_sha256[:16] / PROBE_FILE


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("chosen") in CPU_VARIANTS else None


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        table = table if isinstance(table, dict) else {}
        table[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(table, indent=1) + "\n").encode("utf-8"))
    except (OSError, ValueError):
        return  # a read-only cache only costs the next load a probe


class AutoBackend:
    """The chosen backend, with the choice reported in `info()["auto"]`."""

    def __init__(self, backend: Any, choice: dict[str, Any]) -> None:
        self._backend, self.choice = backend, choice
        self.name, self.device = backend.name, backend.device
        self.provider, self.max_batch = backend.provider, backend.max_batch
        self.variant = choice["chosen"]

    def run_image(self, batch: np.ndarray) -> Any:
        return self._backend.run_image(batch)

    def run_text(self, tokens: np.ndarray) -> np.ndarray:
        return self._backend.run_text(tokens)

    def info(self) -> dict[str, Any]:
        return {**self._backend.info(), "auto": dict(self.choice)}

    def close(self) -> None:
        self._backend.close()


def choose_cpu_backend(bundle: Bundle, threads: int | None = None,
                       cache_dir: Any = None) -> AutoBackend:
    """The fastest CPU variant of `bundle` that passed parity (module docstring)."""
    names, skipped = candidates(bundle)
    path, key = _probe_file(bundle, cache_dir), _cache_key(threads)
    cached = _read_cache(path, key)
    if cached is not None and cached["chosen"] in names:
        backend = _load(bundle, cached["chosen"], threads, cache_dir)
        return AutoBackend(backend, {**cached, "cached": True})
    loaded: dict[str, Any] = {}
    probe_ms: dict[str, float] = {}
    chosen = None
    try:
        for variant in names:
            try:
                loaded[variant] = _load(bundle, variant, threads, cache_dir)
            except RuntimeSegclipError as e:  # OpenVINO missing, bf16 absent, file damaged
                skipped[variant] = str(e).split(";")[0]
                continue
            probe_ms[variant] = round(_probe_ms(loaded[variant], bundle.image_size), 3)
        if not probe_ms:
            raise EngineError("variant auto: no CPU variant of the bundle could be loaded ("
                              + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")")
        chosen = min(probe_ms, key=probe_ms.__getitem__)
    finally:
        for variant, backend in loaded.items():
            if variant != chosen:  # the losers, or every backend when probing failed
                backend.close()
    entry = {"chosen": chosen, "probe_ms": probe_ms, "skipped": skipped,
             "probe": f"median of {PROBE_RUNS} calls at batch 1 after a warm-up"}
    _write_cache(path, key, entry)
    return AutoBackend(loaded[chosen], {**entry, "cached": False})

"""Timing loops and memory probes for the benchmarks (docs/performance.md).

- `time_calls`: warm-up calls, then timed calls with `sync()` before each clock read (a CUDA
  stream sync on GPU: without it only the launch is timed), until both a minimum count and a
  minimum time are reached, or a maximum of either.
- `HostMemory`: process RSS and its high-water mark from /proc/self/status, the mark reset
  through /proc/self/clear_refs (Linux), so that each case gets its own peak. Falls back to
  `resource.getrusage` (a lifetime peak, flagged `peak_is_lifetime`) where /proc is missing.
- `device_memory_used`: bytes in use on CUDA device 0 (all allocators: cudaMemGetInfo), or None.
- `SchedClock`: CPU time and run-queue wait of all this process's threads (/proc schedstat):
  the wait is time the threads were runnable but another process had the core, so
  `contention` = wait / (wait + cpu) says how much a shared machine slowed a case down.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class LoopLimits:
    """How long a case is timed."""

    warmup: int = 3  # untimed calls first (lazy init, allocator growth, kernel selection)
    warmup_seconds: float = 10.0  # ... but stop warming up after this long (at least one call)
    min_iters: int = 10
    max_iters: int = 200
    min_seconds: float = 2.0  # keep timing until this much time was spent (and min_iters)
    max_seconds: float = 30.0  # stop after this much time, whatever the count (>= 3 samples)


def _no_sync() -> None:
    pass


def time_calls(fn: Callable[[], Any], limits: LoopLimits = LoopLimits(),
               sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each timed call of `fn` (after `limits.warmup` untimed calls): the
    one-function case of `time_interleaved`."""
    return time_interleaved({"fn": fn}, limits, sync)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], limits: LoopLimits = LoopLimits(),
                     sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Like `time_calls` for several functions, one call of each per round (round-robin), so
    that load from other processes that comes and goes hits all of them alike and their
    ratios stay fair. Limits apply to the rounds (`max_seconds` to the whole loop)."""
    sync = sync or _no_sync
    for fn in fns.values():
        start = time.perf_counter()
        for _ in range(max(limits.warmup, 1)):
            fn()
            sync()
            if time.perf_counter() - start >= limits.warmup_seconds:
                break
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while True:
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        spent = time.perf_counter() - start
        if rounds >= limits.max_iters or (spent >= limits.max_seconds and rounds >= 3):
            return samples
        if rounds >= limits.min_iters and spent >= limits.min_seconds:
            return samples


def _status_mb() -> dict[str, float]:
    values = {}
    for line in _STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    return values


def _lifetime_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, else kB


@dataclass
class HostMemory:
    """Resident memory of this process: `reset()` before a case, `read()` after it (MiB)."""

    baseline_mb: float = 0.0
    resettable: bool = field(default=False)

    def reset(self) -> None:
        """Collect garbage, reset the high-water mark and remember the current RSS."""
        gc.collect()
        try:
            _CLEAR_REFS.write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.baseline_mb = self.rss_mb()

    @staticmethod
    def rss_mb() -> float:
        try:
            return _status_mb()["VmRSS"]
        except (OSError, KeyError):
            return _lifetime_peak_mb()

    def read(self) -> dict[str, float | bool]:
        """RSS now, its peak since `reset()` and that peak minus the RSS at `reset()`."""
        try:
            peak = _status_mb()["VmHWM"]
        except (OSError, KeyError):
            peak = _lifetime_peak_mb()
        return {"rss_mb": round(self.rss_mb(), 1), "rss_peak_mb": round(peak, 1),
                "rss_peak_delta_mb": round(peak - self.baseline_mb, 1),
                "peak_is_lifetime": not self.resettable}


class SchedClock:
    """Summed (cpu ns, run-queue wait ns) of this process's threads; `read()` gives the
    difference since construction (None where /proc/<pid>/task/*/schedstat is missing)."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[int, int] | None:
        cpu = wait = 0
        try:
            for task in Path("/proc/self/task").iterdir():
                try:
                    fields = (task / "schedstat").read_text().split()
                except OSError:  # the thread ended meanwhile
                    continue
                cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
        except (OSError, ValueError, IndexError):
            return None
        return cpu, wait

    def read(self) -> dict[str, float] | None:
        now = self._now()
        if now is None or self.start is None:
            return None
        cpu, wait = (now[0] - self.start[0]) / 1e9, (now[1] - self.start[1]) / 1e9
        return {"cpu_s": round(cpu, 4), "runqueue_wait_s": round(wait, 4),
                "contention": round(wait / (cpu + wait), 4) if cpu + wait > 0 else 0.0}


def device_memory_used() -> int | None:
    """Bytes used on CUDA device 0 by every allocator (torch, ONNX Runtime, TensorRT), or None."""
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    return int(total - free)

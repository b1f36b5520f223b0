"""Measured matrix-multiply peaks of this machine: the roofline's ceilings (bench/latency.py).

CPU: square float32 GEMMs with torch (oneDNN/MKL) and numpy (its BLAS), both on the benchmark's
thread count; the fp32 peak is the best median rate of the two. bf16 and int8 GEMMs with torch
in the same run: the ceilings of the backends that compute in those precisions. GPU: torch
GEMMs in fp16, bf16, tf32 and strict fp32 timed with CUDA events. Measured, not the datasheet:
the fraction reported beside a tower's rate says how close it got to what a GEMM gets on the
same cores in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

CPU_SIZE = 2048  # 17 GFLOP per product: ~0.1 s on 2 cores, far past cache-bound sizes
GPU_SIZE = 8192
REPEATS = 8


def _rate(flops: float, seconds: list[float]) -> dict[str, float]:
    return {"median_gflops": flops / float(np.median(seconds)) / 1e9,
            "best_gflops": flops / min(seconds) / 1e9}


def _gemm_seconds(gemm: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` timed calls of `gemm`, after 2 untimed ones."""
    for _ in range(2):
        gemm()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gemm()
        times.append(time.perf_counter() - start)
    return times


def cpu_fp32_peak(threads: int, size: int = CPU_SIZE, repeats: int = REPEATS) -> dict[str, Any]:
    """fp32 GEMM rates on the CPU; "peak_gflops" is the best median over the libraries."""
    flops = 2.0 * size ** 3
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out: dict[str, Any] = {"size": size, "threads": threads, "dtype": "float32"}
    c = np.empty_like(a)
    out["numpy"] = _rate(flops, _gemm_seconds(lambda: np.matmul(a, b, out=c), repeats))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        times = _gemm_seconds(lambda: torch.mm(ta, tb, out=tc), repeats)
        torch.set_num_threads(previous)
        out["torch"] = _rate(flops, times)
    out["peak_gflops"] = max(v["median_gflops"] for k, v in out.items()
                             if isinstance(v, dict))
    return out


def cpu_low_precision_peaks(threads: int, size: int = CPU_SIZE,
                            repeats: int = REPEATS) -> dict[str, Any]:
    """bf16 (`torch.mm` on bfloat16: AVX-512 BF16 / AMX through oneDNN) and int8 (`torch._int_mm`,
    int8 x int8 -> int32: VNNI / AMX) square GEMM rates on the CPU, in GFLOP/s resp. GOP/s
    (2 x MAC), on the benchmark's thread count; {} without torch."""
    try:
        import torch
    except ImportError:
        return {}
    flops = 2.0 * size ** 3
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
        a16, b16 = a.bfloat16(), b.bfloat16()
        c16 = torch.empty_like(a16)
        out["bf16"] = {"size": size, "threads": threads, "dtype": "bfloat16", "library": "torch",
                       **_rate(flops, _gemm_seconds(lambda: torch.mm(a16, b16, out=c16),
                                                    repeats))}
        a8, b8 = ((t * 40).clamp(-128, 127).to(torch.int8) for t in (a, b))
        try:
            times = _gemm_seconds(lambda: torch._int_mm(a8, b8), repeats)
            out["int8"] = {"size": size, "threads": threads, "dtype": "int8 -> int32",
                           "library": "torch._int_mm", **_rate(flops, times)}
        except RuntimeError as e:  # a torch build without the CPU int8 GEMM
            out["int8"] = {"status": "skipped", "reason": f"torch._int_mm: {e}"}
    finally:
        torch.set_num_threads(previous)
    return out


def gpu_peaks(size: int = GPU_SIZE, repeats: int = REPEATS) -> dict[str, Any]:
    """GEMM rates on CUDA device 0 per precision ({} without a GPU)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    flops = 2.0 * size ** 3
    out: dict[str, Any] = {"size": size, "device": torch.cuda.get_device_name(0)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow_tf32 in (("fp16", torch.float16, False),
                                        ("bf16", torch.bfloat16, False),
                                        ("tf32", torch.float32, True),
                                        ("fp32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(size, size, device="cuda", dtype=dtype)
            b = torch.randn(size, size, device="cuda", dtype=dtype)
            for _ in range(3):
                torch.mm(a, b)
            times = []
            for _ in range(repeats):
                begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                begin.record()
                torch.mm(a, b)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            out[name] = _rate(flops, times)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return out

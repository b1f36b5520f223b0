"""What the benchmark ran on: CPU, cores, memory, GPU, driver, CUDA, TensorRT, ORT, torch.

Versions come from package metadata and `nvidia-smi` (when present), so reading them imports no
framework; `torch_cuda_facts` imports torch on request. `machine_slug` names the results folder
(`bench/results/<slug>/`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "onnx",
            "cuda-python", "cuda-bindings")
_SMI_FIELDS = "name,driver_version,memory.total,compute_cap"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_facts() -> dict[str, Any]:
    """CPU model, logical CPUs, the CPUs this process may use, physical cores, memory."""
    model, cores_per_socket, sockets = platform.processor() or "unknown", None, set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                model = value
            elif key == "cpu cores":
                cores_per_socket = int(value)
            elif key == "physical id":
                sockets.add(value)
    physical = cores_per_socket * max(len(sockets), 1) if cores_per_socket else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text())
        memory_gib = round(int(match.group(1)) / 1024 ** 2, 1) if match else None
    return {"model": model, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "physical_cores": physical, "memory_gib": memory_gib,
            "platform": platform.platform(), "python": platform.python_version()}


def gpu_facts() -> dict[str, Any]:
    """GPUs and driver from `nvidia-smi` ({} when there is none), with the driver's CUDA."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    query = subprocess.run([smi, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    if query.returncode != 0:
        return {"error": f"nvidia-smi failed (exit {query.returncode}): {query.stderr.strip()}"}
    gpus = [dict(zip(_SMI_FIELDS.split(","), (v.strip() for v in row.split(","))))
            for row in query.stdout.strip().splitlines() if row.strip()]
    header = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpus": gpus, "driver": gpus[0]["driver_version"] if gpus else None,
            "driver_cuda": match.group(1) if match else None}


def torch_cuda_facts() -> dict[str, Any]:
    """torch's CUDA build, cuDNN and device 0 as torch sees it (imports torch)."""
    try:
        import torch
    except ImportError:
        return {}
    facts: dict[str, Any] = {"torch_cuda_build": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def machine_info() -> dict[str, Any]:
    """Everything above plus installed versions and ONNX Runtime's execution providers."""
    info: dict[str, Any] = {"cpu": cpu_facts(), "gpu": gpu_facts(),
                            "versions": {p: _version(p) for p in PACKAGES}}
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    info["torch_cuda"] = torch_cuda_facts()
    info["load_average"] = load_average()
    info["env_threads"] = {k: os.environ.get(k) for k in
                           ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine skews every figure."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM|tm)\)|\bCPU\b|\bProcessor\b|@.*$", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine_slug(info: dict[str, Any]) -> str:
    """`gpu-<name>` when a GPU is present, else `cpu-<N>core-<model>`."""
    gpus = info.get("gpu", {}).get("gpus") or []
    if gpus:
        return f"gpu-{_slug(gpus[0]['name'])}"
    cpu = info["cpu"]
    return f"cpu-{cpu['usable_cpus']}core-{_slug(cpu['model'])}"


def describe(info: dict[str, Any]) -> str:
    """Multi-line human summary for the top of a benchmark's output."""
    cpu, gpu, versions = info["cpu"], info.get("gpu", {}), info["versions"]
    lines = [f"CPU: {cpu['model']} ({cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical, "
             f"{cpu['physical_cores']} physical cores), {cpu['memory_gib']} GiB, "
             f"{cpu['platform']}, Python {cpu['python']}"]
    if gpu.get("gpus"):
        for g in gpu["gpus"]:
            lines.append(f"GPU: {g['name']} ({g['memory.total']}, compute {g['compute_cap']}), "
                         f"driver {gpu['driver']}, driver CUDA {gpu['driver_cuda']}")
    else:
        lines.append(f"GPU: none ({gpu.get('error', 'no nvidia-smi')})")
    torch_cuda = info.get("torch_cuda", {})
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
                 + f"; torch CUDA build {torch_cuda.get('torch_cuda_build')}, cuDNN "
                   f"{torch_cuda.get('cudnn')}; TensorRT {versions.get('tensorrt') or 'absent'}")
    lines.append(f"ORT providers: {', '.join(info['onnxruntime_providers'])}")
    lines.append(f"load average (1, 5, 15 min) at start: {info.get('load_average')}")
    return "\n".join(lines)

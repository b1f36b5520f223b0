"""Fixtures of the benchmark tests: a tiny bundle exported once, and each script run once.

The scripts run as a user runs them (`python bench/<script>.py ...` in a subprocess) with short
loops, one thread, and `--no-isolate` where isolation is not what a test is about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _bench_helpers import QUICK, run_script


@pytest.fixture(scope="session")
def bench_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-preset bundle with the int8 variant (seeded weights, export parity skipped)."""
    import torch

    from segclip import ModelConfig, SegCLIP, save_checkpoint
    from segclip.export import export_bundle

    folder = tmp_path_factory.mktemp("bench")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SegCLIP(ModelConfig.preset("tiny"))
    checkpoint = save_checkpoint(model, folder / "ckpt.pt", inference_only=True)
    return export_bundle(checkpoint, folder / "bundle", int8=True, verify=False)


@pytest.fixture(scope="session")
def latency_run(bench_bundle: Path, tmp_path_factory: pytest.TempPathFactory,
                ) -> tuple[dict[str, Any], str]:
    """latency.py on every backend it knows, in-process jobs; (JSON results, stdout)."""
    out = tmp_path_factory.mktemp("latency") / "latency.json"
    proc = run_script("latency.py", "--bundle", str(bench_bundle), "--checkpoint",
                      str(bench_bundle.parent / "ckpt.pt"),
                      "--backends", "torch,ort-cpu,ort-int8,ort-cuda,trt-fp16,trt-fp32",
                      "--batch", "1,2", "--labels", "1,3", "--e2e-size", "70x90",
                      "--peak-size", "256", "--no-isolate", "--out", str(out), *QUICK)
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="session")
def assign_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("assign") / "assign.json"
    proc = run_script("assign.py", "--sizes", "40,64", "--labels", "3,7", "--out", str(out),
                      "--warmup", "1", "--min-iters", "2", "--min-seconds", "0",
                      "--max-seconds", "0.5")
    return json.loads(out.read_text()), proc.stdout

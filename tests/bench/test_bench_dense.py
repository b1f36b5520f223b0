"""bench/dense.py end to end on a small random CLIP: export figures, interleaved image-tower
latency beside the SegCLIP tower, and the protocol's stages."""

from __future__ import annotations

import json

import pytest
from _bench_helpers import run_script

pytest.importorskip("onnxruntime")


def test_dense_bench_tiny(tmp_path):
    out = tmp_path / "dense.json"
    run_script("dense.py", "--size", "tiny", "--modes", "naclip,scclip", "--reps", "2",
               "--work", str(tmp_path / "work"), "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["exports"]) == {"naclip", "scclip"}
    for row in report["exports"].values():
        assert row["export_s"] > 0 and row["parity"]["fp32"]["max_abs"] <= 1e-4
    towers = report["image_tower_batch1"]
    assert set(towers) == {"dense-naclip", "dense-scclip", "segclip"}
    assert towers["segclip"]["x_segclip"] == 1.0
    assert all(row["median_ms"] > 0 and row["reps"] == 2 for row in towers.values())
    protocol = report["protocol_ms"]
    assert protocol["names"] == 46 and protocol["windows"] == 6  # 144 x 192: 2 x 3 windows
    assert protocol["assign"] > 0 and protocol["assign_pamr10"] > 0


def test_dense_bench_refuses_unknown_modes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "bench" / "dense.py"), "--modes",
                           "segformer", "--work", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown modes ['segformer']" in proc.stderr

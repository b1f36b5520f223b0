"""bench/precision.py end to end on a tiny random-weight checkpoint and a few synthetic eval
images: well-formed JSON, figures in range, fp32 equal to PyTorch, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _bench_helpers import ROOT, run_script

IMAGES = 4
FIGURES = ("region_argmax_agreement", "region_argmax_worst_image", "label_agreement_vs_torch",
           "label_worst_image_vs_torch", "label_agreement_vs_fp32_runtime",
           "label_worst_image_vs_fp32_runtime", "miou")


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segclip.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("precision") / "world"
    generate(SynthConfig(num=0, val_num=0, eval_num=IMAGES, seed=0), root)
    return root / "eval"


@pytest.fixture(scope="module")
def precision_run(bench_bundle: Path, eval_set: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """precision.py exporting its own bundle (fp32, fp16, int8) from the bench checkpoint."""
    out = tmp_path_factory.mktemp("precision-out") / "precision.json"
    run_script("precision.py", "--checkpoint", str(bench_bundle.parent / "ckpt.pt"),
               "--data", str(eval_set), "--out", str(out))
    return json.loads(out.read_text())


def test_precision_json_is_well_formed(precision_run: dict[str, Any]) -> None:
    results = precision_run
    assert results["benchmark"] == "precision" and results["bundle"]["exported_here"]
    assert results["data"] == {"path": results["data"]["path"], "images": IMAGES, "classes": 24}
    assert set(results["bundle"]["files"]) >= {"image", "image_fp16", "image_int8"}
    assert results["threshold"] == 0.8 and results["threads"] == 1
    assert list(results["precisions"]) == ["fp32", "fp16", "int8"]
    for precision, item in results["precisions"].items():
        assert set(item) == {"max_abs", *FIGURES}, precision
        assert set(item["max_abs"]) == {"global", "regions", "assign"}
        assert all(0.0 <= v < 1.0 for v in item["max_abs"].values()), precision
        for key in FIGURES:
            if precision == "fp32" and "fp32_runtime" in key:
                assert item[key] is None  # fp32 is the thing compared with
            else:
                assert 0.0 <= item[key] <= 1.0, (precision, key)
        assert item["region_argmax_worst_image"] <= item["region_argmax_agreement"]
        assert item["label_worst_image_vs_torch"] <= item["label_agreement_vs_torch"]
    assert 0.0 <= results["torch"]["miou"] <= 1.0


def test_fp32_matches_torch_and_reduced_precisions_differ(precision_run: dict[str, Any]) -> None:
    fp32, fp16, int8 = (precision_run["precisions"][p] for p in ("fp32", "fp16", "int8"))
    assert max(fp32["max_abs"].values()) <= 1e-4
    assert fp32["region_argmax_agreement"] >= 0.999
    assert fp32["label_agreement_vs_torch"] >= 0.999  # the runtime itself changes ~nothing
    assert fp32["miou"] == pytest.approx(precision_run["torch"]["miou"], abs=1e-3)
    assert max(fp16["max_abs"].values()) > 1e-5 and max(int8["max_abs"].values()) > 1e-5
    assert int8["region_argmax_agreement"] > 0.8


def test_precision_reuses_a_bundle_and_refuses_a_missing_variant(
        bench_bundle: Path, eval_set: Path, tmp_path: Path) -> None:
    checkpoint = str(bench_bundle.parent / "ckpt.pt")
    out = tmp_path / "p.json"
    run_script("precision.py", "--checkpoint", checkpoint, "--data", str(eval_set),
               "--bundle", str(bench_bundle), "--precisions", "int8,fp32", "--limit", "2",
               "--out", str(out))
    results = json.loads(out.read_text())
    assert not results["bundle"]["exported_here"] and results["data"]["images"] == 2
    assert list(results["precisions"]) == ["fp32", "int8"]  # fp32 first: int8 compares with it
    assert 0.0 <= results["precisions"]["int8"]["label_agreement_vs_fp32_runtime"] <= 1.0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "precision.py"), "--checkpoint",
                           checkpoint, "--data", str(eval_set), "--bundle", str(bench_bundle),
                           "--out", str(tmp_path / "no.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bench_bundle} has no fp16 "
                                                           f"image graph")
    assert not (tmp_path / "no.json").exists()

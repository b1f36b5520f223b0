"""`segclip-export` through typer's CliRunner: a real export, verify, and one-line errors with
exit code 2 (docs/architecture.md "Command contracts")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segclip.checkpoint import save_checkpoint
from segclip.config import ModelConfig
from segclip.export.cli import app
from segclip.model import SegCLIP
from segclip.runtime import contract

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SegCLIP(ModelConfig.preset("tiny"))
    return save_checkpoint(model, tmp_path_factory.mktemp("run") / "ckpt.pt")


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> tuple[Path, object]:
    result = runner.invoke(app, ["onnx", str(checkpoint)])  # default --out: RUN/bundle
    return checkpoint.parent / "bundle", result


def _one_line_error(result: object) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_onnx_writes_a_verified_bundle(exported: tuple[Path, object]) -> None:
    bundle, result = exported
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / contract.MANIFEST_FILE).read_text())
    assert manifest["parity"]["passed"]
    assert contract.IMAGE_ONNX in result.stdout and "parity vs PyTorch: passed" in result.stdout
    assert "exporting image tower" in result.stderr  # progress goes to stderr


def test_verify_passes(exported: tuple[Path, object], checkpoint: Path) -> None:
    bundle, _ = exported
    result = runner.invoke(app, ["verify", str(bundle), str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "image.onnx: max|diff|" in result.stdout and "parity: passed" in result.stdout


def test_missing_checkpoint(tmp_path: Path) -> None:
    result = runner.invoke(app, ["onnx", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")])
    assert "checkpoint not found" in _one_line_error(result)
    assert not (tmp_path / "b").exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("this is not a checkpoint\n")
    result = runner.invoke(app, ["onnx", str(bad), "--out", str(tmp_path / "b")])
    assert "notes.pt" in _one_line_error(result)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    result = runner.invoke(app, ["onnx", str(other), "--out", str(tmp_path / "b")])
    assert "is not a segclip checkpoint" in _one_line_error(result)
    assert not (tmp_path / "b").exists()


def test_bad_opset(checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["onnx", str(checkpoint), "--out", str(tmp_path / "b"),
                                 "--opset", "13"])
    assert "opset must be in [17, 20]" in _one_line_error(result)


def test_trt_without_tensorrt(exported: tuple[Path, object],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, _ = exported
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = runner.invoke(app, ["trt", str(bundle), "--fp16"])
    line = _one_line_error(result)
    assert "TensorRT is not installed" in line and "pip install 'segclip[gpu]'" in line
    assert not (bundle / contract.IMAGE_PLAN).exists()


def test_trt_bad_profile_and_missing_bundle(exported: tuple[Path, object],
                                            tmp_path: Path) -> None:
    bundle, _ = exported
    result = runner.invoke(app, ["trt", str(bundle), "--batch", "8:4:1"])
    assert "--batch must be MIN:OPT:MAX" in _one_line_error(result)
    result = runner.invoke(app, ["trt", str(tmp_path / "missing")])
    assert "bundle directory not found" in _one_line_error(result)

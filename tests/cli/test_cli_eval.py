"""`segclip-eval` through typer's CliRunner: table + JSON output, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segclip.checkpoint import save_checkpoint
from segclip.cli.evaluate import app
from segclip.config import ModelConfig
from segclip.model import SegCLIP

runner = CliRunner()


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = SegCLIP(ModelConfig.preset("tiny", vision_width=32, vision_layers=2, vision_heads=2,
                                       group_layer=1, text_width=32, text_layers=1, text_heads=2,
                                       embed_dim=32, decoder_width=32, decoder_heads=2))
    return save_checkpoint(model, tmp_path / "ckpt.pt", inference_only=True, half=True)


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_eval_prints_the_table_and_writes_json(checkpoint: Path, synth_world: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "res" / "eval.json"
    result = runner.invoke(app, [str(checkpoint), "--data", str(synth_world / "val"),
                                 "--classes", str(synth_world / "classes.txt"),
                                 "--threshold", "0.5", "--out", str(out), "--diagnostics",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert set(written) >= {"miou", "per_class", "threshold", "diagnostics"}
    assert written["threshold"] == 0.5 and len(written["per_class"]) == 25
    summary = [line.split() for line in result.stdout.splitlines() if line.startswith("mIoU")]
    assert summary == [["mIoU", f"{100 * written['miou']:.2f}"]]
    assert "background threshold 0.50" in result.stdout and "oracle_miou:" in result.stdout


def test_eval_errors_exit_2(checkpoint: Path, synth_world: Path, tmp_path: Path) -> None:
    val = str(synth_world / "val")
    one_line_error(runner.invoke(app, [str(tmp_path / "no.pt"), "--data", val]),
                   "checkpoint not found")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    one_line_error(runner.invoke(app, [str(tmp_path / "bad.pt"), "--data", val]),
                   "bad.pt is a text file, not a torch.save file")
    one_line_error(runner.invoke(app, [str(checkpoint), "--data", str(tmp_path)]),
                   "classes.txt does not exist")
    one_line_error(runner.invoke(app, [str(checkpoint), "--data", str(tmp_path),
                                       "--classes", "voc"]), "not a VOC-layout folder")
    one_line_error(runner.invoke(app, [str(checkpoint), "--data", val, "--classes",
                                       str(tmp_path / "none.txt")]), "class list not found")
    one_line_error(runner.invoke(app, [str(checkpoint), "--data", val, "--threshold", "2"]),
                   "--threshold must be in [0, 1]")
    one_line_error(runner.invoke(app, [str(tmp_path), "--data", val]), "not a bundle")
    assert not (tmp_path / "res").exists()

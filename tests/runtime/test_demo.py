"""segclip/demo.py (`make demo`): a clear error without the shipped model, and the whole flow
(export -> held-out synthetic set -> segclip-run -> mIoU) with a stand-in checkpoint, reused on a
second run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import segclip.demo as demo


def test_missing_demo_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(demo, "SHIPPED", demo.REPO / "segclip" / "assets" / "absent.pt")
    assert demo.main(["--out", str(tmp_path / "demo")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: the demo model segclip/assets/absent.pt is not there yet")
    assert "make demo TRAIN=1" in line and not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         tiny_bundle_model: Any, capsys: pytest.CaptureFixture) -> None:
    from segclip.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tiny_bundle_model, tmp_path / "demo_tiny.pt")
    monkeypatch.setattr(demo, "SHIPPED", checkpoint)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--eval-num", "3"]) == 0
    report = json.loads((out / "miou.json").read_text())
    assert report["num_images"] == 3 and 0.0 <= report["miou"] <= 1.0
    assert len(list((out / "run").glob("*.json"))) == 3
    first = capsys.readouterr().out
    assert "segclip-export onnx" in first and "mIoU" in first
    stamp = (out / "bundle" / "segclip.json").stat().st_mtime_ns
    assert demo.main(["--out", str(out), "--eval-num", "3"]) == 0  # reuses what exists
    second = capsys.readouterr().out
    assert "is up to date" in second and "segclip-export onnx" not in second
    assert (out / "bundle" / "segclip.json").stat().st_mtime_ns == stamp


def test_train_flag_runs_the_training_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """`make demo TRAIN=1` hands scripts/train_demo_tiny.sh a work folder and the checkpoint
    path out/demo/ckpt.pt (never the shipped asset); a failing script is one error line."""
    fake_repo = tmp_path / "repo"
    (fake_repo / "scripts").mkdir(parents=True)
    record = tmp_path / "env.txt"
    (fake_repo / "scripts" / "train_demo_tiny.sh").write_text(
        f'echo "$WORK|$ASSET|$NUM|$PY" > {record}\nexit 3\n')
    monkeypatch.setattr(demo, "REPO", fake_repo)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--train", "--train-num", "50"]) == 2
    work, asset, num, python = record.read_text().strip().split("|")
    assert (work, asset, num) == (str(out.resolve() / "train"), str(out.resolve() / "ckpt.pt"),
                                  "50")
    assert Path(python).name.startswith("python")
    assert "failed with exit code 3" in capsys.readouterr().err

"""`segclip-train` through typer's CliRunner: a short run, resume, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from segclip.checkpoint import load_checkpoint
from segclip.cli.train import app

runner = CliRunner()
SMALL = {"image_size": 32, "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
         "group_layer": 1, "num_centers": 4, "text_width": 32, "text_layers": 1,
         "text_heads": 2, "embed_dim": 32, "decoder_width": 32, "decoder_layers": 1,
         "decoder_heads": 2}
MODEL_SETS = [item for k, v in SMALL.items() for item in ("--model-set", f"{k}={v}")]


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_train_then_resume(synth_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", "tiny", "--recipe", "synth", "--data", str(synth_world), "--out",
            str(out), "--steps", "4", "--batch-size", "4", "--log-every", "1",
            "--set", "superpixel_kl_weight=10", "--quiet", *MODEL_SETS]
    first = runner.invoke(app, [*args, "--set", "ckpt_every=2"])
    assert first.exit_code == 0, first.output
    assert "step 4/4" in first.stdout
    model = load_checkpoint(out / "ckpt.pt")
    assert model.config.image_size == 32 and model.config.num_centers == 4
    meta = __import__("torch").load(out / "ckpt.pt", weights_only=True)["meta"]
    assert meta["recipe"] == "synth" and meta["train_config"]["superpixel_kl_weight"] == 10
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    again = runner.invoke(app, ["--out", str(out), "--resume", "--quiet"])
    assert again.exit_code == 0 and "step 4/4" in again.stdout  # already complete: no-op
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    one_line_error(runner.invoke(app, args), "already holds a run")
    one_line_error(runner.invoke(app, [*args, "--resume", "--lr", "0.5"]),
                   "different training config")


def test_errors_exit_2_with_one_line(synth_world: Path, tmp_path: Path) -> None:
    base = ["--data", str(synth_world), "--out", str(tmp_path / "r"), "--quiet"]
    one_line_error(runner.invoke(app, ["--config", "huge", *base]), "unknown preset 'huge'")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--recipe", "x", *base]),
                   "unknown recipe 'x'")
    one_line_error(runner.invoke(app, base), "--config is required")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--out", str(tmp_path / "r")]),
                   "no training data given")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--set", "warmup", *base]),
                   "--set expects FIELD=VALUE")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--set", "nope=1", *base]),
                   "unknown TrainConfig fields ['nope']")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--model-set", "nope=1", *base]),
                   "unknown ModelConfig fields ['nope']")
    one_line_error(runner.invoke(app, ["--config", "tiny", "--data", str(tmp_path / "none"),
                                       "--out", str(tmp_path / "r"), "--quiet"]),
                   "does not exist")
    one_line_error(runner.invoke(app, [*base, "--resume"]), "cannot resume")

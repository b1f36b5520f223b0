"""Untrusted files: no code execution from files. A checkpoint crafted to run code when
unpickled (its `__reduce__` writes a marker file) is refused by every command that reads
checkpoints, and the marker never appears.

segclip-convert official / clip / to-official are covered by
tests/cli/test_cli_convert.py::test_code_running_pickle_is_refused; this file covers the rest:
segclip-export onnx / verify, segclip-eval, segclip-train --resume (ckpt.pt and train_state.pt)
and --clip-weights, plus the library entry points they share.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _reliability_support import assert_user_error, entries, invoke, snapshot, write_code_pickles

torch = pytest.importorskip("torch")

VARIANTS = ["zip_top_level", "zip_in_state_dict", "zip_in_meta", "legacy_format", "plain_pickle"]
COMMANDS = ["export-onnx", "export-verify", "eval", "train-resume-ckpt", "train-resume-state",
            "train-clip-weights"]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran.marker"


def test_crafted_files_do_run_code_when_fully_unpickled(tmp_path: Path,
                                                         tiny_checkpoint: Path) -> None:
    """The probe is live: a plain `torch.load(weights_only=False)` of each file runs its code
    (in a child process, so nothing of it leaks into this one)."""
    payload = torch.load(tiny_checkpoint, weights_only=True)
    for name in VARIANTS:
        marker = tmp_path / f"{name}.marker"
        path = write_code_pickles(tmp_path / "files", marker, payload)[name]
        code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
        subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True,
                       timeout=120)
        assert marker.is_file(), f"{name}: the crafted file did not run its code"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_code_running_checkpoint_is_refused(command: str, variant: str, tmp_path: Path,
                                            marker: Path, tiny_checkpoint: Path,
                                            rel_bundle: Path, synth_world: Path,
                                            run_copy: Path) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    evil = write_code_pickles(tmp_path / "evil", marker, payload)[variant]
    out = tmp_path / "out"
    if command.startswith("train-resume"):
        target = run_copy / ("ckpt.pt" if command == "train-resume-ckpt" else "train_state.pt")
        evil.replace(target)
        evil = target
    before = snapshot(run_copy)

    if command == "export-onnx":
        from segclip.export.cli import app

        result = invoke(app, ["onnx", evil, "--out", out / "bundle"])
    elif command == "export-verify":
        from segclip.export.cli import app

        result = invoke(app, ["verify", rel_bundle, evil])
    elif command == "eval":
        from segclip.cli.evaluate import app

        result = invoke(app, [evil, "--data", synth_world / "val", "--classes",
                              synth_world / "classes.txt", "--out", out / "eval.json",
                              "--quiet"])
    elif command == "train-clip-weights":
        from segclip.cli.train import app

        result = invoke(app, ["--config", "tiny", "--data", synth_world, "--out", out / "run",
                              "--clip-weights", evil, "--steps", "1", "--quiet"])
    else:
        from segclip.cli.train import app

        result = invoke(app, ["--out", run_copy, "--data", synth_world, "--resume", "--quiet"])

    line = assert_user_error(result, str(evil))
    assert not marker.exists(), "the checkpoint's code ran"
    if command != "train-resume-state":  # checkpoints and CLIP weights say why
        assert "refusing" in line or "not a torch" in line, line
    assert entries(out) == [] and snapshot(run_copy) == before


@pytest.mark.parametrize("variant", VARIANTS)
def test_library_loaders_refuse_code(variant: str, tmp_path: Path, marker: Path,
                                     tiny_checkpoint: Path) -> None:
    """The functions behind the commands, called directly (Python API users)."""
    from segclip.checkpoint import load_checkpoint
    from segclip.config import ModelConfig
    from segclip.convert import load_clip_weights, load_official
    from segclip.errors import SegclipError
    from segclip.model import SegCLIP

    payload = torch.load(tiny_checkpoint, weights_only=True)
    evil = write_code_pickles(tmp_path / "evil", marker, payload)[variant]
    model = SegCLIP(ModelConfig.preset("tiny"))
    for load in (load_checkpoint, lambda p: load_clip_weights(model, p), load_official):
        with pytest.raises(SegclipError):
            load(evil)
        assert not marker.exists()

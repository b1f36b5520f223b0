"""Bad input, checkpoints: every command that reads a checkpoint or foreign weights answers a bad
file with one `error:` line on stderr, exit code 2, no traceback and nothing written.

Commands: segclip-export onnx / verify, segclip-eval, segclip-convert to-official / clip /
official, segclip-train --resume (ckpt.pt and train_state.pt) and --clip-weights. Single-command
cases already in tests/cli and tests/segclip/test_checkpoint.py are not repeated here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _reliability_support import (
    CHECKPOINT_KINDS,
    MODEL_MISMATCH_KINDS,
    assert_user_error,
    entries,
    invoke,
    snapshot,
    write_bad_checkpoint,
)

torch = pytest.importorskip("torch")

CHECKPOINT_COMMANDS = ["export-onnx", "export-verify", "eval", "convert-to-official",
                       "train-resume"]


def _run_checkpoint_command(command: str, ckpt: Path, tmp_path: Path, bundle: Path,
                            world: Path) -> object:
    if command == "export-onnx":
        from segclip.export.cli import app

        return invoke(app, ["onnx", ckpt, "--out", tmp_path / "out" / "bundle"])
    if command == "export-verify":
        from segclip.export.cli import app

        return invoke(app, ["verify", bundle, ckpt])
    if command == "eval":
        from segclip.cli.evaluate import app

        return invoke(app, [ckpt, "--data", world / "val", "--classes", world / "classes.txt",
                            "--out", tmp_path / "out" / "eval.json", "--quiet"])
    if command == "convert-to-official":
        from segclip.cli.convert import app

        return invoke(app, ["to-official", ckpt, "--out", tmp_path / "out" / "official.bin"])
    if command == "train-resume":
        from segclip.cli.train import app

        return invoke(app, ["--out", ckpt.parent, "--data", world, "--resume", "--quiet"])
    raise KeyError(command)


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_KINDS))
@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_bad_checkpoint_is_one_line_error(command: str, kind: str, tmp_path: Path,
                                          tiny_checkpoint: Path, rel_bundle: Path,
                                          synth_world: Path, run_copy: Path) -> None:
    if command == "train-resume":  # the run's own ckpt.pt is damaged; train_state.pt is fine
        ckpt = run_copy / "ckpt.pt"
        good = tmp_path / "good.pt"
        ckpt.rename(good)
    else:
        ckpt, good = tmp_path / "bad" / "ckpt.pt", tiny_checkpoint
    write_bad_checkpoint(kind, good, ckpt, rel_bundle / "image.onnx")
    if command == "train-resume":
        good.unlink()
    before_run, before_bundle = snapshot(run_copy), snapshot(rel_bundle)

    result = _run_checkpoint_command(command, ckpt, tmp_path, rel_bundle, synth_world)

    fragment = CHECKPOINT_KINDS[kind]
    if command == "export-verify" and kind in MODEL_MISMATCH_KINDS:
        fragment = "sha256"  # the bundle's recorded checkpoint hash is checked first
    assert_user_error(result, fragment, str(ckpt))
    assert entries(tmp_path / "out") == []  # nothing written, not even a hidden temp file
    assert snapshot(run_copy) == before_run and snapshot(rel_bundle) == before_bundle


# ---- train_state.pt (the other half of a resumable run) ---------------------------------------
STATE_KINDS = {
    "empty": "cannot resume",
    "truncated_half": "cannot resume",
    "text_file": "cannot resume",
    "torchscript": "cannot resume",
    "bare_state_dict": "not a segclip train state",
    "other_version": "not a segclip train state",  # a checkpoint dict in place of the state
}


@pytest.mark.parametrize("kind", sorted(STATE_KINDS))
def test_bad_train_state_is_one_line_error(kind: str, run_copy: Path, tiny_checkpoint: Path,
                                           rel_bundle: Path, synth_world: Path) -> None:
    from segclip.cli.train import app

    state = run_copy / "train_state.pt"
    write_bad_checkpoint(kind, tiny_checkpoint, state, rel_bundle / "image.onnx")
    before = snapshot(run_copy)
    result = invoke(app, ["--out", run_copy, "--data", synth_world, "--resume", "--quiet"])
    assert_user_error(result, STATE_KINDS[kind], str(state))
    assert snapshot(run_copy) == before


# ---- foreign weights: --clip-weights, segclip-convert clip / official ---------------------------
def _clip_state(tiny_checkpoint: Path) -> dict:
    """The tiny model's CLIP part: a valid CLIP state dict for `--config tiny`."""
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith(("group.", "reconstruction."))}


CLIP_KINDS = {
    "missing": "not found",
    "empty": "empty (0 bytes)",
    "truncated_half": "truncated",
    "text_file": "not CLIP weights: ",
    "onnx_file": "is an ONNX model, not a torch.save file",
    "npz_file": "cannot read CLIP file",
    "segclip_checkpoint": "already a segclip checkpoint",
    "official_layout": "official SegCLIP file",
    "missing_key": "lacks 1 CLIP tensors",
    "wrong_shape": "shapes differ",
    "not_a_state_dict": "does not hold a state dict",
}


def _write_clip_file(kind: str, path: Path, tiny_checkpoint: Path, onnx_file: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _clip_state(tiny_checkpoint)
    if kind == "segclip_checkpoint":
        path.write_bytes(tiny_checkpoint.read_bytes())
    elif kind == "missing_key":
        state.pop("ln_final.weight")
        torch.save(state, path)
    elif kind == "wrong_shape":
        state["positional_embedding"] = torch.zeros(7, 3)
        torch.save(state, path)
    elif kind == "not_a_state_dict":
        torch.save([torch.zeros(2)], path)
    else:
        write_bad_checkpoint(kind, tiny_checkpoint, path, onnx_file)
    return path


@pytest.mark.parametrize("kind", sorted(CLIP_KINDS))
@pytest.mark.parametrize("command", ["train-clip-weights", "convert-clip"])
def test_bad_clip_weights_are_one_line_errors(command: str, kind: str, tmp_path: Path,
                                              tiny_checkpoint: Path, rel_bundle: Path,
                                              synth_world: Path) -> None:
    source = _write_clip_file(kind, tmp_path / "in" / "clip.pt", tiny_checkpoint,
                              rel_bundle / "image.onnx")
    if command == "train-clip-weights":
        from segclip.cli.train import app

        result = invoke(app, ["--config", "tiny", "--data", synth_world, "--out",
                              tmp_path / "out" / "run", "--clip-weights", source, "--steps", "1",
                              "--quiet"])
    else:
        from segclip.cli.convert import app

        result = invoke(app, ["clip", source, "--config", "tiny", "--out",
                              tmp_path / "out" / "ckpt.pt"])
    assert_user_error(result, CLIP_KINDS[kind], str(source))
    assert entries(tmp_path / "out") == []


def test_valid_clip_weights_initialise_training(tmp_path: Path, tiny_checkpoint: Path,
                                                synth_world: Path) -> None:
    """The control case of the test above: the same file, undamaged, is accepted."""
    from segclip.cli.train import app

    source = tmp_path / "clip.pt"
    torch.save(_clip_state(tiny_checkpoint), source)
    result = invoke(app, ["--config", "tiny", "--recipe", "synth", "--data", synth_world,
                          "--out", tmp_path / "run", "--clip-weights", source, "--steps", "1",
                          "--batch-size", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "ckpt.pt").is_file()


OFFICIAL_KINDS = {
    "truncated_half": "truncated",
    "text_file": "not official SegCLIP weights: ",
    "onnx_file": "is an ONNX model, not a torch.save file",
    "torchscript": "not an official SegCLIP state dict",
    "segclip_checkpoint": "already a segclip checkpoint",
    "clip_weights": "not an official SegCLIP state dict",
    "missing_key": "1 parameters not filled",
    "extra_key": "1 unexpected keys ['clip.extra.weight']",
}


@pytest.mark.parametrize("kind", sorted(OFFICIAL_KINDS))
def test_bad_official_file_is_one_line_error(kind: str, tmp_path: Path, tiny_checkpoint: Path,
                                             rel_bundle: Path) -> None:
    from segclip.checkpoint import load_checkpoint
    from segclip.cli.convert import app
    from segclip.convert import official_state_dict

    source = tmp_path / "in" / "segclip.bin"
    source.parent.mkdir()
    official = official_state_dict(load_checkpoint(tiny_checkpoint))
    if kind == "segclip_checkpoint":
        source.write_bytes(tiny_checkpoint.read_bytes())
    elif kind == "clip_weights":
        torch.save(_clip_state(tiny_checkpoint), source)
    elif kind == "missing_key":
        official.pop("clip.ln_final.weight")
        torch.save(official, source)
    elif kind == "extra_key":
        official["clip.extra.weight"] = torch.zeros(2)
        torch.save(official, source)
    else:
        write_bad_checkpoint(kind, tiny_checkpoint, source, rel_bundle / "image.onnx")
    result = invoke(app, ["official", source, "--text-heads", "4", "--out",
                          tmp_path / "out" / "ckpt.pt"])
    assert_user_error(result, OFFICIAL_KINDS[kind], str(source))
    assert entries(tmp_path / "out") == []

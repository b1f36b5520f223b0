"""`segclip-convert` through typer's CliRunner: round trips, and one-line errors with exit 2."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from segclip.checkpoint import load_checkpoint
from segclip.cli.convert import app
from segclip.config import ModelConfig
from segclip.convert import official_state_dict
from segclip.model import SegCLIP

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_official_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny preset written in the official layout (its text width 64 -> 1 head by default,
    so the tests pass --text-heads 4)."""
    torch.manual_seed(0)
    state = official_state_dict(SegCLIP(ModelConfig.preset("tiny")))
    path = tmp_path_factory.mktemp("official") / "segclip.bin"
    torch.save(state, path)
    return path, state


def _one_line_error(result, match: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    assert "Traceback" not in result.output


def test_official_then_to_official_round_trip(tiny_official_file: tuple[Path, dict],
                                              tmp_path: Path) -> None:
    source, state = tiny_official_file
    ckpt, back = tmp_path / "ckpt.pt", tmp_path / "back.bin"
    result = runner.invoke(app, ["official", str(source), "--out", str(ckpt), "--text-heads", "4"])
    assert result.exit_code == 0, result.output
    assert "loaded" in result.stdout and ckpt.is_file()
    model = load_checkpoint(ckpt)
    assert model.config.text_heads == 4 and model.config.group_layer == 4
    assert torch.equal(model.group.centers,
                       state["clip.visual.transformer.semantic_layer2.semantic_center"])
    result = runner.invoke(app, ["to-official", str(ckpt), "--out", str(back)])
    assert result.exit_code == 0, result.output
    again = torch.load(back, weights_only=True)
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_clip_initialises_a_fresh_checkpoint(tmp_path: Path) -> None:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = ModelConfig.preset("tiny")
    clip = CLIP(c.embed_dim, CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width,
                                           head_width=c.vision_width // c.vision_heads,
                                           patch_size=c.patch_size, image_size=c.image_size),
                CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size,
                            width=c.text_width, heads=c.text_heads, layers=c.text_layers),
                quick_gelu=True)
    source, ckpt = tmp_path / "clip.pt", tmp_path / "ckpt.pt"
    torch.save(clip.state_dict(), source)
    result = runner.invoke(app, ["clip", str(source), "--out", str(ckpt), "--config", "tiny"])
    assert result.exit_code == 0, result.output
    assert "missing (kept fresh initialisation)" in result.stdout and "group.*" in result.stdout
    model = load_checkpoint(ckpt)
    assert torch.equal(model.visual.transformer.resblocks[5].mlp.c_fc.weight,
                       clip.visual.transformer.resblocks[5].mlp.c_fc.weight)
    # a ViT-B/16-shaped model does not take these weights
    result = runner.invoke(app, ["clip", str(source), "--out", str(tmp_path / "b.pt")])
    _one_line_error(result, "shapes differ")
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("command", ["official", "clip", "to-official"])
def test_missing_file(command: str, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    result = runner.invoke(app, [command, str(tmp_path / "nope.bin"), "--out", str(out)])
    _one_line_error(result, "not found")
    assert not out.exists()


@pytest.mark.parametrize("command, content, match", [
    ("official", {"a": 1}, "not a state dict"),
    ("official", {"visual.conv1.weight": torch.zeros(1)}, "not an official SegCLIP"),
    ("clip", {"a": 1}, "not a state dict"),
    ("clip", b"not a torch file", "is a text file, not a torch.save file"),
    ("to-official", {"weight": torch.zeros(1)}, "not a segclip checkpoint"),
    ("to-official", b"", "empty"),
])
def test_wrong_content(command: str, content, match: str, tmp_path: Path) -> None:
    source, out = tmp_path / "file.bin", tmp_path / "out.pt"
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        torch.save(content, source)
    result = runner.invoke(app, [command, str(source), "--out", str(out)])
    _one_line_error(result, match)
    assert not out.exists()


class _Evil:
    marker = ""

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("command", ["official", "clip", "to-official"])
def test_code_running_pickle_is_refused(command: str, tmp_path: Path) -> None:
    source, out, marker = tmp_path / "evil.bin", tmp_path / "out.pt", tmp_path / "marker"
    evil = _Evil()
    evil.marker = str(marker)
    torch.save({"state_dict": {"weight": evil}}, source)
    source_plain = tmp_path / "evil_plain.bin"
    source_plain.write_bytes(pickle.dumps(evil, protocol=2))
    for path in (source, source_plain):
        result = runner.invoke(app, [command, str(path), "--out", str(out)])
        _one_line_error(result, "refusing")
        assert not marker.exists()
        assert not out.exists()

"""The checkpoint contract (segclip/checkpoint.py, docs/architecture.md "Checkpoint contract").

Round trip, atomic writes, weights-only loading (a malicious pickle is refused and never runs),
and a CheckpointError with a clear message for every kind of bad file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from segclip.checkpoint import (
    CKPT_FORMAT,
    CKPT_VERSION,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from segclip.errors import CheckpointError, SegclipError
from segclip.model import SegCLIP


@pytest.fixture
def ckpt(tmp_path: Path, tiny_model: SegCLIP) -> Path:
    return save_checkpoint(tiny_model, tmp_path / "ckpt.pt", meta={"step": 7, "note": "test"})


def payload_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def encode(model: SegCLIP, images: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.encode_image(images)
        return [out.global_embedding, out.regions, out.assign, model.encode_text(tokens)]


# ---- round trip -------------------------------------------------------------------------------
def test_round_trip_gives_equal_outputs(ckpt: Path, tiny_model: SegCLIP, images: torch.Tensor,
                                        make_tokens: Callable) -> None:
    loaded = load_checkpoint(ckpt)
    assert not loaded.training and loaded.config == tiny_model.config
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    tokens = make_tokens(3, 77)
    for ours, theirs in zip(encode(loaded, images, tokens), encode(tiny_model, images, tokens),
                            strict=True):
        assert torch.equal(ours, theirs)


def test_file_follows_the_contract(ckpt: Path, tiny_model: SegCLIP) -> None:
    payload = payload_of(ckpt)  # plain torch.load(weights_only=True) reads it
    assert set(payload) == {"format", "version", "config", "state_dict", "meta"}
    assert (payload["format"], payload["version"]) == (CKPT_FORMAT, CKPT_VERSION) == (
        "segclip-ckpt", 1)
    assert payload["config"] == tiny_model.config.to_dict()
    assert payload["meta"] == {"step": 7, "note": "test"}
    assert set(payload["state_dict"]) == set(tiny_model.state_dict())
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu"
               for t in payload["state_dict"].values())
    assert read_checkpoint(ckpt)["meta"]["step"] == 7


def test_save_creates_parent_directories(tmp_path: Path, tiny_model: SegCLIP) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "run" / "nested" / "ckpt.pt")
    assert path == tmp_path / "run" / "nested" / "ckpt.pt" and path.is_file()


def test_inference_only_drops_reconstruction(tmp_path: Path, tiny_model: SegCLIP, ckpt: Path,
                                             images: torch.Tensor,
                                             make_tokens: Callable) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "infer.pt", inference_only=True)
    payload = payload_of(path)
    assert payload["config"]["with_reconstruction"] is False
    assert not any(k.startswith("reconstruction.") for k in payload["state_dict"])
    assert path.stat().st_size < ckpt.stat().st_size
    loaded = load_checkpoint(path)
    assert loaded.reconstruction is None
    tokens = make_tokens(2, 77)
    for ours, theirs in zip(encode(loaded, images, tokens), encode(tiny_model, images, tokens),
                            strict=True):
        assert torch.equal(ours, theirs)


def test_half_stores_fp16_and_loads(tmp_path: Path, tiny_model: SegCLIP, ckpt: Path,
                                    images: torch.Tensor) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "half.pt", half=True)
    state = payload_of(path)["state_dict"]
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert path.stat().st_size < 0.6 * ckpt.stat().st_size
    loaded = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, value in tiny_model.state_dict().items():  # the weights, rounded to fp16
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    with torch.no_grad():
        got = loaded.encode_image(images).global_embedding
        want = tiny_model.encode_image(images).global_embedding
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)


# ---- atomic writes ----------------------------------------------------------------------------
def test_save_leaves_no_temporary_files(tmp_path: Path, tiny_model: SegCLIP) -> None:
    save_checkpoint(tiny_model, tmp_path / "ckpt.pt")
    save_checkpoint(tiny_model, tmp_path / "ckpt.pt")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path, ckpt: Path, tiny_model: SegCLIP,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    def save_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of a zip file, then a crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with torch.no_grad():
        tiny_model.group.centers.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tiny_model, ckpt)
    monkeypatch.undo()
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt.pt"]
    loaded = load_checkpoint(ckpt)
    assert not torch.equal(loaded.group.centers, tiny_model.group.centers)  # the old weights


def test_failed_first_save_leaves_nothing(tmp_path: Path, tiny_model: SegCLIP,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(tiny_model, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


# ---- weights_only: a malicious pickle never runs ------------------------------------------------
class CreatesFile:
    """Unpickling this calls open(marker, "w"): code execution a full unpickle would allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    # control: the payload really does run under a full unpickle
    control_marker = tmp_path / "control_marker"
    torch.save({"x": CreatesFile(control_marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": {},
                "state_dict": {}, "meta": {"x": CreatesFile(marker)}}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt: it holds Python "
                                              r"objects .*weights_only=True"):
        load_checkpoint(evil)
    assert not marker.exists()


# ---- bad files --------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint"):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint file


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").touch()
    with pytest.raises(CheckpointError, match=r"checkpoint is empty \(0 bytes\): .*empty\.pt"):
        load_checkpoint(tmp_path / "empty.pt")


@pytest.mark.parametrize("cut", [0.5, 0.01, 0.99])
def test_truncated_file(tmp_path: Path, ckpt: Path, cut: float) -> None:
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*truncated\.pt: "
                                              r"truncated or not a torch file"):
        load_checkpoint(bad)


@pytest.mark.parametrize("content,kind", [
    (b"hello", "a text file"), (b"cat\ndog\n", "a text file"),  # "c" is a pickle opcode
    (b'{"a": 1}', "a JSON file"), (bytes(100), "a binary file of another format"),
    (bytes(range(1, 256)) * 8, "a binary file of another format")],
    ids=["hello", "starts-with-c", "json", "zeros", "binary"])
def test_not_a_torch_file(tmp_path: Path, content: bytes, kind: str) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(bad)
    assert str(caught.value) == f"not a checkpoint: {bad} is {kind}, not a torch.save file"


def test_a_bundle_folder_is_not_a_checkpoint(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a bundle folder; this command takes a "
                                              r"checkpoint \(ckpt\.pt\)"):
        load_checkpoint(tiny_bundle)
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint"):
        load_checkpoint(tmp_path)


def test_corrupted_middle(tmp_path: Path, ckpt: Path) -> None:
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"x" * 64  # inside the tensor data
    data[100:164] = b"x" * 64  # inside the pickled structure
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
        load_checkpoint(bad)


@pytest.mark.parametrize(("obj", "match"), [
    ({"weights": torch.zeros(2)}, r"is not a segclip checkpoint \(no format 'segclip-ckpt'\)"),
    ([1, 2, 3], r"is not a segclip checkpoint"),
    ({"clip.visual.proj": torch.zeros(2)}, r"official SegCLIP file: run `segclip-convert "
                                           r"official` first"),
    ({"visual.conv1.weight": torch.zeros(2)}, r"looks like CLIP weights"),
    ({"format": "segclip-bundle", "version": 1}, r"is not a segclip checkpoint"),
])
def test_wrong_format(tmp_path: Path, obj: object, match: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_wrong_version(tmp_path: Path, ckpt: Path, version: object) -> None:
    payload = payload_of(ckpt)
    payload["version"] = version
    torch.save(payload, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint version {version!r} is not supported "
                                              r"\(expected 1\); upgrade segclip"):
        load_checkpoint(tmp_path / "v.pt")


def test_missing_config_or_state_dict(tmp_path: Path, ckpt: Path) -> None:
    payload = payload_of(ckpt)
    del payload["state_dict"]
    torch.save(payload, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match=r"lacks its 'config' or 'state_dict' dict"):
        load_checkpoint(tmp_path / "nostate.pt")


def test_invalid_config(tmp_path: Path, ckpt: Path) -> None:
    payload = payload_of(ckpt)
    payload["config"]["num_groups"] = 8
    torch.save(payload, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match=r"invalid model config: unknown ModelConfig "
                                              r"fields \['num_groups'\]"):
        load_checkpoint(tmp_path / "cfg.pt")
    payload["config"] = payload_of(ckpt)["config"] | {"num_centers": 0}
    torch.save(payload, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match=r"num_centers must be a positive integer, got 0"):
        load_checkpoint(tmp_path / "cfg.pt")


def test_missing_and_extra_keys(tmp_path: Path, ckpt: Path) -> None:
    payload = payload_of(ckpt)
    del payload["state_dict"]["group.centers"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"state dict does not match the model: 1 missing "
                                              r"\['group.centers'\], 0 unexpected \[\]"):
        load_checkpoint(tmp_path / "missing.pt")
    payload = payload_of(ckpt)
    payload["state_dict"]["group.extra_centers"] = torch.zeros(3)
    torch.save(payload, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"0 missing \[\], 1 unexpected "
                                              r"\['group.extra_centers'\]"):
        load_checkpoint(tmp_path / "extra.pt")


def test_wrong_shape_names_the_tensor(tmp_path: Path, ckpt: Path) -> None:
    payload = payload_of(ckpt)
    payload["state_dict"]["group.centers"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"size mismatch for group\.centers.*"
                                              r"\[3, 3\].*\[8, 96\]") as info:
        load_checkpoint(tmp_path / "shape.pt")
    assert "\n" not in str(info.value)  # one line, for the CLI


def test_checkpoint_error_is_a_segclip_value_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert isinstance(info.value, SegclipError) and isinstance(info.value, ValueError)
    assert not os.listdir(tmp_path)

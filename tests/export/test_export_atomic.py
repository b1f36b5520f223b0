"""Atomic export: a failure at any step leaves no complete-looking bundle and the previous
bundle byte-for-byte intact (docs/architecture.md "Command contracts": nothing half-written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segclip.export import ParityError, export_bundle
from segclip.runtime import contract


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def previous(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


@pytest.mark.parametrize("step", ["segclip.export.precision.convert_fp16",
                                  "segclip.export.tokenizer_file.write_tokenizer_file",
                                  "segclip.export.bundle.atomic_write_json",
                                  "segclip.export.bundle.swap_directory"])
def test_failure_mid_export_keeps_previous_bundle(previous: Path, tiny_checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  step: str) -> None:
    before = _snapshot(previous)

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("interrupted mid-export")

    monkeypatch.setattr(step, boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint, previous, fp16=True)
    assert _snapshot(previous) == before
    assert sorted(p.name for p in previous.parent.iterdir()) == ["bundle"]  # no staging left


def test_failure_on_fresh_target_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("segclip.export.bundle.atomic_write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(tiny_checkpoint, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_keeps_previous_bundle(previous: Path, tiny_checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(previous)
    monkeypatch.setattr("segclip.export.parity.FP32_MAX_ABS", 0.0)
    with pytest.raises(ParityError, match=r"image.onnx \w+ max\|diff\| .* > 0e\+00"):
        export_bundle(tiny_checkpoint, previous)
    assert _snapshot(previous) == before
    assert (previous / contract.MANIFEST_FILE).is_file()
    assert sorted(p.name for p in previous.parent.iterdir()) == ["bundle"]

"""Bad input, bundles: damaged, foreign or mismatched bundles given to segclip-run, segclip-eval
and segclip-export verify give one `error:` line, exit code 2, no traceback and write nothing.

Kinds: an ONNX file that is not a bundle, a folder with a graph but no manifest, a missing or
truncated or foreign file, a tokenizer that is not one, a manifest of another version or format
or not JSON at all, a manifest naming files outside the bundle, and a TensorRT engine recorded
for another TensorRT version and GPU (a fake manifest entry; the TensorRT version and GPU
"present" are stubbed, so this runs without a GPU). Library-level checks of the same kinds are in
tests/runtime/test_runtime_bundle.py; this file checks what the commands make of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _reliability_support import assert_user_error, entries, invoke, snapshot

PRESENT = {"tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
FOREIGN_ENGINE = {"tower": "image", "file": "image.plan", "tensorrt": "8.6.1",
                  "gpu": "Tesla T4", "compute_capability": "7.5", "precision": "fp32",
                  "profile": {"min": 1, "opt": 4, "max": 16}}

# kind -> {command: fragment of its one-line error}; a command absent from the dict does not
# read the damaged part (e.g. `verify` re-checks graphs, not the tokenizer or engines)
KINDS: dict[str, dict[str, str]] = {
    "lone_onnx_file": {"verify": "is a file, not a segclip bundle",
                       "run": "is not a segclip bundle", "eval": "is an ONNX model"},
    "graph_without_manifest": {"verify": "no segclip.json", "run": "no segclip.json",
                               "eval": "no segclip.json"},
    "missing_image": {"verify": "lacks ['image.onnx']", "run": "image.onnx is missing",
                      "eval": "image.onnx is missing"},
    "missing_text": {"verify": "lacks ['text.onnx']", "run": "text.onnx is missing",
                     "eval": "text.onnx is missing"},
    "missing_tokenizer": {"verify": "lacks ['tokenizer.json']",
                          "run": "tokenizer.json is missing", "eval": "tokenizer.json is missing"},
    "truncated_image": {"verify": "image.onnx", "run": "truncated or was replaced",
                        "eval": "truncated or was replaced"},
    "foreign_image": {"verify": "graph inputs", "run": "has no input 'image'",
                      "eval": "has no input 'image'"},
    "not_a_tokenizer": {"run": "tokenizer", "eval": "tokenizer"},
    "version_2": {"verify": "bundle version 2 is not supported",
                  "run": "bundle version 2 is not supported",
                  "eval": "bundle version 2 is not supported"},
    "other_format": {"verify": "not a segclip bundle manifest",
                     "run": "not a segclip bundle manifest",
                     "eval": "not a segclip bundle manifest"},
    "manifest_not_json": {"verify": "cannot read", "run": "cannot read", "eval": "cannot read"},
    "manifest_empty": {"verify": "cannot read", "run": "cannot read", "eval": "cannot read"},
    "file_outside_bundle": {"verify": "plain file name", "run": "plain file name",
                            "eval": "plain file name"},
    "trt_engine_other_version": {"run": "was built for TensorRT 8.6.1",
                                 "run-plan": "was built for TensorRT 8.6.1",
                                 "eval": "was built for TensorRT 8.6.1"},
}
CASES = [(kind, command) for kind, commands in KINDS.items() for command in commands]


def _edit_manifest(root: Path, **changes: object) -> None:
    manifest = json.loads((root / "segclip.json").read_text())
    manifest.update(changes)
    (root / "segclip.json").write_text(json.dumps(manifest))


def _relabel_size(root: Path, name: str) -> None:
    """Record a replaced file's new size, so only the content is foreign."""
    manifest = json.loads((root / "segclip.json").read_text())
    manifest["file_bytes"][name] = (root / name).stat().st_size
    (root / "segclip.json").write_text(json.dumps(manifest))


def make_damaged_bundle(kind: str, good: Path, tmp_path: Path) -> Path:
    """A copy of `good` damaged as `kind`; returns the path to pass as the engine/bundle."""
    root = Path(shutil.copytree(good, tmp_path / "bundle"))
    if kind == "lone_onnx_file":
        lone = tmp_path / "model.onnx"
        shutil.copy(root / "text.onnx", lone)
        shutil.rmtree(root)
        return lone
    if kind == "graph_without_manifest":
        (root / "segclip.json").unlink()
    elif kind.startswith("missing_"):
        (root / {"image": "image.onnx", "text": "text.onnx",
                 "tokenizer": "tokenizer.json"}[kind.split("_", 1)[1]]).unlink()
    elif kind == "truncated_image":
        data = (root / "image.onnx").read_bytes()
        (root / "image.onnx").write_bytes(data[: len(data) // 2])
    elif kind == "foreign_image":
        shutil.copy(root / "text.onnx", root / "image.onnx")
        _relabel_size(root, "image.onnx")
    elif kind == "not_a_tokenizer":
        (root / "tokenizer.json").write_text('{"version": "1.0", "model": null}')
        _relabel_size(root, "tokenizer.json")
    elif kind == "version_2":
        _edit_manifest(root, version=2)
    elif kind == "other_format":
        _edit_manifest(root, format="segclip-checkpoint")
    elif kind == "manifest_not_json":
        (root / "segclip.json").write_bytes(b"\x89PNG\r\n\x1a\n not json")
    elif kind == "manifest_empty":
        (root / "segclip.json").write_bytes(b"")
    elif kind == "file_outside_bundle":
        shutil.copy(root / "image.onnx", tmp_path / "image.onnx")
        manifest = json.loads((root / "segclip.json").read_text())
        manifest["files"]["image"] = "../image.onnx"
        (root / "segclip.json").write_text(json.dumps(manifest))
    elif kind == "trt_engine_other_version":
        (root / "image.plan").write_bytes(b"serialized engine of another TensorRT")
        _edit_manifest(root, engines=[FOREIGN_ENGINE])
    else:
        raise KeyError(kind)
    return root


@pytest.fixture
def stub_tensorrt_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend TensorRT 10.9 runs on an H100 here (only the facts the engine check compares)."""
    from segclip.runtime import backends
    from segclip.runtime.bundle import EngineFacts

    monkeypatch.setattr(backends, "_engine_facts", lambda device_id: EngineFacts(**PRESENT))


@pytest.mark.parametrize("kind, command", CASES)
def test_bad_bundle_is_one_line_error(kind: str, command: str, tmp_path: Path,
                                      rel_bundle: Path, tiny_checkpoint: Path, synth_world: Path,
                                      stub_tensorrt_present: None) -> None:
    engine = make_damaged_bundle(kind, rel_bundle, tmp_path)
    image = tmp_path / "photo.png"
    shutil.copy(next((synth_world / "val" / "JPEGImages").iterdir()), image)
    labels = tmp_path / "labels.txt"
    labels.write_text("red square\nblue circle\n")
    out = tmp_path / "out"
    before = snapshot(tmp_path / "bundle")
    if command == "verify":
        from segclip.export.cli import app

        result = invoke(app, ["verify", engine, tiny_checkpoint])
    elif command == "eval":
        from segclip.cli.evaluate import app

        result = invoke(app, [engine, "--data", synth_world / "val", "--classes",
                              synth_world / "classes.txt", "--device",
                              "cuda" if kind.startswith("trt") else "cpu", "--out",
                              out / "eval.json", "--quiet"])
    else:
        from segclip.runtime.cli import app

        target = engine / "image.plan" if command == "run-plan" else engine
        result = invoke(app, ["--engine", target, "--labels", labels, "--out", out,
                              "--device", "cuda" if command == "run-plan" else "auto",
                              "--quiet", image])
    line = assert_user_error(result, KINDS[kind][command])
    assert entries(out) == [], "output written for a refused bundle"
    assert snapshot(tmp_path / "bundle") == before, "the command changed the bundle"
    if kind == "trt_engine_other_version":
        assert "segclip-export trt" in line  # says how to rebuild


def test_tensorrt_check_is_live(tmp_path: Path, rel_bundle: Path, synth_world: Path,
                                stub_tensorrt_present: None) -> None:
    """Control for the TensorRT case: an entry recorded for the stubbed TensorRT and GPU passes
    the version check (and then fails only because the engine bytes are fake)."""
    from segclip.runtime.bundle import Bundle, EngineFacts

    root = make_damaged_bundle("trt_engine_other_version", rel_bundle, tmp_path)
    _edit_manifest(root, engines=[{**FOREIGN_ENGINE, **PRESENT}])
    info = Bundle.open(root / "image.plan").check_engine("image", EngineFacts(**PRESENT))
    assert info.tensorrt == PRESENT["tensorrt"]

"""The bundle writer and its manifest (docs/architecture.md "Bundle contract"): it matches the
checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from segclip.checkpoint import file_sha256, read_checkpoint
from segclip.export import ExportError, export_bundle, export_model, summary_table
from segclip.runtime import contract


def test_bundle_holds_the_contract_files(bundle: Path, manifest: dict[str, Any]) -> None:
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted([contract.IMAGE_ONNX, contract.IMAGE_FP16_ONNX, contract.TEXT_ONNX,
                            contract.TOKENIZER_FILE, contract.MANIFEST_FILE])
    assert manifest["files"] == {"image": contract.IMAGE_ONNX,
                                 "image_fp16": contract.IMAGE_FP16_ONNX,
                                 "text": contract.TEXT_ONNX, "tokenizer": contract.TOKENIZER_FILE}
    for name, size in manifest["file_bytes"].items():
        assert (bundle / name).stat().st_size == size
    assert "model" in json.loads((bundle / contract.TOKENIZER_FILE).read_text())


def test_manifest_matches_checkpoint(bundle: Path, manifest: dict[str, Any],
                                     tiny_checkpoint: Path) -> None:
    payload = read_checkpoint(tiny_checkpoint)
    config = payload["config"]
    assert manifest["format"] == contract.BUNDLE_FORMAT
    assert manifest["version"] == contract.BUNDLE_VERSION
    model = manifest["model"]
    for key in ("image_size", "patch_size", "num_centers", "embed_dim", "context_length"):
        assert model[key] == config[key], key
    assert model["grid_size"] == config["image_size"] // config["patch_size"]
    expected_scale = min(math.exp(float(payload["state_dict"]["logit_scale"])),
                         config["max_logit_scale"])
    assert model["logit_scale"] == pytest.approx(expected_scale, rel=1e-6)
    assert manifest["source"] == {"checkpoint": tiny_checkpoint.name,
                                  "checkpoint_sha256": file_sha256(tiny_checkpoint)}
    s = config["image_size"]
    assert manifest["preprocessing"]["resize_short_side"] == s
    assert manifest["preprocessing"]["window"] == s == manifest["preprocessing"]["stride"]
    assert manifest["preprocessing"]["mean"] == list(contract.CLIP_MEAN)
    assert manifest["inference"] == {"template": "a photo of a {}.", "top_k": 5,
                                     "threshold": contract.DEFAULT_THRESHOLD}
    export = manifest["export"]
    assert export["opset"] == 17 and "dynamo=False" in export["exporter"]
    assert export["torch"] == torch.__version__
    assert manifest["engines"] == []
    assert manifest["parity"]["passed"] is True


def test_summary_table_lists_files_and_figures(bundle: Path) -> None:
    table = summary_table(bundle)
    for name in (contract.IMAGE_ONNX, contract.IMAGE_FP16_ONNX, contract.TEXT_ONNX,
                 contract.TOKENIZER_FILE, contract.MANIFEST_FILE):
        assert name in table
    assert "parity vs PyTorch: passed" in table
    assert "%" in table  # argmax agreement column


def test_existing_bundle_is_replaced_whole_and_logit_scale_is_clamped(
        bundle: Path, checkpoint_model: Any, tmp_path: Path) -> None:
    """Re-export over a bundle: no file of the old one survives (here the fp16 graph), and the
    recorded multiplier is exp(param) clamped to max_logit_scale."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    import copy

    model = copy.deepcopy(checkpoint_model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(250.0))
    export_model(model, target, verify=False)
    manifest = json.loads((target / contract.MANIFEST_FILE).read_text())
    assert manifest["model"]["logit_scale"] == pytest.approx(100.0)
    assert manifest["parity"] is None
    assert not (target / contract.IMAGE_FP16_ONNX).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="non-empty directory without segclip.json"):
        export_bundle(tiny_checkpoint, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_opset_outside_the_exporter_range_is_refused(tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"opset must be in \[17, 20\].*got 16"):
        export_bundle(tiny_checkpoint, tmp_path / "b", opset=16)
    with pytest.raises(ExportError, match="got 21"):
        export_bundle(tiny_checkpoint, tmp_path / "b", opset=21)
    assert not (tmp_path / "b").exists()


def test_bundle_tokenizer_and_text_graph_match_torch(bundle: Path, checkpoint_model: Any) -> None:
    """The torch-free path (bundle tokenizer.json -> text.onnx) equals open_clip + eager."""
    import numpy as np
    import onnxruntime as ort

    from segclip.runtime.tokenizer import Tokenizer
    from segclip.text import tokenize

    prompts = [contract.DEFAULT_TEMPLATE.format(w) for w in ("cat", "traffic light", "sky")]
    tokens = Tokenizer.from_file(bundle / contract.TOKENIZER_FILE)(prompts, 77)
    np.testing.assert_array_equal(tokens, tokenize(prompts, context_length=77).numpy())
    session = ort.InferenceSession(str(bundle / contract.TEXT_ONNX),
                                   providers=["CPUExecutionProvider"])
    got = session.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens})[0]
    with torch.no_grad():
        want = checkpoint_model.encode_text(torch.from_numpy(tokens)).numpy()
    assert np.abs(got - want).max() <= 1e-4

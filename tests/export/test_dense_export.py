"""`segclip-export dense`: a small random CLIP file -> a verified bundle of kind "dense"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segclip.config import ModelConfig
from segclip.dense import load_dense
from segclip.export.cli import app
from segclip.model import SegCLIP

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An open_clip-layout CLIP state dict (ViT width 64, 2 blocks, 96 px; text width 64)."""
    torch.manual_seed(0)
    config = ModelConfig(image_size=96, patch_size=16, vision_width=64, vision_layers=2,
                         vision_heads=1, group_layer=1, num_centers=2, cross_layers=1,
                         embed_dim=32, text_width=64, text_layers=1, text_heads=1,
                         with_reconstruction=False)
    state = {k: v for k, v in SegCLIP(config).state_dict().items() if not k.startswith("group.")}
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(state, path)
    return path


def test_export_dense_bundle(clip_file, tmp_path):
    out = tmp_path / "dense"
    result = CliRunner().invoke(app, ["dense", str(clip_file), "--mode", "sclip", "--out",
                                      str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "segclip.json").read_text())
    assert manifest["kind"] == "dense" and manifest["mode"] == "sclip"
    assert manifest["model"]["grid_size"] == 6 and manifest["model"]["embed_dim"] == 32
    parity = manifest["parity"]
    assert parity["fp32"]["max_abs"] <= 1e-4 and parity["text"]["max_abs"] <= 1e-4
    assert parity["fp32"]["argmax_agreement"] == 1.0
    assert {p.name for p in out.iterdir()} == {"image.onnx", "text.onnx", "tokenizer.json",
                                               "segclip.json"}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "image.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    (got,) = sess.run(["patch_emb"], {"image": x})
    with torch.no_grad():
        want = load_dense(clip_file, "sclip")(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 36, 32)
    assert np.abs(got - want).max() <= 1e-4


def test_export_dense_fp16_int8(clip_file, tmp_path):
    """--fp16/--int8 add checked reduced-precision image graphs; the int8 one quantises only the
    unchanged blocks."""
    import onnx

    out = tmp_path / "dense"
    result = CliRunner().invoke(app, ["dense", str(clip_file), "--fp16", "--int8", "-o",
                                      str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "segclip.json").read_text())
    assert manifest["files"]["image_fp16"] == "image.fp16.onnx"
    assert manifest["files"]["image_int8"] == "image.int8.onnx"
    for precision in ("fp16", "int8"):
        assert manifest["parity"][precision]["argmax_agreement"] >= 0.99
        assert manifest["parity"][precision]["min_cosine"] > 0.99
    quantised = [n.name for n in onnx.load(str(out / "image.int8.onnx")).graph.node
                 if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert quantised and all(n.startswith("/resblocks.0/") for n in quantised)  # 2 blocks


def test_export_dense_bad_input_exit_2(clip_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["dense", str(clip_file), "--mode", "nope", "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown dense mode" in result.output and "Traceback" not in result.output
    missing = runner.invoke(app, ["dense", str(tmp_path / "absent.pt"), "--out",
                                  str(tmp_path / "y")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dense_segmenter_end_to_end(clip_file, tmp_path):
    """Export -> Segmenter (a DenseSegmenter on ONNX Runtime) equals the same protocol run on
    the PyTorch path (runtime/dense.py, tested alone against SCLIP's code in
    tests/runtime/test_dense_protocol.py)."""
    from segclip.export.dense import text_model
    from segclip.runtime import Segmenter
    from segclip.runtime.dense import (
        DenseSettings,
        LogitMaps,
        assign_dense,
        class_text,
        crops,
        resized_size,
        split_names,
        upsample,
    )
    from segclip.runtime.dense_segmenter import DenseSegmenter
    from segclip.runtime.images import normalize, resize_to
    from segclip.runtime.templates import IMAGENET_TEMPLATES
    from segclip.runtime.tokenizer import Tokenizer

    out = tmp_path / "dense"
    assert CliRunner().invoke(app, ["dense", str(clip_file), "-o", str(out), "--quiet"]
                              ).exit_code == 0
    seg = Segmenter(out, device="cpu", threshold=0.2, background=["sky", "wall"], pamr=2,
                    confidence=True)
    assert isinstance(seg, DenseSegmenter) and seg.mode == "naclip"
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    image[30:90, 40:120] //= 3  # a darker block: structure for the windows and PAMR
    labels = ["cat, kitty", "dog", "tree"]
    result = seg.segment(image, labels)
    assert result.label_map.shape == (120, 160) and result.confidence.shape == (120, 160)
    assert sum(result.counts.values()) == 120 * 160

    state = torch.load(clip_file, weights_only=True)
    dense = load_dense(clip_file, "naclip")
    text_tower = text_model(state, dense.config, "tiny")
    tok = Tokenizer.from_file(out / "tokenizer.json")
    names, owner = split_names(labels, ["sky", "wall"])
    assert resized_size(120, 160, 144) == (144, 192)  # short side 1.5 x the 96 window
    with torch.no_grad():
        text = class_text(names, IMAGENET_TEMPLATES, lambda p: text_tower.encode_text(
            torch.from_numpy(tok(p, 77))).numpy())
        x = normalize(resize_to(image, 144, 192))
        windows, origins = crops(x, 96, 48)
        assert len(origins) == 2 * 3
        patches = dense(torch.from_numpy(windows)).numpy()
    maps = LogitMaps(patches, origins, text, (144, 192), (120, 160), 96,
                     DenseSettings(logit_scale=50.0, pamr_steps=2), upsample(x, 120, 160))
    want, prob = assign_dense(maps, owner, 3, 0.2)
    assert (result.label_map == want).mean() > 0.999
    assert np.abs(result.confidence - prob).max() < 1e-3
    assert len(np.unique(want)) >= 2  # a real decision, not one value everywhere
    for k, name in enumerate(labels):
        if result.counts[name]:
            assert result.scores[name] == pytest.approx(
                float(prob[want == k + 1].mean()), abs=1e-3)


def test_bundle_reader_takes_both_kinds(clip_file, tmp_path):
    from segclip.runtime.bundle import Bundle
    from segclip.runtime.errors import BundleError

    out = tmp_path / "dense"
    assert CliRunner().invoke(app, ["dense", str(clip_file), "-o", str(out), "--quiet",
                                    "--mode", "maskclip"]).exit_code == 0
    bundle = Bundle.open(out)
    assert bundle.kind == "dense" and bundle.dense.mode == "maskclip"
    assert (bundle.dense.window, bundle.dense.stride, bundle.dense.short_side) == (96, 48, 144)
    assert bundle.grid_size == 6 and bundle.embed_dim == 32 and bundle.threshold == 0.0
    bundle.verify_graphs()  # image.onnx: patch_emb [N, 36, 32]; text.onnx as for SegCLIP
    manifest = json.loads((out / "segclip.json").read_text())
    manifest["kind"] = "hologram"
    (out / "segclip.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle kind 'hologram'"):
        Bundle.open(out)

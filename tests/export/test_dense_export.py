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
    assert all(v <= 1e-4 for v in manifest["parity"]["max_abs"].values())
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
    """Export -> DenseSegmenter (ONNX Runtime) equals the same protocol on the PyTorch path."""
    from segclip.export.dense import text_model
    from segclip.runtime.dense import assign_dense, class_text, slide_logits, split_names, upsample
    from segclip.runtime.dense_segmenter import DenseSegmenter
    from segclip.runtime.images import normalize, resize_short_side
    from segclip.runtime.templates import IMAGENET_TEMPLATES
    from segclip.runtime.tokenizer import Tokenizer

    out = tmp_path / "dense"
    assert CliRunner().invoke(app, ["dense", str(clip_file), "-o", str(out), "--quiet"]
                              ).exit_code == 0
    seg = DenseSegmenter(out, prob_thd=0.3)
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    labels = ["cat, kitty", "dog", "sky"]
    result = seg.segment(image, labels, background=["sky"])
    assert result.label_map.shape == (120, 160)
    assert sum(result.counts.values()) == 120 * 160
    assert result.counts["sky"] == 0

    state = torch.load(clip_file, weights_only=True)
    dense = load_dense(clip_file, "naclip")
    text_tower = text_model(state, dense.config, "tiny")
    tok = Tokenizer.from_file(out / "tokenizer.json")
    names, owner = split_names(labels)
    with torch.no_grad():
        text = class_text(names, IMAGENET_TEMPLATES, lambda p: text_tower.encode_text(
            torch.from_numpy(tok(p, 77))).numpy())
        x = normalize(resize_short_side(image, 336))
        logits = slide_logits(x, lambda c: dense(torch.from_numpy(c)).numpy(), text, 96, 48,
                              50.0)
    want, _ = assign_dense(upsample(logits, 120, 160), owner, 3, 0.3, [2])
    assert (result.label_map == want).mean() > 0.999
    assert len(np.unique(want)) >= 2  # a real decision, not one value everywhere


def test_segclip_bundle_reader_names_the_dense_kind(clip_file, tmp_path):
    from segclip.runtime.bundle import Bundle
    from segclip.runtime.errors import BundleError

    out = tmp_path / "dense"
    assert CliRunner().invoke(app, ["dense", str(clip_file), "-o", str(out), "--quiet",
                                    "--mode", "maskclip"]).exit_code == 0
    with pytest.raises(BundleError, match="DenseSegmenter"):
        Bundle.open(out)

"""Dense bundles through the shared front ends: segclip-run (with the dense flags), segclip-serve
(a real server on 127.0.0.1) and segclip-eval, each equal to `Segmenter` on the same bundle."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
LABELS = ["cat, kitty", "dog", "tree"]


@pytest.fixture(scope="module")
def dense_bundle(tmp_path_factory) -> Path:
    """A naclip bundle of a small random CLIP (ViT width 64, 2 blocks, 96 px; text width 64)."""
    import torch

    from segclip.config import ModelConfig
    from segclip.export.dense import export_dense_bundle
    from segclip.model import SegCLIP

    torch.manual_seed(0)
    config = ModelConfig(image_size=96, patch_size=16, vision_width=64, vision_layers=2,
                         vision_heads=1, group_layer=1, num_centers=2, cross_layers=1,
                         embed_dim=32, text_width=64, text_layers=1, text_heads=1,
                         with_reconstruction=False)
    state = {k: v for k, v in SegCLIP(config).state_dict().items() if not k.startswith("group.")}
    root = tmp_path_factory.mktemp("dense-frontends")
    torch.save(state, root / "clip.pt")
    return export_dense_bundle(root / "clip.pt", root / "bundle")


def _image(path: Path, seed: int, height: int = 90, width: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    for _ in range(3):
        y, x = rng.integers(0, height), rng.integers(0, width)
        pixels[y:y + height // 2, x:x + width // 2] = rng.integers(0, 255, 3)
    Image.fromarray(pixels).save(path)
    return pixels


def test_segclip_run_dense_flags(dense_bundle, tmp_path):
    from segclip.runtime import Segmenter
    from segclip.runtime.cli import app

    image = _image(tmp_path / "a.png", 0)
    out = tmp_path / "out"
    args = ["--engine", str(dense_bundle), "--label", LABELS[0], "--label", LABELS[1],
            "--label", LABELS[2], "--background-names", "sky, wall", "--pamr", "2",
            "--threshold", "0.2", "--confidence", "--quiet", "-o", str(out),
            str(tmp_path / "a.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(out / "a.png"))
    with Segmenter(dense_bundle, device="cpu", threshold=0.2, background=("sky", "wall"),
                   pamr=2) as seg:
        want = seg.segment(image, LABELS)
    assert np.array_equal(got, want.label_map) and len(np.unique(got)) >= 2
    record = json.loads((out / "a.json").read_text())
    assert record["labels"] == LABELS and record["run"]["threshold"] == 0.2
    assert record["run"]["dense"] == {"background": ["sky", "wall"], "pamr": 2}
    assert (out / "a_conf.png").is_file()
    again = CliRunner().invoke(app, [*args[:-1], "--skip-existing", str(tmp_path / "a.png")])
    assert again.exit_code == 0 and "skipped" in again.output.lower()


def test_dense_flags_refused_for_segclip_bundles(tiny_bundle, tmp_path):
    from segclip.runtime.cli import app

    _image(tmp_path / "a.png", 1)
    result = CliRunner().invoke(app, ["--engine", str(tiny_bundle), "--label", "cat", "--pamr",
                                      "3", "-o", str(tmp_path / "out"), str(tmp_path / "a.png")])
    assert result.exit_code == 2
    assert "--pamr only apply to dense bundles" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_segclip_serve_dense(dense_bundle, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from _serve_support import serve

    from segclip.runtime import Segmenter

    image = _image(tmp_path / "b.png", 2, 64, 100)
    with Segmenter(dense_bundle, device="cpu", threshold=0.1) as seg:
        want = seg.segment(image, LABELS).label_map
    with serve(dense_bundle, tmp_path) as server, httpx.Client(base_url=server.url,
                                                                timeout=60) as client:
        response = client.post("/v1/segment", json={
            "image": base64.b64encode((tmp_path / "b.png").read_bytes()).decode(),
            "labels": LABELS, "threshold": 0.1})
        assert response.status_code == 200, response.text
        body = response.json()
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_map"]["data"]))))
    assert body["labels"] == LABELS and np.array_equal(got, want)


def test_segclip_serve_dense_flags(dense_bundle, tmp_path):
    """--background-names, --pamr, --area-thd and --logit-scale of segclip-serve give
    `Segmenter`'s label map with the same options, and /v1/model reports them."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from _serve_support import serve

    from segclip.runtime import Segmenter

    image = _image(tmp_path / "c.png", 3, 64, 100)
    options = {"background": ("sky", "wall"), "pamr": 2, "area_thd": 0.05, "logit_scale": 40.0}
    with Segmenter(dense_bundle, device="cpu", threshold=0.2, **options) as seg:
        want = seg.segment(image, LABELS).label_map
    with Segmenter(dense_bundle, device="cpu", threshold=0.2) as seg:
        plain = seg.segment(image, LABELS).label_map
    assert not np.array_equal(want, plain)  # the options matter for this image
    flags = ["--background-names", "sky, wall", "--pamr", "2", "--area-thd", "0.05",
             "--logit-scale", "40"]
    with serve(dense_bundle, tmp_path, *flags) as server, httpx.Client(base_url=server.url,
                                                                        timeout=60) as client:
        response = client.post("/v1/segment", json={
            "image": base64.b64encode((tmp_path / "c.png").read_bytes()).decode(),
            "labels": LABELS, "threshold": 0.2})
        assert response.status_code == 200, response.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(
            response.json()["label_map"]["data"]))))
        model = client.get("/v1/model").json()
    assert np.array_equal(got, want)
    assert model["kind"] == "dense" and model["dense"] == {
        "background": ["sky", "wall"], "pamr": 2, "area_thd": 0.05, "logit_scale": 40.0}


def test_segclip_serve_refuses_dense_flags_for_segclip_bundles(tiny_bundle):
    pytest.importorskip("fastapi")
    from segclip.runtime.serve.cli import app

    result = CliRunner().invoke(app, ["--engine", str(tiny_bundle), "--pamr", "3"])
    assert result.exit_code == 2 and "--pamr only apply to dense bundles" in result.output
    assert "Traceback" not in result.output


def test_segclip_eval_dense_preset(dense_bundle, tmp_path):
    """segclip-eval on a dense bundle: the dense preset's background names and thresholds, and
    the confusion of Segmenter's label maps."""
    from segclip.evaluation.evaluate import evaluate
    from segclip.runtime import Segmenter
    from segclip.runtime.dense_presets import DENSE_PRESETS

    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = []
    for i in range(2):
        image = _image(root / "JPEGImages" / f"im{i}.jpg", 10 + i, 64, 96)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[10:40, 20:60] = 1 + i
        mask[0, :] = 255
        Image.fromarray(mask).save(root / "SegmentationClass" / f"im{i}.png")
        names.append(f"im{i}")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    result = evaluate(dense_bundle, root, "voc", device="cpu")
    preset = DENSE_PRESETS["voc"]
    assert result.threshold == preset.prob_thd and result.num_images == 2
    from segclip.evaluation.datasets import VocDataset, load_classes
    from segclip.evaluation.metrics import confusion_matrix

    classes = load_classes("voc").names
    confusion = np.zeros((21, 21), np.int64)
    with Segmenter(dense_bundle, device="cpu", threshold=preset.prob_thd,
                   background=preset.background, logit_scale=preset.logit_scale,
                   area_thd=preset.area_thd) as seg:
        for sample in VocDataset(root, "val"):
            label_map = seg.segment(sample.image, list(classes)).label_map
            confusion += confusion_matrix(label_map, sample.mask, 21)
    assert np.array_equal(result.confusion, confusion)


def test_background_names_must_not_repeat_a_label(dense_bundle):
    from segclip.runtime import Segmenter
    from segclip.runtime.errors import LabelFileError

    with Segmenter(dense_bundle, device="cpu", background=("Dog", "sky")) as seg:
        with pytest.raises(LabelFileError, match=r"\['Dog', 'dog'\] appear more than once"):
            seg.segment(np.zeros((40, 40, 3), np.uint8), ["cat, dog"])

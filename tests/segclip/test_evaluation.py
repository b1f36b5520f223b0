"""Evaluation: mIoU against literal computations, the protocol against a naive literal
re-implementation, class presets, diagnostics and a run on a generated VOC-layout set."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segclip.checkpoint import save_checkpoint
from segclip.config import ModelConfig
from segclip.errors import DataError
from segclip.evaluation import evaluate, load_classes
from segclip.evaluation.datasets import VocDataset, read_mask
from segclip.evaluation.diagnostics import majority_labels
from segclip.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou
from segclip.evaluation.protocol import (
    Protocol,
    label_scores,
    predict,
    resized_shape,
    window_boxes,
    window_scores,
)
from segclip.model import SegCLIP
from segclip.runtime.contract import CLIP_MEAN, CLIP_STD

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
             group_layer=1, num_centers=4, text_width=32, text_layers=1, text_heads=2,
             embed_dim=32, decoder_width=32, decoder_layers=1, decoder_heads=2)


# ---- a naive, literal reference (loops, float64) -----------------------------------------------
def naive_bilinear(values: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, h, w) -> (C, out_h, out_w), half-pixel centres (align_corners=False), edge-clamped."""
    c, h, w = values.shape
    out = np.zeros((c, out_h, out_w))
    for y in range(out_h):
        sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1, wy = min(y0 + 1, h - 1), sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1, wx = min(x0 + 1, w - 1), sx - x0
            out[:, y, x] = ((1 - wy) * (1 - wx) * values[:, y0, x0]
                            + (1 - wy) * wx * values[:, y0, x1]
                            + wy * (1 - wx) * values[:, y1, x0] + wy * wx * values[:, y1, x1])
    return out


def naive_scores(regions, global_embedding, text, scale, top_k):
    n_regions, n_labels = regions.shape[0], text.shape[0]
    logits = np.array([[scale * regions[r] @ text[t] for t in range(n_labels)]
                       for r in range(n_regions)])
    pre = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    global_logits = [scale * global_embedding @ text[t] for t in range(n_labels)]
    keep = sorted(range(n_labels), key=lambda t: -global_logits[t])[:min(top_k, n_labels)]
    masked = np.full_like(logits, -np.inf)
    masked[:, keep] = logits[:, keep]
    return np.exp(masked) / np.exp(masked).sum(1, keepdims=True) * pre


def naive_window(assign, scores, size, threshold):
    """((1+K, S, S) maps, (S, S) regions, (S, S) gap between the two best regions)."""
    up = naive_bilinear(assign, size, size)
    n_labels = scores.shape[1]
    maps = np.zeros((1 + n_labels, size, size))
    regions = np.zeros((size, size), np.int64)
    gap = np.zeros((size, size))
    cut = min(threshold, scores.max())
    for y in range(size):
        for x in range(size):
            order = np.argsort(-up[:, y, x], kind="stable")
            regions[y, x] = order[0]
            gap[y, x] = up[order[0], y, x] - up[order[1], y, x]
            maps[1:, y, x] = scores[order[0]]
            maps[0, y, x] = 1.0 if scores[order[0]].max() < cut else 0.0
    return maps, regions, gap


def random_outputs(seed: int, n_regions: int = 4, n_labels: int = 7, dim: int = 8, grid: int = 4):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    assign = torch.randn(n_regions, grid, grid, generator=g).mul(2).softmax(dim=0)
    return unit(n_regions, dim), unit(dim), unit(n_labels, dim), assign


# ---- metrics ------------------------------------------------------------------------------------
def test_iou_and_miou_on_hand_made_confusion_matrices() -> None:
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(5 / 8) and iou[1] == pytest.approx(3 / 6) and np.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((5 / 8 + 3 / 6) / 2)
    cm = np.array([[0, 4, 0], [0, 0, 0], [1, 0, 9]])  # class 1 predicted, never true: IoU 0
    assert iou_per_class(cm).tolist() == pytest.approx([0.0, 0.0, 9 / 10])
    assert mean_iou(cm, classes=[2]) == pytest.approx(0.9)


def test_confusion_matrix_matches_a_loop_and_ignores_255() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(9, 11)).astype(np.uint8)
    target[rng.random((9, 11)) < 0.2] = 255
    pred = rng.integers(0, 4, size=(9, 11))
    literal = np.zeros((4, 4), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            literal[t, p] += 1
    assert np.array_equal(confusion_matrix(pred, target, 4), literal)
    with pytest.raises(DataError, match="label 7, outside 0..3"):
        confusion_matrix(pred, np.full_like(target, 7), 4)


# ---- protocol -----------------------------------------------------------------------------------
def test_window_boxes_follow_mmseg_slide() -> None:
    assert window_boxes(224, 300, 224, 224) == [(0, 224, 0, 224), (0, 224, 76, 300)]
    assert window_boxes(32, 45, 32, 32) == [(0, 32, 0, 32), (0, 32, 13, 45)]
    assert window_boxes(500, 224, 224, 224)[-1] == (276, 500, 0, 224)
    assert len(window_boxes(500, 224, 224, 224)) == 3
    assert resized_shape(40, 56, 32) == (32, 45) and resized_shape(375, 500, 224) == (224, 299)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_scores_match_literal(seed: int) -> None:
    regions, global_embedding, text, _ = random_outputs(seed)
    got = label_scores(regions, global_embedding, text, scale=20.0, top_k=5)
    want = naive_scores(regions.double().numpy(), global_embedding.double().numpy(),
                        text.double().numpy(), 20.0, 5)
    assert np.allclose(got.numpy(), want, atol=1e-6)
    assert (got == 0).sum(dim=1).eq(2).all()  # K=7, top-5: two labels masked out
    few = label_scores(regions, global_embedding, text[:3], 20.0, 5)  # k = min(5, K)
    assert (few > 0).all()


@pytest.mark.parametrize("threshold", [0.8, 0.05])
def test_window_scores_match_literal(threshold: float) -> None:
    regions, global_embedding, text, assign = random_outputs(3)
    scores = label_scores(regions, global_embedding, text, 20.0)
    maps, region = window_scores(assign, scores, (16, 16), threshold)
    want_maps, want_region, gap = naive_window(assign.double().numpy(), scores.double().numpy(),
                                               16, threshold)
    clear = gap > 1e-5
    assert clear.mean() > 0.95
    assert np.array_equal(region.numpy()[clear], want_region[clear])
    assert np.allclose(maps.numpy()[:, clear], want_maps[:, clear], atol=1e-6)
    assert maps[0].sum() > 0 if threshold == 0.8 else True


def test_background_uses_min_of_threshold_and_max_score() -> None:
    scores = torch.tensor([[0.30, 0.10], [0.20, 0.05], [0.01, 0.02]])  # max P = 0.30 < 0.8
    assign = torch.eye(3).reshape(3, 3, 1).expand(3, 3, 3).contiguous()  # row y -> region y
    maps, region = window_scores(assign, scores, (3, 3), threshold=0.8)
    assert region[:, 1].tolist() == [0, 1, 2]
    assert maps[0, :, 1].tolist() == [0.0, 1.0, 1.0]  # only the best region stays foreground
    maps, _ = window_scores(assign, scores, (3, 3), threshold=0.15)
    assert maps[0, :, 1].tolist() == [0.0, 0.0, 1.0]


class FakeModel:
    """encode_image outputs that depend on the crop content, so windows differ."""

    def __init__(self, n_regions=4, n_labels=5, dim=8, grid=4, size=32):
        g = torch.Generator().manual_seed(7)
        self.mix = torch.randn(n_regions, 3, generator=g)
        self.region_base = torch.randn(n_regions, dim, generator=g)
        self.region_colour = torch.randn(n_regions, 3, dim, generator=g)
        self.grid = grid
        self.config = SimpleNamespace(image_size=size)

    def scale(self) -> torch.Tensor:
        return torch.tensor(15.0)

    def encode_image(self, crops: torch.Tensor) -> SimpleNamespace:
        pooled = torch.nn.functional.adaptive_avg_pool2d(crops, self.grid)  # (n, 3, g, g)
        assign = torch.einsum("lc,nchw->nlhw", self.mix, pooled).mul(3).softmax(dim=1)
        colour = crops.mean(dim=(2, 3))  # (n, 3)
        regions = self.region_base + torch.einsum("nc,lcd->nld", colour, self.region_colour)
        regions = torch.nn.functional.normalize(regions, dim=-1)
        return SimpleNamespace(regions=regions, assign=assign,
                               global_embedding=torch.nn.functional.normalize(
                                   regions.mean(dim=1), dim=-1))


def naive_predict(model: FakeModel, image: np.ndarray, text: torch.Tensor, threshold: float):
    height, width = image.shape[:2]
    s = model.config.image_size
    h, w = resized_shape(height, width, s)
    pixels = naive_bilinear(image.astype(np.float64).transpose(2, 0, 1), h, w)
    pixels = (pixels / 255 - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
    total = np.zeros((1 + text.shape[0], h, w))
    count = np.zeros((h, w))
    for y0 in range(0, max(h - s, 0) + s, s):
        for x0 in range(0, max(w - s, 0) + s, s):
            y1, x1 = min(y0, h - s), min(x0, w - s)  # the last window shifted back
            crop = torch.from_numpy(pixels[:, y1:y1 + s, x1:x1 + s]).float()[None]
            out = model.encode_image(crop)
            scores = naive_scores(out.regions[0].double().numpy(),
                                  out.global_embedding[0].double().numpy(),
                                  text.double().numpy(), 15.0, 5)
            maps, _, _ = naive_window(out.assign[0].double().numpy(), scores, s, threshold)
            total[:, y1:y1 + s, x1:x1 + s] += maps
            count[y1:y1 + s, x1:x1 + s] += 1
    resized = naive_bilinear(total / count, height, width)
    return resized.argmax(axis=0), resized


def test_predict_matches_naive_protocol_over_overlapping_windows() -> None:
    model = FakeModel()
    rng = np.random.default_rng(0)
    image = (rng.random((40, 56, 3)) * 255).astype(np.uint8)  # -> 32 x 45: two windows
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator()
                                                     .manual_seed(1)), dim=-1)
    prediction = predict(model, image, text, Protocol(window=32, threshold=0.5))
    want_labels, want_scores = naive_predict(model, image, text, 0.5)
    assert prediction.scores.shape == (6, 40, 56)
    assert np.allclose(prediction.scores.numpy(), want_scores, atol=1e-4)
    ordered = np.sort(want_scores, axis=0)
    clear = ordered[-1] - ordered[-2] > 1e-4
    assert np.array_equal(prediction.label_map.numpy()[clear], want_labels[clear])
    assert len(np.unique(prediction.label_map.numpy())) > 1
    assert prediction.region_map.max() >= 4  # the second window's regions are offset by L


# ---- class lists, datasets and diagnostics ------------------------------------------------------
def test_class_presets_hold_the_reference_lists(tmp_path: Path) -> None:
    voc = load_classes("voc")
    assert len(voc.names) == 20 and voc.threshold == 0.80
    assert {"table", "plant", "monitor"} <= set(voc.names)
    assert len(load_classes("context").names) == 59 and load_classes("context").threshold == 0.25
    coco = load_classes("coco-object")
    assert len(coco.names) == 80 and coco.threshold == 0.65 and coco.names[0] == "person"
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        load_classes(tmp_path / "empty.txt")
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"repeats \['cat'\]"):
        load_classes(tmp_path / "dup.txt")
    with pytest.raises(DataError, match="class list not found"):
        load_classes(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="not a VOC-layout folder"):
        VocDataset(tmp_path)


def test_grouping_oracle_labels_regions_by_majority() -> None:
    mask = np.array([[0, 0, 3, 3], [0, 255, 3, 3], [1, 1, 255, 0]], np.uint8)
    regions = np.array([[5, 5, 2, 2], [5, 9, 2, 2], [7, 5, 2, 5]])  # 9: only ignore pixels
    oracle = majority_labels(regions, mask, 4)
    assert oracle.tolist() == [[0, 0, 3, 3], [0, 0, 3, 3], [1, 0, 3, 0]]
    assert mean_iou(confusion_matrix(oracle, mask, 4)) == pytest.approx((4 / 5 + 1 / 2 + 1) / 3)
    assert mean_iou(confusion_matrix(majority_labels(mask, mask, 4), mask, 4)) == 1.0


def test_evaluate_a_checkpoint_on_a_generated_voc_set(synth_world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SegCLIP(ModelConfig.preset("tiny", **SMALL))
    save_checkpoint(model, tmp_path / "ckpt.pt", meta={"threshold": 0.4})
    data = synth_world / "eval"
    result = evaluate(tmp_path / "ckpt.pt", data, diagnostics=True, out=tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["miou"] == pytest.approx(result.miou) and 0.0 <= result.miou <= 1.0
    assert list(written["per_class"])[:2] == ["background", "red circle"]
    assert len(written["per_class"]) == 25 and written["threshold"] == 0.4
    masks = [read_mask(data / "SegmentationClass" / f"{i}.png") for i in VocDataset(data).ids]
    valid = np.concatenate([m[m != 255] for m in masks])
    present = len(set(valid.tolist()) - {0})
    baseline = (valid == 0).mean() / (1 + present)  # background IoU, every present class 0
    diag = written["diagnostics"]
    assert diag["all_background_miou"] == pytest.approx(baseline)
    assert 0 < diag["oracle_miou"] <= 1 and 1 <= diag["centers_per_image"] <= 4 * 4
    assert 0 <= diag["colour_accuracy"] <= 1 and diag["held_out_miou"] is not None
    assert not math.isnan(diag["seen_miou"])
    explicit = evaluate(tmp_path / "ckpt.pt", data, threshold=0.9, limit=2)
    assert explicit.threshold == 0.9 and explicit.num_images == 2
    with pytest.raises(DataError, match="not a bundle"):
        evaluate(tmp_path, data)


def test_bundle_evaluation_matches_the_checkpoint(synth_world: Path, tmp_path: Path) -> None:
    """With images of the window size (64 px) the runtime's fused assignment and the protocol
    here coincide (no resizing on either side), so the confusion matrices agree."""
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("segclip.export.bundle")
    torch.manual_seed(1)
    model = SegCLIP(ModelConfig.preset("tiny", **{**SMALL, "image_size": 64}))
    ckpt = save_checkpoint(model, tmp_path / "ckpt.pt")
    bundle = export.export_bundle(ckpt, tmp_path / "bundle")
    data = synth_world / "eval"
    from_ckpt = evaluate(ckpt, data, threshold=0.5)
    from_bundle = evaluate(bundle, data, threshold=0.5)
    assert from_bundle.threshold == 0.5 and from_bundle.num_images == from_ckpt.num_images
    differing = np.abs(from_bundle.confusion - from_ckpt.confusion).sum() / 2
    assert differing <= 0.002 * from_ckpt.confusion.sum(), differing
    assert from_bundle.miou == pytest.approx(from_ckpt.miou, abs=0.005)

"""The dense-bundle protocol (runtime/dense.py, runtime/pamr.py) against slow references: SCLIP's
slide inference, post-processing and PAMR written literally in PyTorch (the methods' code as
documented in docs/dense.md), and per-pixel loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segclip.runtime.dense import (
    DenseSettings,
    LogitMaps,
    assign_dense,
    class_text,
    crops,
    resized_size,
    split_names,
    upsample,
    window_average,
    window_origins,
)
from segclip.runtime.pamr import affinity, pamr

WINDOW, STRIDE, GRID, DIM = 32, 16, 4, 8


def _encoder(seed: int = 0):
    """(B, 3, 32, 32) -> (B, 16, 8): 8x8 average pools, a fixed linear map, L2-normalised."""
    proj = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)

    def encode(windows):
        b = windows.shape[0]
        pooled = windows.reshape(b, 3, GRID, 8, GRID, 8).mean((3, 5)).reshape(b, 3, GRID * GRID)
        emb = np.einsum("bcn,ce->bne", pooled, proj)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return encode


# ---- literal references (PyTorch) ------------------------------------------------------------
def _pamr_reference(image: torch.Tensor, mask: torch.Tensor, steps: int,
                    dilations=(8, 16)) -> torch.Tensor:
    """PAMR as in its authors' code: LocalAffinity(Abs/Copy/StDev) kernels + conv2d."""
    def kernels(kind):
        if kind == "std":
            w = torch.zeros(9, 1, 3, 3)
            for i in range(9):
                w[i, 0, i // 3, i % 3] = 1
            return w
        w = torch.zeros(8, 1, 3, 3)
        spots = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
        for i, (r, c) in enumerate(spots):
            if kind == "diff":
                w[i, 0, 1, 1] = 1
                w[i, 0, r, c] = -1
            else:  # copy
                w[i, 0, r, c] = 1
        return w

    def local(x, kind):
        b, k, h, w = x.shape
        x = x.reshape(b * k, 1, h, w)
        out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernels(kind), dilation=d)
               for d in dilations]
        return torch.cat(out, 1).reshape(b, k, -1, h, w)

    x_std = local(image, "std").std(2, keepdim=True)
    x = -local(image, "diff").abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(steps):
        mask = (local(mask, "copy") * x).sum(2)
    return mask


def _slide_reference(image: np.ndarray, encode, text: np.ndarray, out_hw, pamr_steps=0):
    """SCLIP's forward_slide: crops, bilinear per crop, F.pad into the canvas, count map,
    resize to the original size, PAMR on the resized image."""
    img = torch.from_numpy(image)[None]  # (1, 3, h, w)
    _, _, h, w = img.shape
    rows = max(h - WINDOW + STRIDE - 1, 0) // STRIDE + 1
    cols = max(w - WINDOW + STRIDE - 1, 0) // STRIDE + 1
    preds = torch.zeros(1, text.shape[0], h, w)
    count = torch.zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * STRIDE, c * STRIDE
            y2, x2 = min(y1 + WINDOW, h), min(x1 + WINDOW, w)
            y1, x1 = max(y2 - WINDOW, 0), max(x2 - WINDOW, 0)
            crop = img[:, :, y1:y2, x1:x2]
            feats = torch.from_numpy(encode(crop.numpy()))  # (1, N, E)
            logits = (feats @ torch.from_numpy(text).T).permute(0, 2, 1).reshape(
                1, -1, GRID, GRID)
            logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear")
            preds += F.pad(logits, (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    logits = F.interpolate(preds / count, size=out_hw, mode="bilinear")
    if pamr_steps:
        small = F.interpolate(img, size=out_hw, mode="bilinear")
        logits = _pamr_reference(small, logits, pamr_steps)
    return logits[0]


def _postprocess_reference(logits: torch.Tensor, query_idx: list[int], scale: float,
                           prob_thd: float, area_thd: float | None) -> np.ndarray:
    """SCLIP's postprocess_result: class 0 is the background line."""
    seg_logits = (logits * scale).softmax(0)
    query_idx = torch.tensor(query_idx)
    num_cls, num_queries = int(query_idx.max()) + 1, len(query_idx)
    if num_cls != num_queries:
        cls_index = F.one_hot(query_idx).T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits.unsqueeze(0) * cls_index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0].numpy()


# ---- the parts --------------------------------------------------------------------------------
def test_window_origins_and_resize():
    assert window_origins(336, 224, 112) == [0, 112]
    assert window_origins(400, 224, 112) == [0, 112, 176]
    assert window_origins(224, 224, 112) == [0]
    assert window_origins(100, 224, 112) == [0]
    assert resized_size(375, 500, 336) == (336, 448)  # int(500 * 336 / 375 + 0.5)
    assert resized_size(100, 1000, 336) == (205, 2048)  # the long side caps at 2048


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(0).standard_normal((3, 6, 6)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=(32, 40), mode="bilinear",
                         align_corners=False)[0].numpy()
    assert np.abs(upsample(x, 32, 40) - want).max() < 1e-5


@pytest.mark.parametrize("pamr_steps", [0, 2])
def test_logit_maps_match_sclip_slide(pamr_steps):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 50, 70)).astype(np.float32)
    text = rng.standard_normal((5, DIM)).astype(np.float32)
    encode = _encoder()
    windows, origins = crops(image, WINDOW, STRIDE)
    assert len(origins) == 3 * 4  # rows [0, 16, 18] x cols [0, 16, 32, 38]
    settings = DenseSettings(logit_scale=10.0, pamr_steps=pamr_steps, pamr_dilations=(8, 16))
    guide = upsample(image, 60, 90) if pamr_steps else None
    maps = LogitMaps(encode(windows), origins, text, (50, 70), (60, 90), WINDOW, settings,
                     guide)
    want = 10.0 * _slide_reference(image, encode, text, (60, 90), pamr_steps).numpy()
    for start, stop in ((0, 5), (0, 2), (2, 5)):  # chunks of names equal the whole
        diff = np.abs(maps(start, stop) - want[start:stop]).max()
        assert diff <= 1e-4 * np.abs(want).max()  # float32 rounding (guides differ by 1e-5)


def test_window_average_count_map_by_loops():
    rng = np.random.default_rng(2)
    patches = rng.standard_normal((4, GRID * GRID, DIM)).astype(np.float32)
    text = rng.standard_normal((2, DIM)).astype(np.float32)
    origins = [(0, 0), (0, 16), (8, 0), (8, 16)]
    got = window_average(patches, origins, text, (40, 48), WINDOW)
    total, count = np.zeros((2, 40, 48)), np.zeros((40, 48))
    for (y, x), emb in zip(origins, patches):
        up = upsample((emb @ text.T).T.reshape(2, GRID, GRID), WINDOW, WINDOW)
        for i in range(WINDOW):
            for j in range(WINDOW):
                total[:, y + i, x + j] += up[:, i, j]
                count[y + i, x + j] += 1
    assert count.min() == 1 and count.max() == 4
    assert np.abs(got - total / count).max() < 1e-5


def test_synonyms_background_names_and_templates():
    names, owner = split_names(["cat, kitty", "dog"], background=["sky", "wall"])
    assert names == ["cat", "kitty", "dog", "sky", "wall"]
    assert owner.tolist() == [0, 0, 1, -1, -1]
    with pytest.raises(ValueError, match="holds no name"):
        split_names(["cat", " , "])
    seen = []

    def embed(prompts):
        seen.extend(prompts)
        return np.stack([np.full(3, float(len(p))) + np.arange(3) for p in prompts])

    text = class_text(["a", "bb"], ["{}.", "a {} x"], embed)
    assert seen == ["a.", "a a x", "bb.", "a bb x"]
    e = np.array([[2.0, 3, 4], [5, 6, 7]])
    want = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    assert np.allclose(text[0], want / np.linalg.norm(want), atol=1e-6)


# ---- the decision -----------------------------------------------------------------------------
@pytest.mark.parametrize("area_thd", [None, 0.15])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_assign_matches_sclip_postprocess(area_thd, chunk):
    """Background names + synonyms, prob_thd and area_thd as SCLIP decides, streamed in chunks."""
    rng = np.random.default_rng(3)
    owner = np.array([0, 0, 1, 2, 2, 3, -1, -1])  # 4 classes, 2 background names
    logits = rng.standard_normal((8, 12, 15)).astype(np.float32) * 0.05
    logits[5] -= 0.15
    logits[5, :2, :2] += 0.4  # class 3 wins only a few pixels (dropped by area_thd)
    scale, prob_thd = 50.0, 0.3

    def maps(start, stop):
        return scale * logits[start:stop]
    labels, prob = assign_dense(maps, owner, 4, prob_thd, area_thd or 0.0, chunk)
    want = _postprocess_reference(torch.from_numpy(logits), (owner + 1).tolist(), scale,
                                  prob_thd, area_thd)
    assert (labels == want).all()
    assert 0 < (labels == 0).mean() < 1 and len(np.unique(labels)) >= 3
    if area_thd:
        assert 4 not in labels and (_postprocess_reference(
            torch.from_numpy(logits), (owner + 1).tolist(), scale, prob_thd, None) == 4).any()
    z = scale * logits.astype(np.float64)
    p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    assert np.allclose(prob[labels > 0], p.max(0)[labels > 0], atol=1e-5)


def test_assign_without_background_by_loops():
    rng = np.random.default_rng(4)
    owner = np.array([0, 1, 1, 2])
    logits = rng.standard_normal((4, 6, 7)).astype(np.float32) * 3
    labels, score = assign_dense(lambda a, b: logits[a:b], owner, 3, prob_thd=0.4, chunk=3)
    for i in range(6):
        for j in range(7):
            p = np.exp(logits[:, i, j] - logits[:, i, j].max())
            p /= p.sum()
            per = [max(p[t] for t in range(4) if owner[t] == k) for k in range(3)]
            k = int(np.argmax(per))
            assert abs(score[i, j] - per[k]) < 1e-6
            assert labels[i, j] == (0 if per[k] < 0.4 else k + 1)


def test_pamr_matches_reference_and_bands():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((3, 40, 30)).astype(np.float32)
    image[:, 10:25, 5:20] += 2.0  # an edge for the affinity to follow
    scores = rng.standard_normal((4, 40, 30)).astype(np.float32)
    want = _pamr_reference(torch.from_numpy(image)[None], torch.from_numpy(scores)[None], 3,
                           (2, 4))[0].numpy()
    full = pamr(image, scores, 3, (2, 4), band_pixels=10 ** 9)
    assert np.abs(full - want).max() < 1e-5
    banded = pamr(image, scores, 3, (2, 4), band_pixels=5 * 30)  # bands of 5 rows, halo 16
    assert np.abs(banded - full).max() < 1e-6
    weights = affinity(image, (2, 4))
    assert weights.shape == (16, 40, 30) and np.allclose(weights.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(pamr(image, scores, 0), scores)

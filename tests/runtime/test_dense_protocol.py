"""The dense-bundle protocol (runtime/dense.py) against slow references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from segclip.runtime.dense import (
    assign_dense,
    class_text,
    slide_logits,
    split_names,
    upsample,
    window_origins,
)


def test_window_origins():
    assert window_origins(336, 224, 112) == [0, 112]
    assert window_origins(400, 224, 112) == [0, 112, 176]
    assert window_origins(224, 224, 112) == [0]
    assert window_origins(100, 224, 112) == [0]


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(0).standard_normal((3, 6, 6)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x)[None], size=(32, 40), mode="bilinear",
                         align_corners=False)[0].numpy()
    assert np.abs(upsample(x, 32, 40) - want).max() < 1e-5


def test_slide_logits_matches_loop_reference():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 50, 70)).astype(np.float32)
    text = rng.standard_normal((4, 8)).astype(np.float32)
    proj = rng.standard_normal((3, 8)).astype(np.float32)

    def encode(crops):  # (B, 3, 32, 32) -> (B, 16, 8): 8x8 average pools, a linear map
        b = crops.shape[0]
        pooled = crops.reshape(b, 3, 4, 8, 4, 8).mean((3, 5)).reshape(b, 3, 16)
        emb = np.einsum("bcn,ce->bne", pooled, proj)
        return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

    got = slide_logits(image, encode, text, window=32, stride=16, scale=10.0)
    total = np.zeros((4, 50, 70))
    count = np.zeros((50, 70))
    for y in window_origins(50, 32, 16):
        for x in window_origins(70, 32, 16):
            emb = encode(image[None, :, y:y + 32, x:x + 32])[0]  # (16, 8)
            logits = torch.from_numpy(10.0 * (emb @ text.T).T.reshape(4, 4, 4))
            up = F.interpolate(logits[None], size=(32, 32), mode="bilinear",
                               align_corners=False)[0].numpy()
            for i in range(32):
                for j in range(32):
                    total[:, y + i, x + j] += up[:, i, j]
                    count[y + i, x + j] += 1
    assert count.min() == 1 and count.max() == 9  # origins [0, 16, 18] x [0, 16, 32, 38]
    assert np.abs(got - total / count).max() < 1e-4


def test_synonyms_templates_and_thresholds():
    names, owner = split_names(["cat, kitty", "dog", "sky, clouds"])
    assert names == ["cat", "kitty", "dog", "sky", "clouds"] and owner.tolist() == [0, 0, 1, 2, 2]
    seen = []

    def embed(prompts):
        seen.extend(prompts)
        return np.stack([np.full(3, float(len(p))) + np.arange(3) for p in prompts])

    text = class_text(["a", "bb"], ["{}.", "a {} x"], embed)
    assert seen == ["a.", "a a x", "bb.", "a bb x"]
    e = np.array([[2.0, 3, 4], [5, 6, 7]])
    want = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
    assert np.allclose(text[0], want / np.linalg.norm(want), atol=1e-6)

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 6, 7)).astype(np.float32) * 3
    labels, score = assign_dense(logits, owner, 3, prob_thd=0.4, background=(2,))
    for i in range(6):
        for j in range(7):
            p = np.exp(logits[:, i, j] - logits[:, i, j].max())
            p /= p.sum()
            per = [max(p[t] for t in range(5) if owner[t] == k) for k in range(3)]
            k = int(np.argmax(per))
            assert abs(score[i, j] - per[k]) < 1e-6
            want = 0 if per[k] < 0.4 or k == 2 else k + 1
            assert labels[i, j] == want

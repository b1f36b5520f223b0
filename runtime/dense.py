"""The inference protocol of dense bundles (the SCLIP-family protocol; docs/dense.md).

Pure numpy, torch-free:
- `window_origins`: 224 windows with stride 112 covering a side (the last one flush with the end);
- `slide_logits`: per window, patch logits s * <patch_emb, text> (T, g, g) bilinearly upsampled
  to the window, summed into a (T, H, W) canvas and divided by a count map of the windows
  covering each pixel;
- `class_text`: per class line, comma-separated synonyms; each name's embedding is the mean of
  its template embeddings, re-normalised;
- `assign_dense`: softmax over all names, max over each class's synonyms, argmax; a pixel whose
  winning probability is below `prob_thd` is background (0), and so is a pixel won by a class
  listed in `background`.

Legend: T names, K classes, E embedding width, g patch grid side, H x W image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from segclip.runtime._interp import blend, linear_taps


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` covering `size` (one window when size <= window)."""
    if size <= window:
        return [0]
    steps = -(-(size - window) // stride)  # ceil
    return [min(i * stride, size - window) for i in range(steps + 1)]


def upsample(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, g, g) -> (T, height, width) bilinear (half-pixel centres, as PyTorch)."""
    rows = blend(logits, linear_taps(height, logits.shape[1]), axis=1)
    return blend(rows, linear_taps(width, logits.shape[2]), axis=2)


def slide_logits(image: np.ndarray, encode: Callable[[np.ndarray], np.ndarray],
                 text: np.ndarray, window: int, stride: int, scale: float) -> np.ndarray:
    """(3, H, W) normalised image -> (T, H, W) window-averaged logits.

    `encode` maps (B, 3, window, window) to (B, g*g, E) L2-normalised patch embeddings.
    Images smaller than a window are padded with zeros at the bottom/right first.
    """
    _, height, width = image.shape
    ph, pw = max(height, window), max(width, window)
    padded = np.zeros((3, ph, pw), np.float32)
    padded[:, :height, :width] = image
    origins = [(y, x) for y in window_origins(ph, window, stride)
               for x in window_origins(pw, window, stride)]
    canvas = np.zeros((text.shape[0], ph, pw), np.float32)  # (T, H', W')
    count = np.zeros((ph, pw), np.float32)  # (H', W')
    crops = np.stack([padded[:, y:y + window, x:x + window] for y, x in origins])
    patches = encode(crops)  # (B, g*g, E)
    g = int(round(patches.shape[1] ** 0.5))
    for (y, x), emb in zip(origins, patches):
        logits = scale * (emb @ text.T).T.reshape(-1, g, g)  # (T, g, g)
        canvas[:, y:y + window, x:x + window] += upsample(logits, window, window)
        count[y:y + window, x:x + window] += 1.0
    return (canvas / count)[:, :height, :width]


def split_names(classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Class lines -> (every name, (T,) class index of each name); 'a, b' = synonyms."""
    names, owner = [], []
    for k, line in enumerate(classes):
        parts = [p.strip() for p in line.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"class line {k + 1} holds no name: {line!r}")
        names += parts
        owner += [k] * len(parts)
    return names, np.asarray(owner, np.int64)


def class_text(names: Sequence[str], templates: Sequence[str],
               embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(T, E): per name, the mean of its L2-normalised template embeddings, re-normalised."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = embed(prompts).reshape(len(names), len(templates), -1)  # (T, M, E)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=1)  # (T, E)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def assign_dense(logits: np.ndarray, owner: np.ndarray, classes: int, prob_thd: float = 0.0,
                 background: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) logits -> ((H, W) uint16 label map, 0 background, k+1 = class k;
    (H, W) float32 winning probability)."""
    z = logits - logits.max(axis=0, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=0, keepdims=True)  # (T, H, W)
    per_class = np.full((classes, *logits.shape[1:]), -1.0, np.float32)  # (K, H, W)
    for t, k in enumerate(owner):
        np.maximum(per_class[k], prob[t], out=per_class[k])
    best = per_class.argmax(axis=0)  # (H, W)
    score = np.take_along_axis(per_class, best[None], axis=0)[0]
    labels = (best + 1).astype(np.uint16)
    labels[score < prob_thd] = 0
    for k in background:
        labels[best == k] = 0
    return labels, score.astype(np.float32)

"""Label-assignment variants compared by bench/assign.py (docs/architecture.md "Label assignment").

Every variant maps one window's image-tower outputs and the label embeddings to an (H, W) uint16
label map; all compute the region scores P the same way (`segclip.runtime.assign.region_scores`)
and differ in step 3, the per-pixel part:

- `fused`: the runtime (`assign_pixels`): grid cells whose corners agree on one region are
  labelled at once, the others interpolate only the regions that can win there; equal to the
  per-pixel interpolate / argmax / look-up, and never an [L, H, W] array.
- `naive_regions`: upsample all L maps to [L, H, W] (separable bilinear, align_corners=False),
  argmax over L, look up.
- `naive_scores`: the official per-crop protocol: upsample to [L, H, W], one-hot of the argmax,
  score map [T, H, W] = P^T x one-hot, background channel where the best score < min(threshold,
  max P), argmax over the T + 1 channels.
- torch variants of the two naive ones for the GPU (`F.interpolate`).

Legend: L regions, T labels, D embedding width, h x w patch grid, H x W output pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segclip.runtime.assign import assign_pixels, region_labels, region_scores


@dataclass(frozen=True)
class Window:
    """One window's tower outputs and the label embeddings."""

    global_: np.ndarray  # (D,) L2-normalised
    regions: np.ndarray  # (L, D) L2-normalised
    assign: np.ndarray  # (L, h, w) soft assignment, softmax over L
    text: np.ndarray  # (T, D) L2-normalised
    logit_scale: float = 100.0
    top_k: int = 5
    threshold: float = 0.8


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_window(labels: int, regions: int = 8, grid: int = 14, dim: int = 512,
                pattern: str = "smooth", seed: int = 0) -> Window:
    """Synthetic outputs: `smooth` assignments are soft blobs around L random centres (regions
    with borders, like a trained model's); `random` ones are i.i.d. softmax logits (a border at
    almost every patch: the worst case for anything that exploits uniform areas)."""
    rng = np.random.default_rng(seed)
    if pattern == "smooth":
        yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32)  # (h, w) each
        centres = rng.uniform(0, grid, (regions, 2)).astype(np.float32)  # (L, 2)
        dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None,
                                                                                     None]) ** 2
        logits = -dist / (0.15 * grid ** 2) * 4 + 0.3 * rng.standard_normal(dist.shape)
    elif pattern == "random":
        logits = rng.standard_normal((regions, grid, grid))
    else:
        raise ValueError(f"pattern must be 'smooth' or 'random', got {pattern!r}")
    logits = logits.astype(np.float32)
    assign = np.exp(logits - logits.max(axis=0))
    assign /= assign.sum(axis=0)  # (L, h, w)
    text = _unit(rng, labels, dim)  # (T, D)
    # regions near a few labels, so that some regions clear the threshold
    picks = rng.integers(0, labels, regions)
    region_emb = text[picks] + 0.05 * _unit(rng, regions, dim)  # (L, D)
    region_emb /= np.linalg.norm(region_emb, axis=-1, keepdims=True)
    global_ = region_emb.mean(axis=0)
    global_ /= np.linalg.norm(global_)
    return Window(global_=global_, regions=region_emb, assign=assign.astype(np.float32),
                  text=text)


def scores_of(window: Window) -> np.ndarray:
    """(L, T) region scores P (steps 1 of every variant)."""
    return region_scores(window.regions, window.global_, window.text, window.logit_scale,
                         window.top_k)


def fused(window: Window, out_hw: Sequence[int]) -> np.ndarray:
    labels = region_labels(scores_of(window), window.threshold)  # (L,)
    return assign_pixels(window.assign, labels, out_hw)


def _axis_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch align_corners=False sampling: lower index, upper index, weight of the upper."""
    coords = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(coords).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (coords - lo).astype(np.float32)


def bilinear_upsample(maps: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """(L, h, w) -> (L, H, W) float32, equal to F.interpolate(bilinear, align_corners=False)."""
    height, width = out_hw
    lo, hi, frac = _axis_taps(height, maps.shape[1])
    rows = maps[:, lo, :] * (1 - frac)[None, :, None] + maps[:, hi, :] * frac[None, :, None]
    lo, hi, frac = _axis_taps(width, maps.shape[2])
    return rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac  # (L, H, W)


def naive_regions(window: Window, out_hw: Sequence[int]) -> np.ndarray:
    labels = region_labels(scores_of(window), window.threshold)  # (L,)
    upsampled = bilinear_upsample(window.assign, out_hw)  # (L, H, W)
    return labels[upsampled.argmax(axis=0)]  # (H, W)


def naive_scores(window: Window, out_hw: Sequence[int]) -> np.ndarray:
    scores = scores_of(window)  # (L, T)
    upsampled = bilinear_upsample(window.assign, out_hw)  # (L, H, W)
    onehot = (upsampled == upsampled.max(axis=0, keepdims=True)).astype(np.float32)  # (L, H, W)
    regions, height, width = onehot.shape
    score_map = (scores.T @ onehot.reshape(regions, -1)).reshape(-1, height, width)  # (T, H, W)
    cutoff = min(window.threshold, float(scores.max()))
    background = (score_map.max(axis=0) < cutoff).astype(np.float32)  # (H, W)
    channels = np.concatenate([background[None], score_map], axis=0)  # (T+1, H, W)
    return channels.argmax(axis=0).astype(np.uint16)  # (H, W)


# ---- torch (GPU) -------------------------------------------------------------------------------
def torch_inputs(window: Window, device: str) -> dict[str, Any]:
    import torch

    return {"assign": torch.from_numpy(window.assign).to(device),
            "scores": torch.from_numpy(scores_of(window)).to(device),
            "threshold": window.threshold}


def torch_naive_regions(inputs: dict[str, Any], out_hw: Sequence[int]) -> Any:
    import torch
    import torch.nn.functional as F

    scores = inputs["scores"]  # (L, T)
    best, label = scores.max(dim=1)  # (L,)
    labels = torch.where(best < min(inputs["threshold"], float(scores.max())), 0, label + 1)
    upsampled = F.interpolate(inputs["assign"][None], size=tuple(out_hw), mode="bilinear",
                              align_corners=False)[0]  # (L, H, W)
    return labels[upsampled.argmax(dim=0)]  # (H, W)


def torch_naive_scores(inputs: dict[str, Any], out_hw: Sequence[int]) -> Any:
    import torch
    import torch.nn.functional as F

    scores = inputs["scores"]  # (L, T)
    upsampled = F.interpolate(inputs["assign"][None], size=tuple(out_hw), mode="bilinear",
                              align_corners=False)[0]  # (L, H, W)
    onehot = (upsampled == upsampled.amax(dim=0, keepdim=True)).float()  # (L, H, W)
    score_map = torch.einsum("lt,lhw->thw", scores, onehot)  # (T, H, W)
    cutoff = min(inputs["threshold"], float(scores.max()))
    background = (score_map.amax(dim=0) < cutoff).float()  # (H, W)
    return torch.cat([background[None], score_map]).argmax(dim=0)  # (H, W)

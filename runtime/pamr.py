"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth 2020, as used by SCLIP and NACLIP;
docs/dense.md), in numpy and in bounded memory.

For an image x (K channels) and score maps m (C, H, W), with neighbour offsets
O = {(a d, b d) : a, b in {-1, 0, 1}, (a, b) != (0, 0), d in dilations} (8 per dilation) and
replicate padding at the image border:
  sigma_k(p)  = standard deviation (n - 1) of x_k over the 9 positions {(a d, b d)} of every
                dilation together (the centre once per dilation);
  w_o(p)      = softmax over o in O of  mean_k  -|x_k(p) - x_k(p + o)| / (1e-8 + 0.1 sigma_k(p));
  m'(p)       = sum_o w_o(p) m(p + o)                         repeated `steps` times.
The update is linear in m and per channel, so m is refined in chunks of channels, and in bands
of rows: a band carries `halo = (steps + 1) * max(dilations)` extra rows on each side, beyond
which a cut cannot reach in `steps` updates, so banded results equal the whole-image ones.

Legend: K image channels, C score channels, H x W pixels, P = 8 * len(dilations) neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DILATIONS = (8, 16)  # SCLIP's pamr_stride
BAND_PIXELS = 1 << 20  # pixels per band (core rows): bounds the (P, rows, W) affinity


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(..., H, W) -> (..., H, W) with out[..., i, j] = x[..., clip(i + dy), clip(j + dx)]."""
    h, w = x.shape[-2:]
    rows = np.clip(np.arange(h) + dy, 0, h - 1)
    cols = np.clip(np.arange(w) + dx, 0, w - 1)
    return x[..., rows, :][..., cols]


def _padded(x: np.ndarray, pad: int) -> np.ndarray:
    """(C, H, W) -> (C, H + 2 pad, W + 2 pad), border values repeated (replicate padding)."""
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(a * d, b * d) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1)
            if (a, b) != (0, 0)]


def affinity(image: np.ndarray, dilations: Sequence[int] = DILATIONS) -> np.ndarray:
    """(K, H, W) image -> (P, H, W) float32 neighbour weights w_o (module docstring)."""
    x = image.astype(np.float32)
    window = np.stack([_shift(x, a * d, b * d) for d in dilations
                       for a in (-1, 0, 1) for b in (-1, 0, 1)])  # (9 * len(d), K, H, W)
    sigma = window.std(axis=0, ddof=1)  # (K, H, W)
    logits = np.stack([-np.abs(x - _shift(x, dy, dx)) for dy, dx in _offsets(dilations)])
    logits = (logits / (1e-8 + 0.1 * sigma)).mean(axis=1)  # (P, H, W)
    logits -= logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=0, keepdims=True)


def _refine(weights: np.ndarray, scores: np.ndarray, offsets: list[tuple[int, int]],
            steps: int) -> np.ndarray:
    """`steps` updates m' = sum_o w_o m(. + o) on (C, H, W) scores (replicate padding)."""
    h, w = scores.shape[1:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    for _ in range(steps):
        padded = _padded(scores, pad)  # (C, H + 2 pad, W + 2 pad); views below, no copies
        out = np.zeros_like(scores)
        for weight, (dy, dx) in zip(weights, offsets):
            out += weight * padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]
        scores = out
    return scores


def pamr(image: np.ndarray, scores: np.ndarray, steps: int,
         dilations: Sequence[int] = DILATIONS, band_pixels: int = BAND_PIXELS) -> np.ndarray:
    """(K, H, W) image, (C, H, W) scores -> (C, H, W) float32 refined scores, computed in bands
    of about `band_pixels` pixels (module docstring)."""
    if steps < 0:
        raise ValueError(f"PAMR steps must be >= 0, got {steps}")
    scores = scores.astype(np.float32)
    if steps == 0:
        return scores
    height, width = scores.shape[1:]
    halo = (steps + 1) * max(dilations)
    rows = max(1, band_pixels // max(1, width))
    offsets = _offsets(dilations)
    out = np.empty_like(scores)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        weights = affinity(image[:, lo:hi], dilations)  # (P, rows + halos, W)
        refined = _refine(weights, scores[:, lo:hi], offsets, steps)
        out[:, top:bottom] = refined[:, top - lo:bottom - lo]
    return out

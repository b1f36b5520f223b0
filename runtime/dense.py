"""The inference protocol of dense bundles (the SCLIP-family protocol; docs/dense.md).

Pure numpy, torch-free. Per image:
1. `resized_size`: short side to `short_side` (336 for 224 windows), long side capped at
   `short_side * 2048 / 336` (mmcv's keep-ratio rule for scale (2048, 336));
2. `window_origins`: windows of the graph's side with stride `stride` (the last one flush with
   the end); the image graph gives each window's patch embeddings;
3. `LogitMaps`: per name t, the cosine similarity of every patch with the name's embedding,
   bilinearly upsampled to its window, summed over windows and divided by the count of windows
   covering each pixel; then resized bilinearly to the original image, optionally refined by
   PAMR (runtime/pamr.py) on the normalised image resized to the same size, and multiplied by
   the logit scale. Maps are made for a chunk of names at a time, never all T at once;
4. `assign_dense`: softmax over all names (background names included), a class's probability
   is the max over its synonyms, argmax over classes; with `area_thd`, a class whose pixels are
   at most `area_thd` of the pixels won by a non-background class is dropped and the argmax
   taken again over the others; a pixel whose winning probability is below `prob_thd`, or won by
   a background name, is background (0).

Text side: `split_names` (a class line "a, b" holds synonyms; background names are a class of
their own whose pixels are 0) and `class_text` (mean of a name's 80 template embeddings).

Fused assignment: the decision needs, per pixel, only the running max logit, its argmax and the
running sum of exponentials (the softmax denominator), so `assign_dense` streams over chunks of
names with (H, W) state and never holds [T, H, W]. `area_thd` needs the class areas of the first
argmax before the final decision: a second pass recomputes the chunks (the maps are not kept).
What cannot be avoided is computing every name's value at every pixel: the argmax of
interpolated logits is not the interpolation of window argmaxes.

Legend: T names, K classes, E embedding width, g patch grid side, S window side, H x W image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from segclip.runtime._interp import blend, linear_taps

LONG_OVER_SHORT = 2048 / 336  # mmcv Resize scale (2048, 336), keep_ratio
CHUNK_BYTES = 64 << 20  # float32 [chunk, H, W] maps per chunk


@dataclass(frozen=True)
class DenseSettings:
    """The decision rule of one call (defaults from the bundle or a preset)."""

    logit_scale: float = 50.0
    prob_thd: float = 0.0
    area_thd: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Keep-ratio size: short side `short_side`, long side at most short_side * 2048 / 336
    (mmcv rounding int(x * s + 0.5))."""
    scale = min(short_side / min(height, width),
                short_side * LONG_OVER_SHORT / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` covering `size` (one window when size <= window)."""
    if size <= window:
        return [0]
    steps = -(-(size - window) // stride)  # ceil
    return [min(i * stride, size - window) for i in range(steps + 1)]


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width) bilinear (half-pixel centres, as PyTorch)."""
    if maps.shape[1:] == (height, width):
        return maps
    rows = blend(maps, linear_taps(height, maps.shape[1]), axis=1)
    return blend(rows, linear_taps(width, maps.shape[2]), axis=2)


def crops(image: np.ndarray, window: int, stride: int,
          ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(3, h, w) normalised image -> ((n, 3, S, S) windows, their (y, x) origins); an image
    smaller than a window is padded with zeros at the bottom/right."""
    _, height, width = image.shape
    ph, pw = max(height, window), max(width, window)
    if (ph, pw) != (height, width):
        padded = np.zeros((3, ph, pw), np.float32)
        padded[:, :height, :width] = image
        image = padded
    origins = [(y, x) for y in window_origins(ph, window, stride)
               for x in window_origins(pw, window, stride)]
    return np.stack([image[:, y:y + window, x:x + window] for y, x in origins]), origins


def window_average(patches: np.ndarray, origins: Sequence[tuple[int, int]], text: np.ndarray,
                   size: tuple[int, int], window: int) -> np.ndarray:
    """(n, g*g, E) patch embeddings of the windows at `origins`, (C, E) names -> (C, h, w)
    cosine maps averaged over the windows covering each pixel (the canvas cropped to `size`)."""
    g = int(round(patches.shape[1] ** 0.5))
    ph = max(size[0], max(y for y, _ in origins) + window)
    pw = max(size[1], max(x for _, x in origins) + window)
    canvas = np.zeros((text.shape[0], ph, pw), np.float32)  # (C, h', w')
    count = np.zeros((ph, pw), np.float32)
    for (y, x), emb in zip(origins, patches):
        cos = (emb @ text.T).T.reshape(-1, g, g)  # (C, g, g)
        canvas[:, y:y + window, x:x + window] += upsample(cos, window, window)
        count[y:y + window, x:x + window] += 1.0
    return (canvas / count)[:, :size[0], :size[1]]


@dataclass
class LogitMaps:
    """Step 3 of the module docstring for one image: `maps(start, stop)` -> (C, H, W) scaled
    logits of names [start, stop), made on demand."""

    patches: np.ndarray  # (n, g*g, E)
    origins: list[tuple[int, int]]
    text: np.ndarray  # (T, E)
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]
    window: int
    settings: DenseSettings
    guide: np.ndarray | None = None  # (3, H, W) normalised image at the original size, PAMR

    def __call__(self, start: int, stop: int) -> np.ndarray:
        from segclip.runtime.pamr import pamr

        maps = window_average(self.patches, self.origins, self.text[start:stop],
                              self.resized_hw, self.window)  # (C, h, w)
        maps = upsample(maps, *self.original_hw)  # (C, H, W)
        if self.settings.pamr_steps > 0:
            maps = pamr(self.guide, maps, self.settings.pamr_steps, self.settings.pamr_dilations)
        return self.settings.logit_scale * maps


def split_names(classes: Sequence[str], background: Sequence[str] = (),
                ) -> tuple[list[str], np.ndarray]:
    """Class lines and background names -> (every name, (T,) owner: class index k for names of
    line k, -1 for background names); a line 'a, b' holds the synonyms a and b."""
    names, owner = [], []
    for k, line in enumerate(classes):
        parts = [p.strip() for p in line.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"class line {k + 1} holds no name: {line!r}")
        names += parts
        owner += [k] * len(parts)
    for name in background:
        if name.strip():
            names.append(name.strip())
            owner.append(-1)
    return names, np.asarray(owner, np.int64)


def class_text(names: Sequence[str], templates: Sequence[str],
               embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(T, E): per name, the mean of its L2-normalised template embeddings, re-normalised."""
    prompts = [t.format(n) for n in names for t in templates]
    emb = embed(prompts).reshape(len(names), len(templates), -1)  # (T, M, E)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=1)  # (T, E)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def chunk_size(pixels: int, budget: int = CHUNK_BYTES) -> int:
    """Names per chunk so that a float32 [chunk, H, W] map stays within `budget` bytes."""
    return max(1, budget // max(1, 4 * pixels))


def _best(maps: Callable[[int, int], np.ndarray], names: int, chunk: int,
          allowed: np.ndarray | None, want_sum: bool,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One streaming pass: per pixel the max logit over the allowed names, its first argmax,
    and (want_sum) the sum of exp(logit - max) over all names."""
    best = arg = peak = total = None
    for start in range(0, names, chunk):
        z = maps(start, min(names, start + chunk)).astype(np.float32)  # (C, H, W)
        if want_sum:  # online log-sum-exp: rescale the running sum to the new peak
            top = z.max(axis=0)
            new_peak = top if peak is None else np.maximum(peak, top)
            part = np.exp(z - new_peak).sum(axis=0)
            total = part if total is None else total * np.exp(peak - new_peak) + part
            peak = new_peak
        if allowed is not None:
            z = np.where(allowed[start:start + z.shape[0], None, None], z, -np.inf)
        top, where = z.max(axis=0), z.argmax(axis=0) + start
        if best is None:
            best, arg = top, where
        else:
            arg = np.where(top > best, where, arg)  # strict: the first maximum wins ties
            best = np.maximum(best, top)
    log_z = None if total is None else peak + np.log(total)
    return best, arg, log_z


def assign_dense(maps: Callable[[int, int], np.ndarray], owner: np.ndarray, classes: int,
                 prob_thd: float = 0.0, area_thd: float = 0.0, chunk: int = 16,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 of the module docstring, streamed over chunks of names.

    Args:
        maps: (start, stop) -> (C, H, W) scaled logits of names [start, stop).
        owner: (T,) class index of each name, -1 for background names.
    Returns:
        ((H, W) uint16 label map, 0 background and k + 1 = class k; (H, W) float32 winning
        probability, 0 where no class is left).
    """
    names = len(owner)
    if names <= chunk:  # one chunk: keep it for a second pass
        whole = maps(0, names)
        maps = lambda start, stop: whole[start:stop]  # noqa: E731
    best, arg, log_z = _best(maps, names, chunk, None, want_sum=True)
    winner = owner[arg]  # (H, W) class index, -1 background
    if area_thd > 0:
        areas = np.bincount(winner[winner >= 0], minlength=classes)  # (K,)
        dropped = areas <= area_thd * areas.sum()
        if dropped.any():
            allowed = (owner < 0) | ~dropped[np.maximum(owner, 0)]  # (T,)
            best, arg, _ = _best(maps, names, chunk, allowed, want_sum=False)
            winner = np.where(np.isfinite(best), owner[arg], -1)
    prob = np.where(np.isfinite(best), np.exp(best - log_z), 0.0).astype(np.float32)
    labels = np.where((winner < 0) | (prob < prob_thd), 0, winner + 1).astype(np.uint16)
    return labels, prob

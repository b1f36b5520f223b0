"""The official zero-shot segmentation protocol in PyTorch (docs/official-implementation.md §4;
docs/architecture.md
"Label
assignment").

Per image: resize the short side to S (bilinear), slide S x S windows with stride S (the last one
shifted back to fit), and per window
  1. G = scale * regions @ text^T; P_pre = softmax(G) over labels; keep the top-k labels of
     softmax(scale * global @ text^T), k = min(5, K), set the others to -inf;
     P = softmax(masked G) * P_pre;
  2. upsample the soft assignment bilinearly (align_corners=False) to S x S, argmax over regions
     per pixel; a pixel's foreground scores are its region's row of P;
  3. background channel = 1 where the best foreground score < min(threshold, max P), else 0.
Overlapping windows are averaged; the (1+K) score maps are resized bilinearly to the original
size and the label is their argmax (0 background, k = class k).

Legend: L regions, E embedding width, K labels, S window side, H/W pixels, h/w patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segclip.runtime.contract import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_TEMPLATE,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
)


@dataclass(frozen=True)
class Protocol:
    window: int  # S: short side, window side and stride (the model's image size)
    threshold: float = DEFAULT_THRESHOLD  # background threshold (VOC 0.80, Context 0.25, ...)
    top_k: int = DEFAULT_TOP_K  # labels kept by the global similarity
    template: str = DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Prediction:
    scores: torch.Tensor  # (1+K, H, W) averaged, resized score maps; channel 0 = background
    label_map: torch.Tensor  # (H, W) int64 argmax of `scores`
    region_map: torch.Tensor  # (H, W) int64 region id, window index * L + region (nearest)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Keep-ratio size with the short side = `short_side` (mmcv rounding: int(x * s + 0.5))."""
    scale = short_side / min(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: np.ndarray, short_side: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H', W') float32, short side resized, CLIP-normalised."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    size = resized_shape(pixels.shape[1], pixels.shape[2], short_side)
    if size != tuple(pixels.shape[1:]):
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear",
                               align_corners=False)[0]  # (3, H', W')
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return (pixels - mean) / std


def window_boxes(height: int, width: int, size: int, stride: int,
                 ) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's slide windows; the last row/column is shifted back to fit."""
    rows = max(height - size + stride - 1, 0) // stride + 1
    cols = max(width - size + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + size, height), min(c * stride + size, width)
            boxes.append((max(y2 - size, 0), y2, max(x2 - size, 0), x2))
    return boxes


def label_scores(regions: torch.Tensor, global_embedding: torch.Tensor, text: torch.Tensor,
                 scale: float, top_k: int = DEFAULT_TOP_K) -> torch.Tensor:
    """Step 1: (L, K) scores P = softmax(top-k-masked G) * softmax(G).

    Args:
        regions: (L, E), global_embedding: (E,), text: (K, E), all L2-normalised.
        scale: the contrastive multiplier (exp of the logit scale, clamped).
    """
    logits = scale * regions @ text.t()  # (L, K)
    pre = logits.softmax(dim=-1)  # (L, K)
    global_logits = scale * global_embedding @ text.t()  # (K,)
    keep = global_logits.topk(min(top_k, text.shape[0])).indices  # (k,)
    mask = torch.full_like(global_logits, float("-inf")).index_fill(0, keep, 0.0)  # (K,)
    return (logits + mask).softmax(dim=-1) * pre  # (L, K)


def window_scores(assign: torch.Tensor, scores: torch.Tensor, size: tuple[int, int],
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 for one window: ((1+K, S, S) score maps, (S, S) region index per pixel).

    Args:
        assign: (L, h, w) soft assignment. scores: (L, K) from `label_scores`.
    """
    upsampled = F.interpolate(assign[None].float(), size=size, mode="bilinear",
                              align_corners=False)[0]  # (L, S, S)
    region = upsampled.argmax(dim=0)  # (S, S) first maximum on ties
    foreground = scores[region].permute(2, 0, 1)  # (K, S, S)
    cut = min(threshold, float(scores.max()))
    background = (foreground.amax(dim=0) < cut).to(scores.dtype)  # (S, S)
    return torch.cat([background[None], foreground], dim=0), region


@torch.no_grad()
def encode_labels(model: torch.nn.Module, names: Sequence[str],
                  template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """(K, E) L2-normalised text embeddings of the prompts `template.format(name)`."""
    from segclip.text import tokenize

    device = next(model.parameters()).device
    tokens = tokenize([template.format(name) for name in names],
                      context_length=model.config.context_length).to(device)
    return model.encode_text(tokens)


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, text: torch.Tensor,
            protocol: Protocol) -> Prediction:
    """Segment one (H, W, 3) uint8 RGB image with the (K, E) label embeddings `text`."""
    device = text.device
    height, width = image.shape[:2]
    pixels = preprocess(image, protocol.window).to(device)  # (3, H', W')
    h, w = pixels.shape[1:]
    s = protocol.window
    boxes = window_boxes(h, w, s, s)
    crops = torch.stack([pixels[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n, 3, S, S)
    out = model.encode_image(crops)
    scale = float(model.scale())
    total = torch.zeros(1 + text.shape[0], h, w, device=device)  # (1+K, H', W')
    count = torch.zeros(1, h, w, device=device)
    regions = torch.zeros(h, w, dtype=torch.long, device=device)  # (H', W')
    n_regions = out.regions.shape[1]
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        scores = label_scores(out.regions[i].float(), out.global_embedding[i].float(), text,
                              scale, protocol.top_k)  # (L, K)
        maps, region = window_scores(out.assign[i], scores, (s, s), protocol.threshold)
        total[:, y1:y2, x1:x2] += maps
        count[:, y1:y2, x1:x2] += 1
        regions[y1:y2, x1:x2] = region + i * n_regions
    averaged = total / count  # (1+K, H', W')
    scores = F.interpolate(averaged[None], size=(height, width), mode="bilinear",
                           align_corners=False)[0]  # (1+K, H, W)
    region_map = F.interpolate(regions[None, None].float(), size=(height, width),
                               mode="nearest")[0, 0].long()  # (H, W)
    return Prediction(scores.cpu(), scores.argmax(dim=0).cpu(), region_map.cpu())

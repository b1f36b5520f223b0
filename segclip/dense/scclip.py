"""The SC-CLIP token path (Bai et al. 2024, "Self-Calibrated CLIP for Training-Free
Open-Vocabulary Segmentation"; docs/dense.md), per image and in export-friendly ops.

Blocks are numbered 1..L (L = 12 for ViT-B/16); X_b is the output of block b, (B, 1+N, D).
1. Anomaly tokens: LOF (20 neighbours) of the patch tokens of X_{L-1}; the 10 highest are
   flagged with TopK (segclip/dense/outliers.py).
2. Repair: R(X) replaces the flagged patch tokens of X by the mean of their unflagged
   8-neighbours; applied to every X used below (CLS untouched).
3. Self-adjusting: the last block attends with 1/2 (softmax(s k kᵀ) + softmax(s g gᵀ)), g the
   keys of R(X_9) under the last block's own ln_1 and in-projection (the mid-layer affinity);
   no residual, no FFN (segclip/dense/attention.py, mode "scclip").
4. Multi-level fusion: Y = B*(R(X_11)) + mean_{b=4..10} B*(R(X_b)) (segclip/dense/fusion.py),
   then `ln_post` and `proj` as for the other modes.
Block numbers are for 12-block towers; other depths use round(b * L / 12).
The official code handles one image at a time (sklearn LOF on the host); here every step is a
batched tensor op with no statistic shared across images.

Legend: B batch, N = h*w patches, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from segclip.dense.attention import guide_keys, last_block
from segclip.dense.fusion import fuse_levels
from segclip.dense.outliers import repair


@dataclass(frozen=True)
class ScclipLayers:
    """1-based block numbers of the SC-CLIP steps for a tower of `depth` blocks."""

    outlier: int  # main path and anomaly search: the input of the last block
    affinity: int  # guide of the self-adjusting attention
    fusion: tuple[int, ...]  # intermediate levels fused with the main path

    @classmethod
    def for_depth(cls, depth: int) -> ScclipLayers:
        if depth < 4:
            raise ValueError(f"SC-CLIP needs a tower of at least 4 blocks, got {depth}")

        def at(b: int) -> int:
            return max(1, min(depth - 1, round(b * depth / 12)))
        low, high = at(4), at(10)
        return cls(outlier=depth - 1, affinity=at(9),
                   fusion=tuple(range(low, max(low, high) + 1)))


def scclip_tokens(blocks: nn.ModuleList, x: torch.Tensor, layers: ScclipLayers,
                  neighbours: torch.Tensor, anomalies: nn.Module) -> torch.Tensor:
    """(B, 1+N, D) tokens after ln_pre -> (B, 1+N, D) fused last-block output (module
    docstring); `neighbours` is `neighbour_matrix(h, w)`, `anomalies` an `AnomalyMask`."""
    kept = {}
    for number, block in enumerate(blocks[:-1], start=1):
        x = block(x)
        kept[number] = x  # X_number
    main = kept[layers.outlier]  # (B, 1+N, D)
    mask = anomalies(main[:, 1:])  # (B, N)

    def fixed(tokens: torch.Tensor) -> torch.Tensor:  # R(X): (B, 1+N, D)
        return torch.cat([tokens[:, :1], repair(tokens[:, 1:], mask, neighbours)], dim=1)

    last = blocks[-1]
    guide = guide_keys(last, fixed(kept[layers.affinity]))  # (B, H, 1+N, d)
    out = last_block(last, fixed(main), "scclip", guide=guide)  # (B, 1+N, D)
    levels = [last_block(last, fixed(kept[b]), "scclip", guide=guide) for b in layers.fusion]
    return fuse_levels(out, levels)

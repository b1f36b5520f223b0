"""Convolutional patch stems: the `patch_stem` alternatives to ViT's linear patch embedding.

"conv": log2(P) stages of 3x3 conv -> ReLU -> 2x2 max-pool, then a 1x1 conv to the tower width:
the same (B, D, H/P, W/P) grid as `visual.conv1`, but every token sees a ~2P-pixel neighbourhood
through nonlinear filters. "hybrid": the linear patch embedding plus that CNN, whose last conv
starts at zero, so training starts from the plain ViT and adds the CNN's features as they help.
From-scratch towers on small data learn shape this way (docs/synthetic-world.md, "Patch stem");
CLIP weights always use the linear stem.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STEM_CHANNELS = (32, 64)  # first stage, then every later stage


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, D, H // P, W // P) for P = patch_size, a power of two."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in = 3
        for stage in range(int(math.log2(patch_size))):
            channels = STEM_CHANNELS[min(stage, 1)]
            layers += [nn.Conv2d(channels_in, channels, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels_in = channels
        self.stages = nn.Sequential(*layers)
        self.project = nn.Conv2d(channels_in, width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(images))  # (B, D, h, w)


class HybridStem(nn.Module):
    """Linear patch embedding + a zero-initialised `ConvStem`: (B, 3, H, W) -> (B, D, h, w)."""

    def __init__(self, linear: nn.Conv2d, width: int, patch_size: int) -> None:
        super().__init__()
        self.linear = linear
        self.conv = ConvStem(width, patch_size)
        nn.init.zeros_(self.conv.project.weight)
        nn.init.zeros_(self.conv.project.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images) + self.conv(images)  # (B, D, h, w)

"""Export-only wrappers over the eager model: the graph I/O of the bundle contract.

They call the model's own `encode_image` / `encode_text`, so the exported graphs are the eager
inference path (`onnx_graph` traces the transformer blocks as their `LeanBlock` equivalents,
export/blocks.py): hard assignment by argmax written as `x == max(x)` (no scatter, no OneHot), no
Gumbel noise, patch grid taken from the conv output shape. The wrapped model must be in eval mode;
the wrappers refuse a training-mode model because its forward would sample Gumbel noise.

Legend: B batch, L regions, h x w patch grid, E embedding width, T labels, C context length.
"""

from __future__ import annotations

import torch
from torch import nn

from segclip.model import SegCLIP


class ImageEncoderOnnx(nn.Module):
    """`image` (B, 3, S, S) float32 -> `global` (B, E), `regions` (B, L, E),
    `assign` (B, L, h, w)."""

    def __init__(self, model: SegCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.model.training:
            raise RuntimeError("ImageEncoderOnnx needs the model in eval mode (no Gumbel noise)")
        out = self.model.encode_image(image)
        return out.global_embedding, out.regions, out.assign


class TextEncoderOnnx(nn.Module):
    """`tokens` (T, C) int64 -> `text` (T, E) float32, L2-normalised, taken at the EOT token."""

    def __init__(self, model: SegCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)

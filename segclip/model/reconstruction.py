"""Reconstruction branch (paper §2.3, eq. 4; docs/official-implementation.md §2.3), used in
training only.

A second pass of the image encoder sees only the visible patches (mask ratio 0.75). The paper's
reconstruction layer turns the region tokens back into per-patch tokens through a learned mix of
each patch's one-hot assignment row, fresh transformer blocks refine them, and an MAE decoder
(He et al. 2022) predicts the CLIP-normalised pixels of every patch; the loss is the MSE on the
masked patches.

Legend: B batch, N patches, n visible patches, L regions, D width, E decoder width, P = p*p*3.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock
from torch import nn


class PatchMask(NamedTuple):
    keep: torch.Tensor  # (B, n) indices of the visible patches
    restore: torch.Tensor  # (B, N) inverse permutation of the shuffle
    masked: torch.Tensor  # (B, N) 1.0 where a patch is hidden


def random_patch_mask(batch: int, num_patches: int, num_visible: int, device: torch.device,
                      generator: torch.Generator | None = None) -> PatchMask:
    """MAE random masking (per-sample shuffle); the CLS token is always kept by the caller."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, N)
    shuffle = noise.argsort(dim=1)  # (B, N)
    restore = shuffle.argsort(dim=1)  # (B, N)
    masked = torch.ones(batch, num_patches, device=device)
    masked[:, :num_visible] = 0
    masked = masked.gather(1, restore)  # (B, N) back in patch order
    return PatchMask(shuffle[:, :num_visible], restore, masked)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches row-major, each in (row, column, channel) order."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)  # (B, 3, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, 3)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


class MaeDecoder(nn.Module):
    """MAE decoder: embed, insert mask tokens, fixed 2D sin-cos positions, blocks, predict."""

    def __init__(self, width: int, decoder_width: int, layers: int, heads: int, grid: int,
                 patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = get_2d_sincos_pos_embed(decoder_width, grid, cls_token=True)  # (N+1, E)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0))
        norm = partial(LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([
            ResidualAttentionBlock(decoder_width, heads, 4.0, act_layer=nn.GELU, norm_layer=norm)
            for _ in range(layers)
        ])
        self.norm = norm(decoder_width)
        self.pred = nn.Linear(decoder_width, patch_dim)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+n, D) tokens (CLS first) -> (B, N, P) predictions for every patch."""
        x = self.embed(tokens)  # (B, 1+n, E)
        b, n_vis, e = x.shape[0], x.shape[1] - 1, x.shape[2]
        n_all = restore.shape[1]
        fill = self.mask_token.expand(b, n_all - n_vis, e)  # (B, N-n, E)
        patches = torch.cat([x[:, 1:], fill], dim=1)  # (B, N, E) in shuffled order
        patches = patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, e))  # (B, N, E)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # (B, 1+N, E)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # (B, N, P)


class Reconstruction(nn.Module):
    """Eq. 4 reconstruction layer, fresh blocks and the MAE decoder."""

    def __init__(self, width: int, heads: int, num_centers: int, layers: int,
                 decoder_width: int, decoder_layers: int, decoder_heads: int, grid: int,
                 patch_size: int) -> None:
        super().__init__()
        self.mix = nn.Linear(num_centers, num_centers)
        self.act = QuickGELU()
        self.blocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, 4.0, act_layer=QuickGELU) for _ in range(layers)
        ])
        self.decoder = MaeDecoder(width, decoder_width, decoder_layers, decoder_heads, grid,
                                  patch_size * patch_size * 3)

    def forward(self, regions: torch.Tensor, hard: torch.Tensor,
                restore: torch.Tensor) -> torch.Tensor:
        """Predict all patches from the masked pass.

        Args:
            regions: (B, L, D) region tokens of the visible patches.
            hard: (B, L, n) their assignment, one-hot over L.
            restore: (B, N) inverse shuffle of the mask.
        Returns:
            (B, N, p*p*3) predicted normalised pixels.
        """
        weights = self.mix(hard.transpose(1, 2))  # (B, n, L)
        tokens = self.act(weights @ regions)  # (B, n, D)
        for block in self.blocks:
            tokens = block(tokens)
        cls = tokens.mean(dim=1, keepdim=True)  # (B, 1, D)
        return self.decoder(torch.cat([cls, tokens], dim=1), restore)

"""Semantic group module (paper §2.2, eqs. 1-3; docs/official-implementation.md §1.2).

Learnable centers attend to the patches through cross-attention layers (keys = [centers; patches]),
each patch is assigned to one center by a softmax over centers of unscaled mapping logits (Gumbel
noise + straight-through hard one-hot in training, plain argmax in eval/export), and each region
is the exact mean of its patches, added to its contextual center and passed through LN -> MLP ->
QuickGELU.

Legend: B batch, N patches, L centers (regions), D width, G attention heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock
from torch import nn


class GroupOutput(NamedTuple):
    regions: torch.Tensor  # (B, L, D) region tokens
    hard: torch.Tensor  # (B, L, N) one-hot over L per patch (straight-through in training)
    soft: torch.Tensor  # (B, L, N) softmax over L of the mapping logits (no noise, no tau)
    logits: torch.Tensor  # (B, L, N) mapping logits


def hard_assign(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """One-hot of the argmax along `dim`, written as `x == max(x)` (no scatter, no OneHot op)."""
    return (logits == logits.amax(dim=dim, keepdim=True)).to(logits.dtype)


def gumbel_assign(logits: torch.Tensor, tau: float, dim: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard Gumbel-softmax with a straight-through gradient (Jang et al. 2017)."""
    exponential = torch.empty_like(logits).exponential_(generator=generator)  # Exp(1)
    gumbels = -exponential.log()  # Gumbel(0, 1), as in F.gumbel_softmax
    soft = torch.softmax((logits + gumbels) / tau, dim=dim)
    return hard_assign(soft, dim) - soft.detach() + soft


def straight_through_argmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Eval-mode assignment of the official code: one-hot argmax of softmax(logits), ST gradient."""
    soft = torch.softmax(logits, dim=dim)
    return hard_assign(soft, dim) - soft.detach() + soft


def mean_pool(hard: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """MEAN(M^T H) of eq. 3: each center's exact mean of its assigned values (0 when empty).

    Args:
        hard: (B, L, N) assignment, one-hot over L.
        values: (B, N, D) patch values.
    Returns:
        (B, L, D) region means.
    """
    sums = hard @ values  # (B, L, D)
    counts = hard.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (B, L, 1)
    return sums / counts


class GroupedProjection(nn.Module):
    """A bias-free grouped 1x1 convolution over tokens (the official `k_conv` / `v_conv`)."""

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=1, groups=groups, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return self.conv(tokens.transpose(1, 2)).transpose(1, 2)


class RegionMlp(nn.Module):
    """`proj_o`: LN -> Linear -> exact GELU -> Linear -> QuickGELU, no residual."""

    def __init__(self, width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln = LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = QuickGELU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(F.gelu(self.fc1(self.ln(tokens)))))


class SemanticGroup(nn.Module):
    """Gathers N patch tokens into L region tokens with learnable centers."""

    def __init__(self, width: int, heads: int, num_centers: int, cross_layers: int,
                 mlp_ratio: float = 4.0, gumbel_tau: float = 0.9,
                 mapping_scale: float = 1.0) -> None:
        super().__init__()
        self.gumbel_tau = gumbel_tau
        self.mapping_scale = mapping_scale
        self.centers = nn.Parameter(torch.empty(num_centers, width))
        nn.init.trunc_normal_(self.centers, std=0.02)
        self.norm = LayerNorm(width)
        self.cross_blocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer=QuickGELU,
                                   is_cross_attention=True, batch_first=True)
            for _ in range(cross_layers)
        ])
        self.ln_query = LayerNorm(width)
        self.key_proj = GroupedProjection(width, heads)
        self.key_ln = LayerNorm(width)
        self.value_proj = GroupedProjection(width, heads)
        self.out_mlp = RegionMlp(width, mlp_ratio)

    def contextual_centers(self, patches: torch.Tensor) -> torch.Tensor:
        """Eq. 1: centers refined by cross-attention to [centers; raw patches], per sample."""
        queries = self.centers.unsqueeze(0).expand(patches.shape[0], -1, -1)  # (B, L, D)
        for block in self.cross_blocks:
            keys = torch.cat([queries, patches], dim=1)  # (B, L+N, D)
            queries = block(queries, keys, keys)  # (B, L, D)
        return self.ln_query(queries)

    def mapping_logits(self, centers: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Eq. 2 logits: full-width dot products, unscaled (times `mapping_scale`)."""
        keys = self.key_ln(self.key_proj(self.norm(patches)))  # (B, N, D)
        return self.mapping_scale * (centers @ keys.transpose(1, 2))  # (B, L, N)

    def forward(self, patches: torch.Tensor, sample: bool | None = None,
                generator: torch.Generator | None = None,
                keys: torch.Tensor | None = None) -> GroupOutput:
        """Group (B, N, D) patches; `sample` defaults to `self.training` (Gumbel noise).

        `keys`: (B, N, D) tokens the mapping logits read instead of `patches` (an earlier
        block's, ModelConfig.assign_layer); region values are always `patches`."""
        sample = self.training if sample is None else sample
        centers = self.contextual_centers(patches)  # (B, L, D)
        logits = self.mapping_logits(centers, patches if keys is None else keys)  # (B, L, N)
        if sample:
            hard = gumbel_assign(logits, self.gumbel_tau, dim=1, generator=generator)
        else:
            hard = straight_through_argmax(logits, dim=1)
        soft = torch.softmax(logits, dim=1)  # (B, L, N)
        values = self.value_proj(self.norm(patches))  # (B, N, D)
        regions = self.out_mlp(centers + mean_pool(hard, values))  # (B, L, D)
        return GroupOutput(regions, hard, soft, logits)

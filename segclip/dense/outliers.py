"""Anomaly tokens of a CLIP ViT and their repair from grid neighbours (SC-CLIP's first step;
docs/dense.md).

- `local_outlier_factor`: LOF (Breunig et al. 2000) of each patch token among the patch tokens
  of the same image, Euclidean distance, k nearest neighbours (self excluded):
  k-dist(j) = distance to j's k-th neighbour; reach(i, j) = max(k-dist(j), d(i, j));
  lrd(i) = 1 / (mean_{j in kNN(i)} reach(i, j) + 1e-10);
  LOF(i) = mean_{j in kNN(i)} lrd(j) / lrd(i).
  The same definition as scikit-learn's `LocalOutlierFactor` (the tests compare with it).
- `top_mask`: the `count` highest scores of each image (TopK; ties at the k-th value kept).
- `repair`: each flagged token replaced by the mean of its unflagged 8-neighbours on the h x w
  grid (kept as it is when all of them are flagged).

Every function works per image on a batch (no statistics across the batch) with ops that export
to ONNX (MatMul, TopK, GatherElements, Where). Legend: B batch, N = h*w patches, D width.
"""

from __future__ import annotations

import torch
from torch import nn

LOF_NEIGHBOURS = 20  # scikit-learn's default n_neighbors
ANOMALIES = 10  # tokens repaired per image


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) Euclidean distances (Gram form, clamped at 0 before the root)."""
    sq = (x * x).sum(-1)  # (B, N)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * x @ x.transpose(1, 2)  # (B, N, N)
    return torch.sqrt(torch.clamp(d2, min=0.0))


def local_outlier_factor(x: torch.Tensor, k: int = LOF_NEIGHBOURS) -> torch.Tensor:
    """(B, N, D) tokens -> (B, N) LOF scores (module docstring); needs N > k."""
    n = x.shape[1]
    if n <= k:
        raise ValueError(f"LOF with {k} neighbours needs more than {k} tokens, got {n}")
    d = pairwise_distances(x)  # (B, N, N)
    far = d.amax(dim=(1, 2), keepdim=True) + 1.0  # (B, 1, 1): larger than any distance
    d_self_far = d + torch.eye(n, dtype=x.dtype, device=x.device) * far  # self never a neighbour
    near, index = torch.topk(d_self_far, k, dim=-1, largest=False)  # (B, N, k) ascending
    k_dist = near[:, :, -1]  # (B, N)
    k_dist_of_neighbours = torch.gather(k_dist[:, None, :].expand(-1, n, -1), 2, index)  # (B,N,k)
    reach = torch.maximum(k_dist_of_neighbours, near)  # (B, N, k)
    lrd = 1.0 / (reach.mean(-1) + 1e-10)  # (B, N)
    lrd_of_neighbours = torch.gather(lrd[:, None, :].expand(-1, n, -1), 2, index)  # (B, N, k)
    return lrd_of_neighbours.mean(-1) / lrd  # (B, N)


def top_mask(scores: torch.Tensor, count: int = ANOMALIES) -> torch.Tensor:
    """(B, N) scores -> (B, N) float 1.0 on each image's `count` highest scores, else 0.0."""
    kth = torch.topk(scores, count, dim=-1).values[:, -1:]  # (B, 1)
    return (scores >= kth).to(scores.dtype)


def neighbour_matrix(h: int, w: int) -> torch.Tensor:
    """(N, N) float 1.0 where patches i != j are 8-neighbours on the h x w grid (row-major)."""
    rows = torch.arange(h).repeat_interleave(w)  # (N,)
    cols = torch.arange(w).repeat(h)  # (N,)
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    return ((dr <= 1) & (dc <= 1) & ((dr + dc) > 0)).float()


def repair(x: torch.Tensor, mask: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """(B, N, D) patch tokens, (B, N) anomaly mask, (N, N) `neighbour_matrix` -> (B, N, D) with
    each flagged token the mean of its unflagged neighbours (unchanged if it has none)."""
    weights = neighbours.to(x.dtype)[None] * (1.0 - mask)[:, None, :]  # (B, N, N)
    total = weights.sum(-1, keepdim=True)  # (B, N, 1)
    mean = (weights @ x) / torch.clamp(total, min=1.0)  # (B, N, D)
    replace = (mask[:, :, None] > 0.5) & (total > 0)  # (B, N, 1)
    return torch.where(replace, mean, x)


class AnomalyMask(nn.Module):
    """(B, N, D) patch tokens -> (B, N) mask of each image's `count` highest-LOF tokens.

    A module so that its nodes carry the name scope `/outliers/` in the exported graph (the
    fp16 export keeps them float32: fp16 distances flip which tokens are flagged)."""

    def __init__(self, k: int = LOF_NEIGHBOURS, count: int = ANOMALIES) -> None:
        super().__init__()
        self.k, self.count = k, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return top_mask(local_outlier_factor(x, self.k), self.count)

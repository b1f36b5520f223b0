"""Training losses (paper §2.1, §2.3, §2.4; docs/official-implementation.md §2): contrastive, MAE,
superpixel KL; and the names losses of from-scratch training (segclip/training/names.py).

Legend: B batch, N patches, L regions, D embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather (B, D) features across ranks keeping gradients; returns (all, offset of ours)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    gathered = torch.cat(all_gather(features), dim=0)  # (world*B, D)
    return gathered, dist.get_rank() * features.shape[0]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised (B, D) image and text features; `logit_scale` is the
    multiplier itself (already clamped). Local rows against the features of all ranks."""
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    labels = torch.arange(image.shape[0], device=image.device) + offset  # (B,)
    logits_per_image = logit_scale * image @ all_text.t()  # (B, world*B)
    logits_per_text = logit_scale * text @ all_image.t()  # (B, world*B)
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        masked: torch.Tensor) -> torch.Tensor:
    """MSE averaged per patch, then over the masked patches only.

    Args:
        pred, target: (B, N, P) predicted and true normalised pixels per patch.
        masked: (B, N) 1.0 for hidden patches.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


def superpixel_mean_assignment(hard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean assignment over each patch's super-patch (eq. 5 before the softmax).

    Args:
        hard: (B, N, L) per-patch assignment rows.
        labels: (B, N) integer super-patch labels.
    Returns:
        (B, N, L) the mean row over the patches sharing each patch's label.
    """
    same = (labels.unsqueeze(2) == labels.unsqueeze(1)).to(hard.dtype)  # (B, N, N)
    return (same @ hard) / same.sum(dim=-1, keepdim=True)  # (B, N, L)


def superpixel_kl_loss(hard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between each patch's assignment and its super-patch mean (eqs. 5-6).

    As in the official code the softmax is applied to the one-hot / averaged rows as if they were
    logits, nothing is detached, and each KL sum is divided by B*N*L.
    """
    mean = superpixel_mean_assignment(hard, labels)  # (B, N, L)
    log_p = F.log_softmax(hard, dim=-1)  # (B, N, L)
    log_m = F.log_softmax(mean, dim=-1)  # (B, N, L)
    norm = hard.numel()
    kl_m_p = F.kl_div(log_p, log_m, reduction="sum", log_target=True) / norm  # KL(m || p)
    kl_p_m = F.kl_div(log_m, log_p, reduction="sum", log_target=True) / norm  # KL(p || m)
    return (kl_m_p + kl_p_m) / 2


def _region_name_similarity(regions: torch.Tensor, present: torch.Tensor,
                            text: torch.Tensor) -> torch.Tensor:
    """(B, L, C) cosines of regions (B, L, D) with names (C, D); -inf where a region is absent."""
    similarity = regions @ text.t()  # (B, L, C)
    return similarity.masked_fill(~present.unsqueeze(-1), float("-inf"))


def names_loss(regions: torch.Tensor, present: torch.Tensor, text: torch.Tensor,
               targets: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Multi-label cross-entropy of the names each caption mentions (segclip/training/names.py).

    Each name's score in an image is its best region's scaled cosine similarity; a softmax over
    the C names is matched to the uniform distribution over the mentioned ones. Images whose
    caption mentions none are skipped (0 when no image mentions any).

    Args:
        regions: (B, L, D) L2-normalised region embeddings.
        present: (B, L) True for regions that hold at least one patch.
        text: (C, D) L2-normalised prompt embeddings of the names.
        targets: (B, C) multi-hot mentions.
        logit_scale: the contrastive multiplier (already clamped).
    """
    similarity = _region_name_similarity(regions, present, text)  # (B, L, C)
    logits = logit_scale * similarity.amax(dim=1)  # (B, C)
    counts = targets.sum(dim=-1)  # (B,)
    rows = counts > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    wanted = targets[rows] / counts[rows].unsqueeze(-1)  # (B', C)
    return -(wanted * F.log_softmax(logits[rows], dim=-1)).sum(dim=-1).mean()


def names_flat_loss(regions: torch.Tensor, present: torch.Tensor, text: torch.Tensor,
                    targets: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Flat names on the regions no mentioned name picks (segclip/training/names.py).

    In each image whose caption mentions a name, a name picks its best present region (as in
    `names_loss`); every other present region should match no name better than another, so its
    softmax over the C names is pulled to uniform: KL(uniform || softmax), 0 when flat. Averaged
    over those regions (0 when there are none).

    Args: as `names_loss`.
    """
    similarity = _region_name_similarity(regions, present, text)  # (B, L, C)
    best = similarity.detach().argmax(dim=1)  # (B, C): each name's region
    picked = torch.zeros_like(present)  # (B, L)
    mentioned = targets > 0  # (B, C)
    rows, names = mentioned.nonzero(as_tuple=True)
    picked[rows, best[rows, names]] = True
    others = present & ~picked & mentioned.any(dim=-1, keepdim=True)  # (B, L)
    if not bool(others.any()):
        return regions.sum() * 0.0
    log_p = F.log_softmax(logit_scale * similarity[others], dim=-1)  # (R, C)
    count = text.shape[0]
    return (-log_p.mean(dim=-1) - math.log(count)).mean()

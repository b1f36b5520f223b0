"""Optimizer, parameter groups and schedules of the reference recipe
(docs/official-implementation.md §3).

Groups (CLIP-initialised training, `lower_lr_scope="reference"`): `lower_lr` for the image
blocks before the semantic group, the text transformer, `ln_final`, `text_projection` and
`logit_scale`; `lr` for everything else (the group module, the blocks after it, `ln_post`,
`proj`, the reconstruction branch). Frozen (`freeze_embeddings`): `visual.conv1`,
`visual.positional_embedding`, `visual.ln_pre`, `token_embedding` and the text
`positional_embedding`; unfrozen, they join their side's group. Scope "text" keeps only the text
side at `lower_lr`, "none" puts everything at `lr`. `visual.class_embedding` is always frozen:
the CLS token is dropped, so it never gets a gradient. Weight decay is decoupled and skips only
names containing "bias".
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from segclip.training.config import TrainConfig

DEAD_PARAMETERS = ("visual.class_embedding",)
VISUAL_EMBEDDINGS = ("visual.conv1.", "visual.positional_embedding", "visual.ln_pre.")
TEXT_EMBEDDINGS = ("token_embedding.", "positional_embedding")
EMBEDDING_PARAMETERS = VISUAL_EMBEDDINGS + TEXT_EMBEDDINGS
TEXT_PARAMETERS = ("transformer.", "ln_final.", "text_projection", "logit_scale")


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


def is_frozen(name: str, config: TrainConfig) -> bool:
    """Whether the parameter `name` of a SegCLIP model stays fixed under `config`."""
    return _matches(name, DEAD_PARAMETERS) or (config.freeze_embeddings
                                               and _matches(name, EMBEDDING_PARAMETERS))


def is_lower_lr(name: str, group_layer: int, scope: str = "reference") -> bool:
    """Whether `name` is in the lower-lr group: the reference's 4e-6 group (pretrained parts
    kept close to CLIP) for scope "reference", its text side only for "text", none for "none".
    Embeddings count with their side (they only train when `freeze_embeddings` is off)."""
    if scope == "none":
        return False
    if _matches(name, TEXT_PARAMETERS + TEXT_EMBEDDINGS):
        return True
    if scope != "reference":
        return False
    prefix = "visual.transformer.resblocks."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".")[0]) < group_layer
    return _matches(name, VISUAL_EMBEDDINGS)


def _named_trainable(model: nn.Module, config: TrainConfig,
                     ) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in model.named_parameters():
        frozen = is_frozen(name, config)
        param.requires_grad_(not frozen)
        if not frozen:
            yield name, param


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in up to four groups (lr x decay); sets
    `requires_grad` per `is_frozen`. Each group records its `base_lr` for the schedule."""
    group_layer = model.config.group_layer
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in _named_trainable(model, config):
        lower = is_lower_lr(name, group_layer, config.lower_lr_scope)
        decay = "bias" not in name
        buckets.setdefault((lower, decay), []).append(param)
    groups = []
    for (lower, decay), params in sorted(buckets.items()):
        base_lr = config.lower_lr if lower else config.lr
        name = f"{'lower' if lower else 'main'}_{'decay' if decay else 'no_decay'}"
        groups.append({"params": params, "lr": base_lr, "base_lr": base_lr, "name": name,
                       "weight_decay": config.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup from 0 over the first
    `warmup * total` steps, then a half-cosine down to 0 (the reference's per-step schedule)."""
    progress = step / max(total, 1)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's `base_lr` by `factor`; returns the main lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return max(group["lr"] for group in optimizer.param_groups)


def gumbel_tau(step: int, total: int, config: TrainConfig, default: float) -> float:
    """The Gumbel temperature at `step`: geometric from start to end, or the model's tau."""
    if config.gumbel_tau_start is None or config.gumbel_tau_end is None:
        return default
    progress = min(step / max(total - 1, 1), 1.0)
    return config.gumbel_tau_start * (config.gumbel_tau_end / config.gumbel_tau_start) ** progress

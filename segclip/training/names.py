"""Names mentioned by the captions, for the names loss (docs/synthetic-world.md
"Names loss and an earlier assignment layer").

`TrainConfig.names` is a class list as `segclip-eval --classes` takes it (a file of one name per
line, e.g. a world's classes.txt, or a preset; read by `segclip.evaluation.datasets.load_classes`).
Each caption is searched for each name as whole words, a trailing plural "s"/"es" allowed ("two
green squares" mentions "green square"); names that no caption mentions are dropped, so classes held
out of training never become negatives everywhere. The loss (`segclip.losses.names_loss`) scores
every region against the prompt `template.format(name)` of every kept name, the way zero-shot
segmentation scores them, and asks the best region of each image to pick the names its caption
mentions: supervision read from the caption text alone, as in GroupViT's multi-label contrastive
loss over the nouns of a caption. `segclip.losses.names_flat_loss` (`names_flat_weight`) pulls
the regions no mentioned name picks towards equal scores for every name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from segclip.errors import DataError
from segclip.runtime.contract import DEFAULT_TEMPLATE
from segclip.text import tokenize


def name_pattern(name: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive match of `name`, its last word optionally plural."""
    words = [re.escape(w) for w in name.lower().split()]
    words[-1] += "(?:e?s)?"
    return re.compile(r"\b" + r"\s+".join(words) + r"\b")


def mentioned(captions: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """(P, C) bool: caption p mentions name c."""
    patterns = [name_pattern(n) for n in names]
    return np.array([[p.search(caption.lower()) is not None for p in patterns]
                     for caption in captions], dtype=bool).reshape(len(captions), len(names))


@dataclass(frozen=True)
class NameTargets:
    """The kept names, their prompt tokens and every caption's multi-hot row."""

    names: tuple[str, ...]  # C kept names
    tokens: torch.Tensor  # (C, context) prompt token ids, on the training device
    targets: torch.Tensor  # (P, C) float32 multi-hot per dataset item

    @classmethod
    def build(cls, captions: Sequence[str], names: Sequence[str], context_length: int,
              template: str = DEFAULT_TEMPLATE,
              device: torch.device | str = "cpu") -> NameTargets:
        hits = mentioned(captions, names)  # (P, C)
        keep = hits.any(axis=0)
        if not keep.any():
            raise DataError("no caption mentions any of the names in TrainConfig.names")
        kept = tuple(n for n, k in zip(names, keep) if k)
        tokens = tokenize([template.format(n) for n in kept], context_length=context_length)
        tokens = tokens.to(device)  # (C, context), moved once: every step encodes them
        return cls(kept, tokens, torch.from_numpy(hits[:, keep].astype(np.float32)))

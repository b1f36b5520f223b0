"""Multi-level fusion of SC-CLIP (docs/dense.md): the last block's output on the main path plus
the mean of its outputs on intermediate levels.

    fused = main + (1 / |levels|) * sum_l level_l

Each level is the edited last block applied to one intermediate block's (repaired) tokens, in
parallel with the main path (segclip/dense/scclip.py). `ln_post` follows, so only the relative
weight of the two terms matters: equal here. Legend: B batch, L tokens, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fuse_levels(main: torch.Tensor, levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, L, D) main path and K >= 1 (B, L, D) levels -> (B, L, D) main + mean(levels)."""
    if not levels:
        raise ValueError("multi-level fusion needs at least one level")
    return main + torch.stack(list(levels)).mean(0)  # (B, L, D)

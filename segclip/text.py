"""Text tokenisation for the PyTorch side: open_clip's CLIP BPE tokenizer (paper §2.1)."""

from __future__ import annotations

import open_clip
import torch


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Lower-cased CLIP BPE ids, SOT ... EOT, zero-padded/truncated: (T, context_length) int64."""
    return open_clip.tokenize(texts, context_length=context_length)

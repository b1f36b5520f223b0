"""Export-only transformer blocks: the math of open_clip's `ResidualAttentionBlock`, written so
the traced ONNX graph is lean (docs/runtime-practice.md "ONNX export of ViTs").

`nn.MultiheadAttention` traces into a packed in-projection on (N, B, D) tokens followed by
Gathers that copy q, k and v apart, a bias Add after every 3-D MatMul and several Transposes per
block. `LeanBlock` computes the same function with

- every linear layer on 2-D (B*N, D) rows, so it exports as one `Gemm` with its bias inside;
- q, k and v from three `Gemm`s (no split of a packed tensor), the 1/sqrt(d) scale folded into
  the q weights, k laid out as (B, H, d, N) by its one Transpose;
- the token count N, the width and the head count as constants (N is static in a bundle: the
  image side, the region count and the context length are fixed), so no shape arithmetic.

Only blocks of exactly the standard structure are replaced (`lean_blocks` leaves any other block
alone); the replacement lives for the duration of the export and the model is restored after.

Legend: B batch, N tokens, D width, H heads, d = D / H head width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


def is_standard(block: nn.Module) -> bool:
    """A self-attention `ResidualAttentionBlock` (batch-first, biased projections, no
    LayerScale, QuickGELU or GELU MLP) whose function `LeanBlock` reproduces."""
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        return False
    attn = block.attn
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first
            and attn._qkv_same_embed_dim and attn.in_proj_bias is not None
            and attn.bias_k is None and not attn.add_zero_attn and attn.dropout == 0.0
            and isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)
            and [name for name, _ in block.mlp.named_children()] == ["c_fc", "gelu", "c_proj"])


class _Projection(nn.Module):
    """y = x W^T + b; W and b are buffers so that the export writes them as named initializers
    (a quantiser only quantises initializer weights)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.clone())  # (out, in)
        self.register_buffer("bias", bias.clone())  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LeanBlock(nn.Module):
    """`block`'s forward on (B, N, D) tokens with N fixed at `tokens` (see module docstring)."""

    def __init__(self, block: ResidualAttentionBlock, tokens: int) -> None:
        super().__init__()
        if not is_standard(block):
            raise ValueError(f"not a standard ResidualAttentionBlock: {block}")
        self.block = block
        self.tokens = tokens
        attn = block.attn
        self.width = attn.embed_dim
        self.heads = attn.num_heads
        self.head_width = self.width // self.heads
        scale = 1.0 / math.sqrt(self.head_width)
        w_q, w_k, w_v = attn.in_proj_weight.detach().chunk(3)  # 3 x (D, D)
        b_q, b_k, b_v = attn.in_proj_bias.detach().chunk(3)  # 3 x (D,)
        self.q_proj = _Projection(w_q * scale, b_q * scale)
        self.k_proj = _Projection(w_k, b_k)
        self.v_proj = _Projection(w_v, b_v)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        width, split = self.width, (-1, self.tokens, self.heads, self.head_width)
        b = self.block
        rows = x.reshape(-1, width)  # (B*N, D)
        h = b.ln_1(rows)
        q = self.q_proj(h).reshape(split)  # (B, N, H, d)
        k = self.k_proj(h).reshape(split)
        v = self.v_proj(h).reshape(split)
        q, k, v = q.transpose(1, 2), k.permute(0, 2, 3, 1), v.transpose(1, 2)  # k: (B, H, d, N)
        scores = q @ k  # (B, H, N, N)
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)  # (N, N) additive
        mixed = scores.softmax(dim=-1) @ v  # (B, H, N, d)
        mixed = mixed.transpose(1, 2).reshape(-1, width)  # (B*N, D)
        rows = rows + b.attn.out_proj(mixed)
        rows = rows + b.mlp(b.ln_2(rows))  # (B*N, D)
        return rows.reshape(-1, self.tokens, width)  # (B, N, D)


@contextmanager
def lean_blocks(blocks: nn.ModuleList, tokens: Sequence[int]) -> Iterator[int]:
    """Replace every standard block `blocks[i]` (run on `tokens[i]` tokens) by its `LeanBlock`
    for the duration of the context; yields how many were replaced."""
    original = list(blocks)
    if len(tokens) != len(original):
        raise ValueError(f"{len(original)} blocks but {len(tokens)} token counts")
    try:
        replaced = 0
        for i, (block, n) in enumerate(zip(original, tokens)):
            if is_standard(block):
                blocks[i] = LeanBlock(block, n)
                replaced += 1
        yield replaced
    finally:
        for i, block in enumerate(original):
            blocks[i] = block

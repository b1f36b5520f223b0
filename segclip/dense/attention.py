"""The last-block edits of training-free dense CLIP (docs/dense.md).

Notation for the last block with input x (B, 1+N, D) (CLS first, then the h x w patch grid
row-major), y = ln_1(x); per head, q = y W_q, k = y W_k, v = y W_v (B, H, 1+N, d), s = d^-1/2,
O(.) = the pretrained out_proj applied after merging the heads:

- maskclip:  out = O(v)                                   no q-k attention, no residual, no FFN
- sclip:     out = x + O((softmax(s q q^T) + softmax(s k k^T)) v)          residual, no FFN
- clearclip: out = O(softmax(s q q^T) v)                                no residual, no FFN
- naclip:    out = O(softmax(s k k^T + G) v)                            no residual, no FFN,
             G[i, j] = exp(-|p_i - p_j|^2 / (2 sigma^2)) for patches i, j at grid positions
             p_i, p_j (sigma = 5 patches); G = 0 on the CLS row and column.
- scclip:    out = O(1/2 (softmax(s k k^T) + softmax(s g g^T)) v)         no residual, no FFN,
             g = the keys that the same block's ln_1 and in-projection give for the guide
             tokens (SC-CLIP's mid-layer affinity; segclip/dense/scclip.py picks them).

The result then goes through `ln_post` and `proj` like CLIP's CLS token.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("naclip", "sclip", "clearclip", "maskclip", "scclip")


def gaussian_bias(h: int, w: int, sigma: float = 5.0) -> torch.Tensor:
    """(1+N, 1+N) NACLIP neighbourhood bias on an h x w grid; zero CLS row and column."""
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)  # (N,)
    cols = torch.arange(w, dtype=torch.float32).repeat(h)  # (N,)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2  # (N, N)
    bias = torch.zeros(h * w + 1, h * w + 1)
    bias[1:, 1:] = torch.exp(-d2 / (2.0 * sigma * sigma))
    return bias


def _heads(attn: nn.MultiheadAttention, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, L, D) -> q, k, v each (B, H, L, d) with the pretrained in-projection."""
    b, n, dim = y.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
    qkv = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
    return qkv[0], qkv[1], qkv[2]


def _merge(attn: nn.MultiheadAttention, out: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, D) through the pretrained out_proj."""
    b, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, heads * d)  # (B, L, D)
    return attn.out_proj(out)


def guide_keys(block: nn.Module, guide: torch.Tensor) -> torch.Tensor:
    """(B, 1+N, D) guide tokens -> (B, H, 1+N, d) their keys under `block`'s ln_1 and
    in-projection (the scclip affinity)."""
    return _heads(block.attn, block.ln_1(guide))[1]


def last_block(block: nn.Module, x: torch.Tensor, mode: str,
               bias: torch.Tensor | None = None,
               guide: torch.Tensor | None = None) -> torch.Tensor:
    """The edited last block (module docstring) on (B, 1+N, D) tokens -> (B, 1+N, D).

    `bias` is `gaussian_bias(h, w)` for naclip, `guide` is `guide_keys(block, tokens)` for
    scclip (each ignored by the other modes).
    """
    if mode not in MODES:
        raise ValueError(f"unknown dense mode {mode!r}; expected one of {', '.join(MODES)}")
    attn = block.attn
    q, k, v = _heads(attn, block.ln_1(x))  # (B, H, L, d) each
    scale = q.shape[-1] ** -0.5
    if mode == "maskclip":
        return _merge(attn, v)
    if mode == "clearclip":
        return _merge(attn, torch.softmax(scale * q @ q.transpose(-1, -2), dim=-1) @ v)
    if mode == "sclip":
        a = (torch.softmax(scale * q @ q.transpose(-1, -2), dim=-1)
             + torch.softmax(scale * k @ k.transpose(-1, -2), dim=-1))  # (B, H, L, L)
        return x + _merge(attn, a @ v)
    if mode == "scclip":
        if guide is None:
            raise ValueError("scclip needs the guide keys (guide_keys(block, tokens))")
        a = 0.5 * (torch.softmax(scale * k @ k.transpose(-1, -2), dim=-1)
                   + torch.softmax(scale * guide @ guide.transpose(-1, -2), dim=-1))
        return _merge(attn, a @ v)
    if bias is None:
        raise ValueError("naclip needs the Gaussian bias (gaussian_bias(h, w))")
    logits = scale * k @ k.transpose(-1, -2) + bias.to(k.dtype)  # (B, H, L, L)
    return _merge(attn, torch.softmax(logits, dim=-1) @ v)

"""`LeanBlock` computes open_clip's `ResidualAttentionBlock` exactly, and the exported graphs have
the lean form (2-D Gemms with their bias, no packed-qkv split, no shape arithmetic per block).

The reference is the open_clip block itself (its `nn.MultiheadAttention` path) and, for the
attention, the paper-style equation written literally per head.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from open_clip.transformer import LayerNorm, LayerScale, QuickGELU, ResidualAttentionBlock
from torch import nn

from segclip.export.blocks import LeanBlock, is_standard, lean_blocks
from segclip.export.onnx_graph import export_image_onnx, export_text_onnx


def _block(width: int = 32, heads: int = 4, act: type[nn.Module] = QuickGELU,
           seed: int = 0, **kwargs: object) -> ResidualAttentionBlock:
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads, 2.0, act_layer=act, norm_layer=LayerNorm,
                                   **kwargs).eval()
    with torch.no_grad():  # non-trivial biases and norms (defaults are 0 / 1)
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)  # (N, N) additive, as open_clip builds it


def _literal(block: ResidualAttentionBlock, x: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    """x + attn(ln_1 x); + mlp(ln_2 .), one sample and one head at a time."""
    attn = block.attn
    heads, width = attn.num_heads, attn.embed_dim
    d = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    out = []
    for sample in x:  # (N, D)
        h = block.ln_1(sample)
        q, k, v = h @ w_q.T + b_q, h @ w_k.T + b_k, h @ w_v.T + b_v  # (N, D) each
        per_head = []
        for i in range(heads):
            cols = slice(i * d, (i + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d)  # (N, N)
            if mask is not None:
                scores = scores + mask
            per_head.append(torch.softmax(scores, dim=-1) @ v[:, cols])  # (N, d)
        mixed = torch.cat(per_head, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias
        y = sample + mixed
        out.append(y + block.mlp(block.ln_2(y)))
    return torch.stack(out)


@pytest.mark.parametrize("act", [QuickGELU, nn.GELU])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_lean_block_equals_open_clip_block_and_the_literal_equation(
        act: type[nn.Module], batch: int, masked: bool) -> None:
    block = _block(act=act)
    n = 7
    x = torch.randn(batch, n, 32, generator=torch.Generator().manual_seed(1))
    mask = _causal(n) if masked else None
    with torch.no_grad():
        want = block(x, attn_mask=mask)
        got = LeanBlock(block, n)(x, attn_mask=mask)
        literal = _literal(block, x, mask)
    assert got.shape == (batch, n, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got, literal, rtol=0, atol=2e-6)


def test_lean_block_weights_and_fixed_token_count() -> None:
    block = _block()
    lean = LeanBlock(block, 5)
    own = [k for k in lean.state_dict() if not k.startswith("block.")]
    assert own == [f"{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")]
    w_q, w_k, w_v = block.attn.in_proj_weight.detach().chunk(3)
    torch.testing.assert_close(lean.q_proj.weight, w_q * (1.0 / math.sqrt(8)), rtol=0, atol=0)
    torch.testing.assert_close(lean.v_proj.weight, w_v, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # N is a constant of the export: 6 tokens do not fit
        lean(torch.randn(2, 6, 32))


def test_is_standard_accepts_the_plain_block_only() -> None:
    assert is_standard(_block())
    assert not is_standard(_block(is_cross_attention=True))
    assert not is_standard(_block(batch_first=False))
    layer_scaled = _block()
    layer_scaled.ls_1 = LayerScale(32, 0.1)
    assert not is_standard(layer_scaled)
    unbiased = _block()
    unbiased.attn = nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    assert not is_standard(unbiased)
    with pytest.raises(ValueError, match="not a standard"):
        LeanBlock(_block(is_cross_attention=True), 4)


def test_lean_blocks_replaces_standard_blocks_and_restores_them() -> None:
    plain, cross = _block(seed=0), _block(seed=1, is_cross_attention=True)
    blocks = nn.ModuleList([plain, cross, _block(seed=2)])
    original = list(blocks)
    with lean_blocks(blocks, [4, 4, 2]) as replaced:
        assert replaced == 2
        assert isinstance(blocks[0], LeanBlock) and blocks[0].tokens == 4
        assert blocks[1] is cross
        assert isinstance(blocks[2], LeanBlock) and blocks[2].tokens == 2
    assert list(blocks) == original
    with pytest.raises(KeyError), lean_blocks(blocks, [4, 4, 2]):
        raise KeyError("failure inside the export")
    assert list(blocks) == original
    with pytest.raises(ValueError, match="3 blocks but 2 token counts"), \
            lean_blocks(blocks, [4, 4]):
        pass


_BLOCK_SCOPE = re.compile(r"^(?:/transformer)?/resblocks\.(\d+)/")


def _block_ops(path: Path) -> dict[int, Counter[str]]:
    """Op histogram per block scope (`/resblocks.<i>/`, `/transformer/resblocks.<i>/`)."""
    per_block: dict[int, Counter[str]] = {}
    for node in onnx.load(str(path)).graph.node:
        match = _BLOCK_SCOPE.match(node.name)
        if match:
            per_block.setdefault(int(match[1]), Counter())[node.op_type] += 1
    return per_block


@pytest.mark.parametrize("tower", ["image", "text"])
def test_exported_blocks_are_lean_and_the_model_is_left_unchanged(
        tiny_bundle_model: nn.Module, tmp_path: Path, tower: str) -> None:
    model = tiny_bundle_model
    before = {name: type(m) for name, m in model.named_modules()}
    path = tmp_path / f"{tower}.onnx"
    (export_image_onnx if tower == "image" else export_text_onnx)(model, path, 17)
    assert {name: type(m) for name, m in model.named_modules()} == before
    per_block = _block_ops(path)
    blocks = (model.visual if tower == "image" else model).transformer.resblocks
    assert sorted(per_block) == list(range(len(blocks)))
    for index, ops in per_block.items():
        # q, k, v, out, c_fc, c_proj: six Gemms with their bias; two activation products
        assert ops["Gemm"] == 6, (index, ops)
        assert ops["MatMul"] == 2, (index, ops)
        assert ops["Add"] == (3 if tower == "text" else 2), (index, ops)  # residuals (+ mask)
        assert not {"Gather", "Split", "Slice", "Shape", "Concat", "Div"} & set(ops), \
            (index, ops)

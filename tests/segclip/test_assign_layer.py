"""`ModelConfig.assign_layer`: the mapping logits read an earlier block's patch tokens while the
region values keep reading the tokens after `group_layer` blocks. Checked against the group's
equations written out by hand, the default's equivalence, the reconstruction pass, and an ONNX
export that passes parity and runs in the torch-free Segmenter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _export_helpers import export_passes_and_segments

from segclip.config import ModelConfig
from segclip.errors import ConfigError
from segclip.model.grouping import mean_pool


@pytest.mark.parametrize("value", [-2, 5])
def test_assign_layer_bounds(value: int) -> None:
    with pytest.raises(ConfigError, match="assign_layer must be -1"):
        ModelConfig.preset("tiny", assign_layer=value)


def literal_group(model, images: torch.Tensor, assign_layer: int):
    """Blocks one by one; logits from the tokens after `assign_layer` blocks, values from the
    tokens after `group_layer` blocks, each region the mean of its argmax patches."""
    tokens, _, _ = model.embed_patches(images)  # (B, N, D)
    after = [tokens]
    for block in model.visual.transformer.resblocks[: model.config.group_layer]:
        after.append(block(after[-1]))
    group = model.group
    centers = group.contextual_centers(after[-1])  # (B, L, D)
    keys = group.key_ln(group.key_proj(group.norm(after[assign_layer])))  # (B, N, D)
    logits = group.mapping_scale * centers @ keys.transpose(1, 2)  # (B, L, N)
    hard = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1])  # (B, N, L)
    hard = hard.transpose(1, 2).to(logits.dtype)  # (B, L, N)
    values = group.value_proj(group.norm(after[-1]))  # (B, N, D)
    return logits, group.out_mlp(centers + mean_pool(hard, values))


@pytest.mark.parametrize("assign_layer", [0, 1, 3])
def test_logits_read_the_earlier_tokens(make_tiny_model: Callable, assign_layer: int) -> None:
    model = make_tiny_model(assign_layer=assign_layer, cross_layers=1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped, _, _, _, _ = model.forward_group(images)
        logits, regions = literal_group(model, images, assign_layer)
    torch.testing.assert_close(grouped.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.regions, regions, atol=1e-5, rtol=1e-5)
    default = make_tiny_model(cross_layers=1)
    with torch.no_grad():
        assert not torch.allclose(default.forward_group(images)[0].logits, grouped.logits)


def test_default_and_group_layer_are_the_paper_grouping(make_tiny_model: Callable) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    default = make_tiny_model()
    same = make_tiny_model(assign_layer=default.config.group_layer)
    with torch.no_grad():
        a, b = default.encode_image(images), same.encode_image(images)
    torch.testing.assert_close(a.regions, b.regions)
    torch.testing.assert_close(a.assign, b.assign)


def test_reconstruction_uses_the_same_grouping(make_tiny_model: Callable) -> None:
    model = make_tiny_model(assign_layer=0).train()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    loss = model.reconstruction_term(images, generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert torch.isfinite(loss) and model.group.key_proj.conv.weight.grad.abs().sum() > 0


def test_assign_layer_exports_and_runs_without_torch(make_tiny_model: Callable,
                                                     tmp_path: Path) -> None:
    export_passes_and_segments(make_tiny_model(assign_layer=0, patch_stem="conv"), tmp_path)

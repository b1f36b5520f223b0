"""The convolutional patch stem (`patch_stem="conv"`, segclip/model/stem.py): config checks, the
stem written out literally, a checkpoint round trip, and an ONNX export that passes parity and runs
in the torch-free Segmenter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _export_helpers import export_passes_and_segments

from segclip.config import ModelConfig
from segclip.errors import ConfigError


@pytest.mark.parametrize(("overrides", "message"), [
    ({"patch_stem": "resnet"}, "patch_stem must be one of"),
    ({"patch_stem": "conv", "patch_size": 6, "image_size": 60}, "power-of-two patch_size"),
])
def test_bad_stems_are_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny", **overrides)


def literal_stem(stem: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """log2(P) x (3x3 conv, ReLU, 2x2 max-pool), then a 1x1 conv, from the weights by hand."""
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    x = images  # (B, 3, H, W)
    for conv in convs[:-1]:
        x = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2)
    last = convs[-1]
    return torch.einsum("bchw,dc->bdhw", x, last.weight[:, :, 0, 0]) + last.bias[:, None, None]


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_conv_stem_tokens(make_tiny_model: Callable, size: tuple[int, int]) -> None:
    model = make_tiny_model(patch_stem="conv")
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, h, w = model.embed_patches(images)  # (B, N, D)
        grid = literal_stem(model.visual.conv1, images)  # (B, D, h, w)
    assert (h, w) == (size[0] // 8, size[1] // 8) == grid.shape[-2:]
    expected = model.visual.ln_pre(grid.flatten(2).transpose(1, 2)
                                   + model.patch_positions(h, w))
    assert torch.allclose(tokens, expected, atol=1e-5)
    linear = make_tiny_model()
    assert isinstance(linear.visual.conv1, torch.nn.Conv2d)  # the default is unchanged


def test_hybrid_stem_starts_as_the_linear_one_and_learns(make_tiny_model: Callable) -> None:
    model = make_tiny_model(patch_stem="hybrid")
    stem = model.visual.conv1
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(stem(images), stem.linear(images))  # the CNN's last conv starts at zero
    with torch.no_grad():
        stem.conv.project.weight.normal_(std=0.1)
        expected = stem.linear(images) + literal_stem(stem.conv, images)
    assert torch.allclose(stem(images), expected, atol=1e-5)
    model.train()
    fresh = make_tiny_model(patch_stem="hybrid").train()
    fresh.visual.conv1(images).square().mean().backward()
    assert fresh.visual.conv1.conv.project.weight.grad.abs().max() > 0  # it can leave zero


@pytest.mark.parametrize("stem", ["conv", "hybrid"])
def test_conv_stem_checkpoint_round_trip(make_tiny_model: Callable, tmp_path: Path,
                                         stem: str) -> None:
    from segclip.checkpoint import load_checkpoint, save_checkpoint

    model = make_tiny_model(patch_stem=stem)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt.pt"))
    assert loaded.config.patch_stem == stem
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.embed_patches(images)[0], loaded.embed_patches(images)[0])


@pytest.mark.parametrize("stem", ["conv", "hybrid"])
def test_conv_stem_exports_and_runs_without_torch(make_tiny_model: Callable, tmp_path: Path,
                                                  stem: str) -> None:
    model = make_tiny_model(patch_stem=stem)
    if stem == "hybrid":  # a trained hybrid stem: the CNN part contributes
        with torch.no_grad():
            model.visual.conv1.conv.project.weight.normal_(std=0.05)
    export_passes_and_segments(model, tmp_path)

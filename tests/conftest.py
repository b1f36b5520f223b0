"""Shared fixtures, built at test time: nothing is downloaded and nothing touches the network.

torch is imported inside the fixtures, not at module level, so that torch-free test folders
(tests/runtime) still collect in an environment without the `train` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

# One intra-op thread unless the caller says otherwise: on a small shared CPU, OpenMP threads
# spin-waiting on each other make the tiny models 10-30x slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SEED = 0


@pytest.fixture
def tiny_config() -> Any:
    """The `tiny` preset: 64x64 images, 8x8 patches (8x8 grid), width 96, 8 centers."""
    from segclip.config import ModelConfig

    return ModelConfig.preset("tiny")


@pytest.fixture
def generator() -> Any:
    """A CPU `torch.Generator` seeded with SEED; use it for every random input of a test."""
    import torch

    return torch.Generator().manual_seed(SEED)


def build_tiny_model(config: Any, seed: int = SEED) -> Any:
    """A tiny SegCLIP whose weights depend only on `seed` (global RNG state is restored)."""
    import torch

    from segclip.model import SegCLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegCLIP(config)


@pytest.fixture
def make_tiny_model(tiny_config: Any) -> Callable[..., Any]:
    """Factory: `make_tiny_model(seed=SEED, **overrides)` -> a tiny SegCLIP in eval mode, built
    from the tiny preset with `overrides` applied."""
    from segclip.config import ModelConfig

    def make(seed: int = SEED, **overrides: Any) -> Any:
        config = ModelConfig.preset("tiny", **overrides) if overrides else tiny_config
        return build_tiny_model(config, seed).eval()

    return make


@pytest.fixture
def tiny_model(make_tiny_model: Callable[..., Any]) -> Any:
    """A freshly built tiny SegCLIP in eval mode (function-scoped: tests may train or edit it)."""
    return make_tiny_model()


@pytest.fixture
def make_images(tiny_config: Any) -> Callable[..., Any]:
    """Factory: `make_images(batch, seed=SEED, size=None)` -> (B, 3, S, S) float32 in N(0, 1),
    the range of CLIP-normalised pixels."""
    import torch

    def make(batch: int, seed: int = SEED, size: int | None = None) -> torch.Tensor:
        size = tiny_config.image_size if size is None else size
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=gen)

    return make


@pytest.fixture
def images(make_images: Callable[..., Any]) -> Any:
    """A batch of 4 random tiny-preset images (B, 3, 64, 64)."""
    return make_images(4)


@pytest.fixture
def make_tokens() -> Callable[..., Any]:
    """Factory: `make_tokens(batch, context_length)` -> (B, C) int64 caption token ids."""
    from segclip.text import tokenize

    words = ["cat", "dog", "red square", "blue circle", "tree", "car", "green triangle", "sky"]

    def make(batch: int, context_length: int = 32) -> Any:
        captions = [f"a photo of a {words[i % len(words)]}." for i in range(batch)]
        return tokenize(captions, context_length=context_length)

    return make


@pytest.fixture
def make_superpixels(tiny_config: Any) -> Callable[..., Any]:
    """Factory: `make_superpixels(batch, seed)` -> (B, N) int64 super-patch labels: the tiny
    grid cut into 2x2 quadrants plus a random relabelling of a few patches."""
    import torch

    def make(batch: int, seed: int = SEED) -> torch.Tensor:
        g = tiny_config.grid_size
        rows = torch.arange(g).unsqueeze(1).expand(g, g)  # (h, w)
        cols = torch.arange(g).unsqueeze(0).expand(g, g)  # (h, w)
        quadrant = (2 * (rows >= g // 2) + (cols >= g // 2)).reshape(-1)  # (N,)
        labels = quadrant.unsqueeze(0).repeat(batch, 1)  # (B, N)
        gen = torch.Generator().manual_seed(seed)
        noisy = torch.rand(batch, g * g, generator=gen) < 0.1  # (B, N)
        labels[noisy] = 4
        return labels

    return make


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small synthetic shapes world (`segclip.data.synth`), built once per session: 48 training
    pairs with cached superpixels, 4 val and 4 eval images (64 px). Treat it as read-only."""
    from segclip.data.superpixels import build_cache
    from segclip.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth") / "world"
    generate(SynthConfig(num=48, val_num=4, eval_num=4, seed=SEED), root)
    build_cache(root, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_bundle_model() -> Any:
    """The seeded tiny SegCLIP that `tiny_bundle` is exported from (eval mode, read-only)."""
    from segclip.config import ModelConfig

    return build_tiny_model(ModelConfig.preset("tiny"), seed=SEED).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_bundle_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tiny_bundle_model` saved as a checkpoint once per session (read-only: tests that damage
    a checkpoint copy it first)."""
    from segclip.checkpoint import save_checkpoint

    return save_checkpoint(tiny_bundle_model, tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tiny_bundle_model` exported once per session (fp32 + fp16 image graphs, verified) for the
    runtime and CLI tests. Read-only: tests that edit a bundle copy it first."""
    from segclip.export import export_model

    return export_model(tiny_bundle_model, tmp_path_factory.mktemp("runtime") / "bundle",
                        fp16=True)

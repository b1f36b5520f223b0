"""Model configuration (paper §2, §3.1): a frozen dataclass with named presets.

`vit-b16` is the paper's model: open_clip ViT-B-16 with QuickGELU, the semantic group module after
block 10 with 8 centers and 2 cross-attention layers. `tiny` is a small model for tests and the
synthetic shapes world. Checkpoints store `to_dict()`; `from_dict()` rebuilds it and fails loudly
on unknown keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from segclip.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    # image tower (open_clip VisionTransformer)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    patch_stem: str = "linear"  # "conv" / "hybrid": a small CNN instead of / beside it
    # semantic group module after `group_layer` blocks; the remaining blocks run on regions
    group_layer: int = 10
    # the mapping logits read the patch tokens after `assign_layer` blocks (0: the embedded
    # patches); -1: after `group_layer`, as in the paper. Region values always come from there.
    assign_layer: int = -1
    num_centers: int = 8
    cross_layers: int = 2
    gumbel_tau: float = 0.9  # Gumbel-softmax temperature in training (eval/export use plain argmax)
    mapping_scale: float = 1.0  # multiplier on the mapping logits; the paper/official code use 1
    # shared embedding space
    embed_dim: int = 512
    # text tower (open_clip text transformer)
    vocab_size: int = 49408
    context_length: int = 77  # positional table and inference context
    train_context_length: int = 32  # SOT + 30 BPE + EOT in training
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # contrastive temperature: the learned parameter is log(scale); the scale is clamped to max
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # reconstruction branch (paper §2.3), training only
    with_reconstruction: bool = True
    mask_ratio: float = 0.75
    recon_layers: int = 2
    decoder_width: int = 384
    decoder_layers: int = 3
    decoder_heads: int = 8

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "vision_width", "vision_layers",
                  "vision_heads", "num_centers", "embed_dim", "vocab_size", "context_length",
                  "train_context_length", "text_width", "text_layers", "text_heads",
                  "decoder_width", "decoder_layers", "decoder_heads")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size must be a multiple of patch_size ({self.patch_size}), "
                              f"got {self.image_size}")
        stem_problem = check_stem(self.patch_stem, self.patch_size)
        if stem_problem:
            raise ConfigError(stem_problem)
        if not 1 <= self.group_layer <= self.vision_layers:
            raise ConfigError(f"group_layer must be in [1, vision_layers={self.vision_layers}], "
                              f"got {self.group_layer}")
        if not -1 <= self.assign_layer <= self.group_layer:
            raise ConfigError(f"assign_layer must be -1 (= group_layer) or in [0, group_layer="
                              f"{self.group_layer}], got {self.assign_layer}")
        if not self.vision_mlp_ratio > 0:
            raise ConfigError(f"vision_mlp_ratio must be > 0, got {self.vision_mlp_ratio}")
        if self.cross_layers < 0:
            raise ConfigError(f"cross_layers must be >= 0, got {self.cross_layers}")
        for name, width, heads in (("vision", self.vision_width, self.vision_heads),
                                   ("text", self.text_width, self.text_heads),
                                   ("decoder", self.decoder_width, self.decoder_heads)):
            if width % heads:
                raise ConfigError(f"{name}_width ({width}) must be divisible by "
                                  f"{name}_heads, got {heads}")
        if not 2 <= self.train_context_length <= self.context_length:
            raise ConfigError(f"train_context_length must be in [2, context_length="
                              f"{self.context_length}], got {self.train_context_length}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.gumbel_tau <= 0 or self.mapping_scale <= 0:
            raise ConfigError(f"gumbel_tau and mapping_scale must be > 0, got "
                              f"{self.gumbel_tau} and {self.mapping_scale}")
        if self.max_logit_scale <= 0:
            raise ConfigError(f"max_logit_scale must be > 0, got {self.max_logit_scale}")
        if self.with_reconstruction and self.num_visible_patches < 1:
            raise ConfigError(f"mask_ratio {self.mask_ratio} leaves no visible patch of "
                              f"{self.num_patches}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_visible_patches(self) -> int:
        """Patches kept by the reconstruction mask: int((N + 1)(1 - ratio)) tokens minus CLS."""
        return int((self.num_patches + 1) * (1 - self.mask_ratio)) - 1

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        check_fields(cls, values)
        return cls(**values)


PATCH_STEMS = ("linear", "conv", "hybrid")  # segclip/model/stem.py


def check_stem(stem: str, patch_size: int) -> str | None:
    """Why `stem` cannot embed `patch_size` patches, or None."""
    if stem not in PATCH_STEMS:
        return f"patch_stem must be one of {PATCH_STEMS}, got {stem!r}"
    if stem != "linear" and (patch_size < 2 or patch_size & (patch_size - 1)):
        return f"patch_stem {stem!r} needs a power-of-two patch_size >= 2, got {patch_size}"
    return None


def check_fields(cls: type, names: Iterable[str]) -> None:
    """Raise ConfigError naming every one of `names` that is not a field of dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")


def _positive(config: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


PRESETS: dict[str, ModelConfig] = {
    "vit-b16": ModelConfig(),
    "tiny": ModelConfig(
        image_size=64,
        patch_size=8,
        vision_width=96,
        vision_layers=6,
        vision_heads=4,
        group_layer=4,
        num_centers=8,
        cross_layers=2,
        embed_dim=64,
        text_width=64,
        text_layers=4,
        text_heads=4,
        train_context_length=32,
        decoder_width=64,
        decoder_layers=3,
        decoder_heads=4,
    ),
}

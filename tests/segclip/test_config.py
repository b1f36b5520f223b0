"""ModelConfig (segclip/config.py): presets, validation messages, dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from segclip.config import PRESETS, ModelConfig
from segclip.errors import ConfigError, SegclipError


def test_vit_b16_preset_is_the_paper_model() -> None:
    # docs/official-implementation.md §1.1-1.3 and §2.3: ViT-B/16 at 224, group after block 10, 8
    # centers, 2 cross layers,
    # Gumbel tau 0.9, unscaled mapping, 512-d space, CLIP text tower, CLS + 48 visible patches.
    c = ModelConfig.preset("vit-b16")
    expected = dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                    vision_heads=12, group_layer=10, num_centers=8, cross_layers=2,
                    gumbel_tau=0.9, mapping_scale=1.0, embed_dim=512, vocab_size=49408,
                    context_length=77, train_context_length=32, text_width=512, text_layers=12,
                    text_heads=8, max_logit_scale=100.0, with_reconstruction=True,
                    mask_ratio=0.75, recon_layers=2, decoder_width=384, decoder_layers=3,
                    decoder_heads=8)
    assert {k: getattr(c, k) for k in expected} == expected
    assert (c.grid_size, c.num_patches, c.num_visible_patches) == (14, 196, 48)


def test_tiny_preset_is_small_and_consistent() -> None:
    c = ModelConfig.preset("tiny")
    assert (c.image_size, c.patch_size, c.grid_size, c.num_patches) == (64, 8, 8, 64)
    assert c.vision_width <= 128 and c.text_width <= 128 and c.embed_dim <= 128
    assert 1 <= c.group_layer < c.vision_layers  # blocks on both sides of the group
    assert c.num_visible_patches == int(65 * 0.25) - 1 == 15


def test_presets_registry_and_overrides() -> None:
    assert sorted(PRESETS) == ["tiny", "vit-b16"]
    assert ModelConfig.preset("vit-b16") == ModelConfig()  # the defaults are the paper
    c = ModelConfig.preset("tiny", num_centers=4, with_reconstruction=False)
    assert (c.num_centers, c.with_reconstruction) == (4, False)
    assert ModelConfig.preset("tiny").num_centers == 8  # the registry entry is untouched


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'vit-l14'; choose one of "
                                          r"\['tiny', 'vit-b16'\]"):
        ModelConfig.preset("vit-l14")


def test_config_is_frozen() -> None:
    c = ModelConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_centers = 3  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "match"), [
    ({"image_size": 0}, r"image_size must be a positive integer, got 0"),
    ({"patch_size": -8}, r"patch_size must be a positive integer, got -8"),
    ({"num_centers": 2.5}, r"num_centers must be a positive integer, got 2\.5"),
    ({"vision_width": True}, r"vision_width must be a positive integer, got True"),
    ({"text_heads": "8"}, r"text_heads must be a positive integer, got '8'"),
    ({"patch_size": 7}, r"image_size must be a multiple of patch_size \(7\), got 64"),
    ({"group_layer": 0}, r"group_layer must be in \[1, vision_layers=6\], got 0"),
    ({"group_layer": 7}, r"group_layer must be in \[1, vision_layers=6\], got 7"),
    ({"cross_layers": -1}, r"cross_layers must be >= 0, got -1"),
    ({"vision_heads": 5}, r"vision_width \(96\) must be divisible by vision_heads, got 5"),
    ({"text_heads": 3, "text_width": 64}, r"text_width \(64\) must be divisible by text_heads, "
                                          r"got 3"),
    ({"decoder_heads": 5}, r"decoder_width \(64\) must be divisible by decoder_heads, got 5"),
    ({"train_context_length": 78}, r"train_context_length must be in \[2, context_length=77\], "
                                   r"got 78"),
    ({"train_context_length": 1}, r"train_context_length must be in \[2, context_length=77\], "
                                  r"got 1"),
    ({"mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\), got 1\.0"),
    ({"mask_ratio": 0.0}, r"mask_ratio must be in \(0, 1\), got 0\.0"),
    ({"mask_ratio": 0.99}, r"mask_ratio 0\.99 leaves no visible patch of 64"),
    ({"gumbel_tau": 0.0}, r"gumbel_tau and mapping_scale must be > 0, got 0\.0 and 1\.0"),
    ({"mapping_scale": -1.0}, r"gumbel_tau and mapping_scale must be > 0, got 0\.9 and -1\.0"),
    ({"max_logit_scale": 0.0}, r"max_logit_scale must be > 0, got 0\.0"),
    ({"vision_mlp_ratio": 0.0}, r"vision_mlp_ratio must be > 0, got 0\.0"),
])
def test_invalid_values_name_the_field_and_value(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset("tiny", **overrides)


def test_config_error_is_a_value_error_and_a_segclip_error() -> None:
    with pytest.raises(ValueError) as info:
        ModelConfig.preset("tiny", image_size=0)
    assert isinstance(info.value, SegclipError)


def test_heavy_masking_is_allowed_without_reconstruction() -> None:
    c = ModelConfig.preset("tiny", mask_ratio=0.99, with_reconstruction=False)
    assert c.mask_ratio == 0.99


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name: str) -> None:
    c = ModelConfig.preset(name)
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # primitive values only (stored in checkpoints)
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == c
    assert set(d) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_from_dict_rejects_unknown_keys() -> None:
    d = ModelConfig.preset("tiny").to_dict() | {"num_groups": 8, "dropout": 0.1}
    with pytest.raises(ConfigError, match=r"unknown ModelConfig fields \['dropout', "
                                          r"'num_groups'\]; known: \["):
        ModelConfig.from_dict(d)


def test_from_dict_validates_values() -> None:
    d = ModelConfig.preset("tiny").to_dict() | {"num_centers": 0}
    with pytest.raises(ConfigError, match=r"num_centers must be a positive integer, got 0"):
        ModelConfig.from_dict(d)

"""segclip.convert: official SegCLIP layout <-> segclip, CLIP initialisation, safe reading.

The official layout is written out here from the reference's key list
(docs/official-implementation.md §5), and the
official inference forward literally from its description (§1.1-1.3), in plain torch ops on the
official-layout dict, so neither depends on the converter's name table or on our modules.
"""

from __future__ import annotations

import builtins
import json
import math
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segclip.config import ModelConfig
from segclip.convert import (
    export_official,
    infer_official_config,
    load_clip_state,
    load_clip_weights,
    load_official,
    load_official_state,
    official_state_dict,
    official_to_segclip_names,
    read_state_dict,
)
from segclip.errors import ConversionError
from segclip.model import SegCLIP

TOL = 1e-5


# ---- the official layout (docs/official-implementation.md §5)
# ------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    width: int = 768
    heads: int = 12
    layers0: int = 10
    layers2: int = 2
    patch: int = 16
    grid: int = 14
    centers: int = 8
    cross: int = 2
    embed: int = 512
    vocab: int = 49408
    context: int = 77
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    mae_layers: int = 2
    decoder_width: int = 384
    decoder_layers: int = 3


VIT_B16 = Sizes()
TINY = Sizes(width=48, heads=4, layers0=2, layers2=1, patch=8, grid=4, centers=4, embed=32,
             vocab=300, text_width=32, text_heads=4, text_layers=2, mae_layers=1,
             decoder_width=32, decoder_layers=2)


def _ln(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (d,), prefix + "bias": (d,)}


def _linear(prefix: str, d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (d_out, d_in), prefix + "bias": (d_out,)}


def _clip_block(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "attn.in_proj_weight": (3 * d, d), prefix + "attn.in_proj_bias": (3 * d,),
            **_linear(prefix + "attn.out_proj.", d, d), **_ln(prefix + "ln_1.", d),
            **_linear(prefix + "mlp.c_fc.", 4 * d, d), **_linear(prefix + "mlp.c_proj.", d, 4 * d),
            **_ln(prefix + "ln_2.", d)}


def official_layout(s: Sizes) -> dict[str, tuple[int, ...]]:
    """Every key of the released `segclip.bin` with its shape, for model sizes `s`."""
    d, w, e, n = s.width, s.text_width, s.embed, s.grid ** 2
    trunk, sem = "clip.visual.transformer.", "clip.visual.transformer.semantic_layer2."
    shapes = {"clip.positional_embedding": (s.context, w), "clip.text_projection": (w, e),
              "clip.logit_scale": (), "clip.token_embedding.weight": (s.vocab, w),
              **_ln("clip.ln_final.", w)}
    for i in range(s.text_layers):
        shapes |= _clip_block(f"clip.transformer.resblocks.{i}.", w)
    shapes |= {"clip.visual.class_embedding": (d,), "clip.visual.positional_embedding": (n + 1, d),
               "clip.visual.conv1.weight": (d, 3, s.patch, s.patch), "clip.visual.proj": (d, e),
               **_ln("clip.visual.ln_pre.", d), **_ln("clip.visual.ln_post.", d)}
    for i in range(s.layers0):
        shapes |= _clip_block(f"{trunk}layers0.{i}.", d)
    for j in range(s.layers2):
        shapes |= _clip_block(f"{trunk}layers2.{j}.", d)
    shapes |= {sem + "semantic_center": (s.centers, d), **_ln(sem + "norm.", d),
               **_ln(sem + "cross_ln.", d), sem + "k_conv.weight": (d, d // s.heads, 1),
               **_ln(sem + "k_ln.", d), sem + "v_conv.weight": (d, d // s.heads, 1),
               **_ln(sem + "proj_o.ln.", d), **_linear(sem + "proj_o.mlp.fc1.", 4 * d, d),
               **_linear(sem + "proj_o.mlp.fc2.", d, 4 * d)}
    for i in range(s.cross):
        p = f"{sem}cross_att.{i}."
        shapes |= {p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
                   **_linear(p + "attn.out_proj.", d, d), **_ln(p + "ln_x.", d),
                   **_ln(p + "ln_k.", d), **_linear(p + "mlp.c_fc.", 4 * d, d),
                   **_linear(p + "mlp.c_proj.", d, 4 * d), **_ln(p + "ln_2.", d)}
    for j in range(s.mae_layers):
        shapes |= _clip_block(f"{trunk}layers_mae2.{j}.", d)
    shapes |= _linear(trunk + "reconstruct_layer2.rec_proj_a.a_fc.", s.centers, s.centers)
    return shapes | _decoder_layout(s)


def _decoder_layout(s: Sizes) -> dict[str, tuple[int, ...]]:
    m, dec = s.decoder_width, "vis_mae_decoder."
    shapes = {dec + "mask_token": (1, 1, m), dec + "decoder_pos_embed": (1, s.grid ** 2 + 1, m),
              **_linear(dec + "decoder_embed.", m, s.width), **_ln(dec + "decoder_norm.", m),
              **_linear(dec + "decoder_pred.", s.patch * s.patch * 3, m)}
    for i in range(s.decoder_layers):
        p = f"{dec}decoder_blocks.{i}."
        shapes |= {**_ln(p + "norm1.", m), **_linear(p + "attn.qkv.", 3 * m, m),
                   **_linear(p + "attn.proj.", m, m), **_ln(p + "norm2.", m),
                   **_linear(p + "mlp.fc1.", 4 * m, m), **_linear(p + "mlp.fc2.", m, 4 * m)}
    return shapes


def official_state(s: Sizes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors in the official layout (LN weights near 1, the rest ~N(0, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_layout(s).items():
        value = 0.1 * torch.randn(shape, generator=gen)
        is_norm_weight = name.endswith("weight") and any(
            f"{ln}." in name for ln in ("ln_1", "ln_2", "ln_x", "ln_k", "ln_pre", "ln_post",
                                       "ln_final", "norm", "cross_ln", "k_ln", "proj_o.ln",
                                       "norm1", "norm2", "decoder_norm"))
        state[name] = 1.0 + value if is_norm_weight else value
    return state


def test_vit_b16_layout_matches_the_reference() -> None:
    shapes = official_layout(VIT_B16)
    # shapes listed in docs/official-implementation.md §5
    sem = "clip.visual.transformer.semantic_layer2."
    listed = {"clip.positional_embedding": (77, 512), "clip.text_projection": (512, 512),
              "clip.logit_scale": (), "clip.token_embedding.weight": (49408, 512),
              "clip.transformer.resblocks.11.attn.in_proj_weight": (1536, 512),
              "clip.transformer.resblocks.0.mlp.c_fc.weight": (2048, 512),
              "clip.visual.class_embedding": (768,), "clip.visual.positional_embedding": (197, 768),
              "clip.visual.conv1.weight": (768, 3, 16, 16), "clip.visual.proj": (768, 512),
              "clip.visual.transformer.layers0.9.attn.in_proj_weight": (2304, 768),
              "clip.visual.transformer.layers2.1.mlp.c_fc.weight": (3072, 768),
              sem + "semantic_center": (8, 768),
              sem + "cross_att.1.attn.in_proj_weight": (2304, 768),
              sem + "k_conv.weight": (768, 64, 1), sem + "v_conv.weight": (768, 64, 1),
              sem + "proj_o.mlp.fc1.weight": (3072, 768),
              "clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.weight": (8, 8),
              "clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.bias": (8,),
              "vis_mae_decoder.mask_token": (1, 1, 384),
              "vis_mae_decoder.decoder_pos_embed": (1, 197, 384),
              "vis_mae_decoder.decoder_embed.weight": (384, 768),
              "vis_mae_decoder.decoder_blocks.2.attn.qkv.weight": (1152, 384),
              "vis_mae_decoder.decoder_blocks.0.mlp.fc1.weight": (1536, 384),
              "vis_mae_decoder.decoder_pred.weight": (768, 384)}
    assert {k: shapes[k] for k in listed} == listed
    # parameter counts of docs/official-implementation.md §5 (in millions, one decimal)
    count = lambda pred: sum(math.prod(v) for k, v in shapes.items() if pred(k)) / 1e6
    trunk = "clip.visual.transformer."
    visual = lambda k: k.startswith("clip.visual.") and not k.startswith(
        (sem, trunk + "layers_mae2", trunk + "reconstruct_layer2"))
    assert round(count(lambda k: True), 1) == 188.8
    assert round(count(lambda k: k.startswith("clip.") and not k.startswith("clip.visual.")
                       and k != "clip.logit_scale"), 1) == 63.4
    assert round(count(visual), 1) == 86.2
    assert round(count(lambda k: k.startswith(sem)), 1) == 19.0
    assert round(count(lambda k: k.startswith(trunk + "layers_mae2")), 1) == 14.2
    assert round(count(lambda k: k.startswith("vis_mae_decoder.")), 1) == 6.0
    # ... and it maps one-to-one onto the vit-b16 preset (meta tensors: no memory, no init)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = infer_official_config(meta)
    assert config == ModelConfig.preset("vit-b16")
    with torch.device("meta"):
        model_shapes = {k: tuple(v.shape) for k, v in SegCLIP(config).state_dict().items()}
    names = official_to_segclip_names(shapes, config)
    assert None not in names.values()
    assert {names[k]: v for k, v in shapes.items()} == model_shapes


@pytest.fixture(scope="module")
def tiny_official() -> dict[str, torch.Tensor]:
    return official_state(TINY)


@pytest.fixture(scope="module")
def tiny_converted(tiny_official: dict[str, torch.Tensor]) -> SegCLIP:
    model, report = load_official_state(tiny_official, text_heads=TINY.text_heads)
    assert len(report.loaded) == len(tiny_official)
    assert report.missing == report.unexpected == report.ignored == ()
    return model


def test_official_tensors_land_in_place(tiny_official: dict[str, torch.Tensor],
                                        tiny_converted: SegCLIP) -> None:
    model, o = tiny_converted, tiny_official
    sem, trunk = "clip.visual.transformer.semantic_layer2.", "clip.visual.transformer."
    config = model.config
    assert (config.vision_width, config.vision_heads, config.group_layer, config.vision_layers,
            config.num_centers, config.image_size, config.text_heads) == (48, 4, 2, 3, 4, 32, 4)
    state = model.state_dict()
    expected = {
        "logit_scale": "clip.logit_scale",
        "visual.class_embedding": "clip.visual.class_embedding",
        "visual.transformer.resblocks.1.attn.in_proj_weight":
            trunk + "layers0.1.attn.in_proj_weight",
        "visual.transformer.resblocks.2.mlp.c_proj.bias": trunk + "layers2.0.mlp.c_proj.bias",
        "transformer.resblocks.1.ln_2.weight": "clip.transformer.resblocks.1.ln_2.weight",
        "group.centers": sem + "semantic_center",
        "group.cross_blocks.1.ln_1.weight": sem + "cross_att.1.ln_x.weight",
        "group.cross_blocks.1.ln_1_kv.bias": sem + "cross_att.1.ln_k.bias",
        "group.cross_blocks.0.attn.out_proj.weight": sem + "cross_att.0.attn.out_proj.weight",
        "group.ln_query.weight": sem + "cross_ln.weight",
        "group.key_proj.conv.weight": sem + "k_conv.weight",
        "group.value_proj.conv.weight": sem + "v_conv.weight",
        "group.key_ln.bias": sem + "k_ln.bias",
        "group.out_mlp.fc2.weight": sem + "proj_o.mlp.fc2.weight",
        "reconstruction.mix.weight": trunk + "reconstruct_layer2.rec_proj_a.a_fc.weight",
        "reconstruction.blocks.0.attn.in_proj_bias": trunk + "layers_mae2.0.attn.in_proj_bias",
        "reconstruction.decoder.pos_embed": "vis_mae_decoder.decoder_pos_embed",
        "reconstruction.decoder.blocks.1.attn.in_proj_weight":
            "vis_mae_decoder.decoder_blocks.1.attn.qkv.weight",
        "reconstruction.decoder.blocks.0.attn.out_proj.bias":
            "vis_mae_decoder.decoder_blocks.0.attn.proj.bias",
        "reconstruction.decoder.blocks.1.mlp.c_fc.weight":
            "vis_mae_decoder.decoder_blocks.1.mlp.fc1.weight",
        "reconstruction.decoder.pred.bias": "vis_mae_decoder.decoder_pred.bias",
    }
    for ours, official in expected.items():
        assert torch.equal(state[ours], o[official]), ours
    # every official tensor appears exactly once among ours
    assert sorted(map(_key, o.values())) == sorted(map(_key, state.values()))
    # grouped conv: block g of the equivalent block-diagonal Linear is weight[g*c:(g+1)*c, :, 0]
    c = 48 // 4
    tokens = torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(1))  # (B, N, D)
    out = model.group.key_proj(tokens)[0]  # (N, D)
    weight = o[sem + "k_conv.weight"]
    block_diagonal = torch.block_diag(*[weight[g * c:(g + 1) * c, :, 0] for g in range(4)])
    torch.testing.assert_close(out, tokens[0] @ block_diagonal.T, atol=TOL, rtol=0)


def _key(t: torch.Tensor) -> tuple:
    """A fingerprint of a tensor's shape and values."""
    t = t.double()
    return tuple(t.shape), round(float(t.sum()), 6), round(float(t.abs().max()), 6)


def test_to_official_gives_the_identical_dict_back(tiny_official: dict[str, torch.Tensor],
                                                   tiny_converted: SegCLIP, tmp_path: Path) -> None:
    back = official_state_dict(tiny_converted)
    assert list(back) and set(back) == set(tiny_official)
    assert all(torch.equal(back[k], tiny_official[k]) for k in back)
    # through files: official -> ckpt (CLI path) -> official, prefix-less and DDP-prefixed input
    source = tmp_path / "segclip.bin"
    torch.save({"module." + k.removeprefix("clip."): v for k, v in tiny_official.items()}, source)
    from segclip.convert import convert_official

    convert_official(source, tmp_path / "ckpt.pt", text_heads=TINY.text_heads)
    export_official(tmp_path / "ckpt.pt", tmp_path / "back.bin")
    again = torch.load(tmp_path / "back.bin", weights_only=True)
    assert set(again) == set(tiny_official)
    assert all(torch.equal(again[k], tiny_official[k]) for k in again)


def test_inference_only_drops_the_reconstruction_branch(
        tiny_official: dict[str, torch.Tensor]) -> None:
    model, report = load_official_state(tiny_official, text_heads=4, inference_only=True)
    assert model.reconstruction is None and not model.config.with_reconstruction
    branch = ("vis_mae_decoder.", "clip.visual.transformer.layers_mae2.",
              "clip.visual.transformer.reconstruct_layer2.")
    assert report.ignored and all(k.startswith(branch) for k in report.ignored)
    assert {k for k in tiny_official if k.startswith(branch)} == set(report.ignored)
    # an inference-only file (no reconstruction keys at all) converts the same way
    dropped = set(report.ignored)
    inference_keys = {k: v for k, v in tiny_official.items() if k not in dropped}
    model2, report2 = load_official_state(inference_keys, text_heads=4)
    assert model2.reconstruction is None and report2.ignored == ()


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("clip.visual.transformer.semantic_layer2.k_ln.bias"), "not filled.*key_ln"),
    (lambda s: s.__setitem__("clip.visual.transformer.semantic_layer2.extra", torch.zeros(1)),
     "unexpected.*semantic_layer2.extra"),
    (lambda s: s.__setitem__("clip.visual.ln_post.weight", torch.zeros(5)), "shape mismatch"),
    (lambda s: s.pop("vis_mae_decoder.decoder_norm.weight"), "not filled.*decoder.norm.weight"),
    (lambda s: s.pop("clip.visual.transformer.semantic_layer2.semantic_center"),
     "not an official SegCLIP"),
])
def test_unplaced_or_unfilled_keys_are_errors(tiny_official: dict[str, torch.Tensor], edit,
                                              match: str) -> None:
    state = dict(tiny_official)
    edit(state)
    with pytest.raises(ConversionError, match=match):
        load_official_state(state, text_heads=4)


def test_text_heads_must_be_given_when_width_is_not_a_multiple_of_64(
        tiny_official: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ConversionError, match="text width 32 .* pass text_heads"):
        infer_official_config(tiny_official)
    assert infer_official_config(tiny_official, text_heads=2).text_heads == 2


# ---- the official inference forward, literally from docs/official-implementation.md §1
# ---------------------------
def _layer_norm(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[p + "weight"] + sd[p + "bias"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _attention(q_in: torch.Tensor, kv_in: torch.Tensor, sd: dict, p: str, heads: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention of one sample: (Lq, D) queries, (Lk, D) keys/values."""
    d = q_in.shape[-1]
    hd = d // heads
    w, b = sd[p + "in_proj_weight"], sd[p + "in_proj_bias"]
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d:2 * d].T + b[d:2 * d]
    v = kv_in @ w[2 * d:].T + b[2 * d:]
    out = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        if mask is not None:
            scores = scores + mask
        out.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    return torch.cat(out, dim=-1) @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]


def _mlp(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    hidden = _quick_gelu(x @ sd[p + "c_fc.weight"].T + sd[p + "c_fc.bias"])
    return hidden @ sd[p + "c_proj.weight"].T + sd[p + "c_proj.bias"]


def _clip_block_forward(x: torch.Tensor, sd: dict, p: str, heads: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    h = _layer_norm(x, sd, p + "ln_1.")
    x = x + _attention(h, h, sd, p + "attn.", heads, mask)
    return x + _mlp(_layer_norm(x, sd, p + "ln_2."), sd, p + "mlp.")


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Conv1d(D, D, 1, groups, bias=False) on (N, D) tokens, one group at a time."""
    c = x.shape[-1] // groups
    return torch.cat([x[:, g * c:(g + 1) * c] @ weight[g * c:(g + 1) * c, :, 0].T
                      for g in range(groups)], dim=-1)


def official_encode_image(sd: dict, image: torch.Tensor, s: Sizes):
    """One image (3, H, W) -> (global (E,), regions (L, E), soft (L, N), hard (L, N))."""
    v, sem = "clip.visual.", "clip.visual.transformer.semantic_layer2."
    x = F.conv2d(image[None], sd[v + "conv1.weight"], stride=s.patch)[0]  # (D, g, g)
    x = x.flatten(1).T  # (N, D)
    x = torch.cat([sd[v + "class_embedding"][None], x]) + sd[v + "positional_embedding"]
    x = _layer_norm(x, sd, v + "ln_pre.")[1:]  # CLS dropped: (N, D)
    for i in range(s.layers0):
        x = _clip_block_forward(x, sd, f"{v}transformer.layers0.{i}.", s.heads)
    # semantic module (§1.2)
    xn = _layer_norm(x, sd, sem + "norm.")
    q = sd[sem + "semantic_center"]  # (L, D)
    for i in range(s.cross):
        p = f"{sem}cross_att.{i}."
        kv = _layer_norm(torch.cat([q, x]), sd, p + "ln_k.")  # (L+N, D), raw X
        q = q + _attention(_layer_norm(q, sd, p + "ln_x."), kv, sd, p + "attn.", s.heads)
        q = q + _mlp(_layer_norm(q, sd, p + "ln_2."), sd, p + "mlp.")
    qf = _layer_norm(q, sd, sem + "cross_ln.")
    k = _layer_norm(_grouped_conv(xn, sd[sem + "k_conv.weight"], s.heads), sd, sem + "k_ln.")
    logits = qf @ k.T  # (L, N), no 1/sqrt(d)
    soft = torch.softmax(logits, dim=0)  # over centers
    hard = F.one_hot(soft.argmax(dim=0), s.centers).T.float()  # (L, N)
    value = _grouped_conv(xn, sd[sem + "v_conv.weight"], s.heads)
    region = hard @ value / hard.sum(dim=1, keepdim=True).clamp_min(1)
    h = _layer_norm(qf + region, sd, sem + "proj_o.ln.")
    h = h @ sd[sem + "proj_o.mlp.fc1.weight"].T + sd[sem + "proj_o.mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    h = h @ sd[sem + "proj_o.mlp.fc2.weight"].T + sd[sem + "proj_o.mlp.fc2.bias"]
    tokens = _quick_gelu(h)  # no residual
    for j in range(s.layers2):
        tokens = _clip_block_forward(tokens, sd, f"{v}transformer.layers2.{j}.", s.heads)
    tokens = torch.cat([tokens.max(dim=0).values[None], tokens])  # (1+L, D)
    out = _layer_norm(tokens, sd, v + "ln_post.") @ sd[v + "proj"]
    return out[0], out[1:], soft, hard


def official_encode_text(sd: dict, tokens: torch.Tensor, s: Sizes) -> torch.Tensor:
    """One token row (C,) -> (E,) feature at the EOT token."""
    c = tokens.shape[0]
    x = sd["clip.token_embedding.weight"][tokens] + sd["clip.positional_embedding"][:c]
    mask = torch.full((c, c), float("-inf")).triu(1)
    for i in range(s.text_layers):
        x = _clip_block_forward(x, sd, f"clip.transformer.resblocks.{i}.", s.text_heads, mask)
    x = _layer_norm(x, sd, "clip.ln_final.")
    return x[tokens.argmax()] @ sd["clip.text_projection"]


def test_converted_model_matches_the_literal_official_forward(
        tiny_official: dict[str, torch.Tensor], tiny_converted: SegCLIP) -> None:
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    for row, length in enumerate((5, 12)):
        tokens[row, 0] = TINY.vocab - 2  # SOT
        tokens[row, 1:length - 1] = torch.randint(1, TINY.vocab - 2, (length - 2,), generator=gen)
        tokens[row, length - 1] = TINY.vocab - 1  # EOT: the largest id
    with torch.no_grad():
        ours = tiny_converted.encode_image(images)
        text = tiny_converted.encode_text(tokens)
        for b in range(2):  # batch 1, as the official evaluation
            global_ref, regions_ref, soft, hard = official_encode_image(tiny_official, images[b],
                                                                        TINY)
            g = TINY.grid
            assert (ours.global_embedding[b] - F.normalize(global_ref, dim=-1)).abs().max() <= TOL
            assert (ours.regions[b] - F.normalize(regions_ref, dim=-1)).abs().max() <= TOL
            assert (ours.assign[b] - soft.reshape(-1, g, g)).abs().max() <= TOL
            assert torch.equal(ours.hard[b], hard.reshape(-1, g, g))
            text_ref = official_encode_text(tiny_official, tokens[b], TINY)
            assert (text[b] - F.normalize(text_ref, dim=-1)).abs().max() <= TOL
    assert len(set(hard.argmax(0).tolist())) > 1  # the check saw a non-trivial assignment


# ---- CLIP initialisation ------------------------------------------------------------------
def test_clip_weights_round_trip_vit_b16(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path / "open_clip_vit_b16.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v
                                           for k, v in reference.state_dict().items()}}, path)
    model = SegCLIP(ModelConfig.preset("vit-b16", with_reconstruction=False)).eval()
    report = load_clip_weights(model, path)
    assert report.unexpected == () and report.missing
    assert all(n.startswith("group.") for n in report.missing)
    assert len(report.loaded) == len(reference.state_dict())
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 224, 224, generator=gen)
    with torch.no_grad():
        ours = model.forward_patches(model.embed_patches(image)[0])  # (1, 196, 768)
        visual = reference.visual
        x = visual.conv1(image).flatten(2).transpose(1, 2)  # (1, 196, 768)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x)[:, 1:]
        for block in visual.transformer.resblocks[:10]:
            x = block(x)
        assert (ours - x).abs().max() <= TOL
        tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat.", "a dog"])  # (2, 77)
        text = model.encode_text(tokens)
        assert (text - reference.encode_text(tokens, normalize=True)).abs().max() <= TOL


def _tiny_open_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    return CLIP(c.embed_dim, CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width,
                                           head_width=c.vision_width // c.vision_heads,
                                           patch_size=c.patch_size, image_size=c.image_size),
                CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size,
                            width=c.text_width, heads=c.text_heads, layers=c.text_layers),
                quick_gelu=True)


def test_torchscript_archive_is_read_without_running_code(tmp_path: Path) -> None:
    scripted = torch.jit.script(_tiny_open_clip())
    path = tmp_path / "ViT-tiny.pt"
    scripted.save(str(path))
    state = read_state_dict(path, "CLIP")
    jit_state = torch.jit.load(str(path)).state_dict()  # our own archive: trusted here
    assert set(state) == set(jit_state)
    assert all(torch.equal(state[k], jit_state[k]) for k in state)
    model = SegCLIP(ModelConfig.preset("tiny"))
    report = load_clip_state(model, state, str(path))
    assert "attn_mask" in report.ignored and report.unexpected == ()
    assert torch.equal(model.visual.proj, jit_state["visual.proj"])


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    return pickle.dumps(Evil(), protocol=2)


def test_code_running_torchscript_archive_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(good))
    evil, marker = tmp_path / "evil.pt", tmp_path / "marker"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, _evil_pickle(marker) if item.filename.endswith("/data.pkl")
                         else data)
    with pytest.raises(ConversionError, match=r"global __builtin__\.exec"):
        read_state_dict(evil, "CLIP")
    assert not marker.exists()


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.bin", tmp_path / "marker"
    path.write_bytes(_evil_pickle(marker))
    with pytest.raises(ConversionError, match="refusing"):
        load_official(path)
    assert not marker.exists()


def test_clip_shape_mismatch_and_wrong_files_are_errors(
        tiny_official: dict[str, torch.Tensor]) -> None:
    model = SegCLIP(ModelConfig.preset("tiny", with_reconstruction=False))
    state = _tiny_open_clip().state_dict()
    state["visual.proj"] = torch.zeros(96, 32)
    with pytest.raises(ConversionError, match="shapes differ.*visual.proj"):
        load_clip_state(model, state)
    with pytest.raises(ConversionError, match="segclip-convert official"):
        load_clip_state(model, tiny_official)
    with pytest.raises(ConversionError, match="lacks"):
        load_clip_state(model, {"weight": torch.zeros(2)})


def test_converted_official_model_exports_and_runs_through_segclip_run(tmp_path: Path) -> None:
    """official segclip.bin -> segclip-convert -> segclip-export onnx -> segclip-run."""
    from PIL import Image
    from typer.testing import CliRunner

    from segclip.cli.convert import app as convert_app
    from segclip.export.cli import app as export_app
    from segclip.runtime.cli import app as run_app

    sizes = replace(TINY, vocab=49408)  # the real CLIP vocabulary, so the runtime tokenizer fits
    torch.save(official_state(sizes, seed=3), tmp_path / "segclip.bin")
    runner = CliRunner()
    steps = [
        (convert_app, ["official", str(tmp_path / "segclip.bin"), "--out",
                       str(tmp_path / "ckpt.pt"), "--text-heads", "4"]),
        (export_app, ["onnx", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "bundle")]),
    ]
    for app, args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 37), (200, 30, 30)).save(image)
    (tmp_path / "labels.txt").write_text("red thing\nsky\n")
    result = runner.invoke(run_app, ["--engine", str(tmp_path / "bundle"), "--labels",
                                     str(tmp_path / "labels.txt"), "--out",
                                     str(tmp_path / "run"), "--device", "cpu", str(image)])
    assert result.exit_code == 0, result.output
    label_map = np.asarray(Image.open(tmp_path / "run" / "photo.png"))
    assert label_map.shape == (37, 50) and label_map.max() <= 2
    summary = json.loads((tmp_path / "run" / "photo.json").read_text())
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)

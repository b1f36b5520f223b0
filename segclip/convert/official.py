"""The released official SegCLIP checkpoint (`segclip.bin`) <-> segclip
(docs/official-implementation.md §5).

In the spirit of timm's `checkpoint_filter_fn`: a table of name pairs maps every official key onto
a segclip parameter, the `ModelConfig` is inferred from the tensor shapes (so any size converts,
not only ViT-B/16), and nothing is guessed: a key without a place, a parameter left unfilled or a
shape that differs is an error. The official file is `model.state_dict()` of the official
`SegCLIP`: CLIP under `clip.` (its image blocks split into `layers0` before and `layers2` after
the semantic module), the MAE decoder under `vis_mae_decoder.`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from segclip.checkpoint import (
    atomic_torch_save,
    file_sha256,
    model_from_payload,
    read_checkpoint,
    save_checkpoint,
)
from segclip.config import ModelConfig
from segclip.convert._io import read_state_dict
from segclip.convert.report import LoadReport
from segclip.errors import ConfigError, ConversionError
from segclip.model import SegCLIP

CLIP = "clip."
DECODER = "vis_mae_decoder."
TRUNK = "clip.visual.transformer."
SEMANTIC = TRUNK + "semantic_layer2."
_RECONSTRUCTION_PREFIXES = (TRUNK + "layers_mae2.", TRUNK + "reconstruct_layer2.", DECODER)
_OFFICIAL_MAPPING_SCALE = 1.0
_OPENAI_HEAD_WIDTH = 64
_OFFICIAL_DECODER_HEADS = 8


def name_pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(official, segclip) name pairs; a name ending in "." is a prefix, any other is exact."""
    c = config
    pairs = [(CLIP + n, n) for n in ("positional_embedding", "text_projection", "logit_scale",
                                     "token_embedding.", "ln_final.", "visual.class_embedding",
                                     "visual.positional_embedding", "visual.proj",
                                     "visual.conv1.", "visual.ln_pre.", "visual.ln_post.")]
    pairs += [(f"{CLIP}transformer.resblocks.{i}.", f"transformer.resblocks.{i}.")
              for i in range(c.text_layers)]
    pairs += [(f"{TRUNK}layers0.{i}.", f"visual.transformer.resblocks.{i}.")
              for i in range(c.group_layer)]
    pairs += [(f"{TRUNK}layers2.{j}.", f"visual.transformer.resblocks.{c.group_layer + j}.")
              for j in range(c.vision_layers - c.group_layer)]
    pairs += [(SEMANTIC + a, "group." + b) for a, b in (
        ("semantic_center", "centers"), ("norm.", "norm."), ("cross_ln.", "ln_query."),
        ("k_conv.", "key_proj.conv."), ("k_ln.", "key_ln."), ("v_conv.", "value_proj.conv."),
        ("proj_o.ln.", "out_mlp.ln."), ("proj_o.mlp.fc1.", "out_mlp.fc1."),
        ("proj_o.mlp.fc2.", "out_mlp.fc2."))]
    for i in range(c.cross_layers):
        pairs += [(f"{SEMANTIC}cross_att.{i}.{a}", f"group.cross_blocks.{i}.{b}") for a, b in (
            ("ln_x.", "ln_1."), ("ln_k.", "ln_1_kv."), ("attn.", "attn."), ("ln_2.", "ln_2."),
            ("mlp.", "mlp."))]
    if c.with_reconstruction:
        pairs += _reconstruction_pairs(c)
    return pairs


def _reconstruction_pairs(c: ModelConfig) -> list[tuple[str, str]]:
    pairs = [(f"{TRUNK}layers_mae2.{j}.", f"reconstruction.blocks.{j}.")
             for j in range(c.recon_layers)]
    pairs.append((TRUNK + "reconstruct_layer2.rec_proj_a.a_fc.", "reconstruction.mix."))
    pairs += [(DECODER + a, "reconstruction.decoder." + b) for a, b in (
        ("mask_token", "mask_token"), ("decoder_pos_embed", "pos_embed"),
        ("decoder_embed.", "embed."), ("decoder_norm.", "norm."), ("decoder_pred.", "pred."))]
    for i in range(c.decoder_layers):  # timm Block -> open_clip ResidualAttentionBlock
        pairs += [(f"{DECODER}decoder_blocks.{i}.{a}", f"reconstruction.decoder.blocks.{i}.{b}")
                  for a, b in (("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"),
                               ("attn.qkv.bias", "attn.in_proj_bias"),
                               ("attn.proj.", "attn.out_proj."), ("norm2.", "ln_2."),
                               ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))]
    return pairs


def _rename(names: Iterable[str], pairs: list[tuple[str, str]]) -> dict[str, str | None]:
    """name -> renamed name by its exact pair or longest matching prefix; None if none match."""
    exact = {a: b for a, b in pairs if not a.endswith(".")}
    prefixes = sorted(((a, b) for a, b in pairs if a.endswith(".")), key=lambda p: -len(p[0]))
    renamed: dict[str, str | None] = {}
    for name in names:
        renamed[name] = exact.get(name)
        if renamed[name] is None:
            renamed[name] = next((b + name[len(a):] for a, b in prefixes if name.startswith(a)),
                                 None)
    return renamed


def official_to_segclip_names(names: Iterable[str], config: ModelConfig,
                              ) -> dict[str, str | None]:
    """Canonical official name -> segclip name (None: no place in a model of `config`)."""
    return _rename(names, name_pairs(config))


def segclip_to_official_names(names: Iterable[str], config: ModelConfig,
                              ) -> dict[str, str | None]:
    """segclip name -> canonical official name (None: the official model has no such tensor)."""
    return _rename(names, [(b, a) for a, b in name_pairs(config)])


def canonical_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix `clip.` where the file left it out (a saved `model.clip` or a stripped dict)."""
    return {name if name.startswith((CLIP, DECODER)) else CLIP + name: tensor
            for name, tensor in state.items()}


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered sub-modules `prefix{i}.` (checked to be 0..n-1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for name in state if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise ConversionError(f"blocks {prefix}* are numbered {sorted(found)}, not 0..n-1")
    return len(found)


def _tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in state:
        raise ConversionError(f"official SegCLIP key {name!r} is missing; the config cannot be "
                              f"inferred without it")
    return state[name]


def _heads(width: int, heads: int | None, what: str, option: str) -> int:
    if heads is not None:
        return heads
    if width % _OPENAI_HEAD_WIDTH:
        raise ConversionError(f"{what} width {width} is not a multiple of 64, so its head count "
                              f"cannot follow the OpenAI rule width/64; pass {option}")
    return width // _OPENAI_HEAD_WIDTH


def infer_official_config(state: dict[str, torch.Tensor], text_heads: int | None = None,
                          decoder_heads: int | None = None) -> ModelConfig:
    """The `ModelConfig` of a canonical official state dict, read off its tensor shapes.

    Vision heads = width / (in-channels per group of `k_conv`, weight (D, D/heads, 1)); text
    heads = width/64 (the OpenAI rule) and decoder heads = 8 (the official MAE decoder) unless
    given, as shapes do not determine them.
    """
    conv1 = _tensor(state, CLIP + "visual.conv1.weight")  # (D, 3, p, p)
    width, patch = conv1.shape[0], conv1.shape[-1]
    positions = _tensor(state, CLIP + "visual.positional_embedding").shape[0]  # 1 + grid^2
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ConversionError(f"visual.positional_embedding has {positions} rows, not 1 + a "
                              f"square number of patches")
    k_conv = _tensor(state, SEMANTIC + "k_conv.weight")  # (D, D/heads, 1)
    if k_conv.ndim != 3 or width % k_conv.shape[1]:
        raise ConversionError(f"k_conv.weight has shape {tuple(k_conv.shape)}; expected a "
                              f"grouped 1x1 conv weight ({width}, {width}/heads, 1)")
    group_layer = _count(state, TRUNK + "layers0.")
    c_fc = _tensor(state, f"{TRUNK}layers0.0.mlp.c_fc.weight")  # (D*ratio, D)
    token_embedding = _tensor(state, CLIP + "token_embedding.weight")  # (V, W)
    text_width = token_embedding.shape[1]
    text_fc = _tensor(state, f"{CLIP}transformer.resblocks.0.mlp.c_fc.weight")  # (4W, W)
    if text_fc.shape[0] != 4 * text_width:
        raise ConversionError(f"text MLP width {text_fc.shape[0]} is not 4 x {text_width}; "
                              f"segclip's text tower has MLP ratio 4")
    values = dict(
        image_size=grid * patch, patch_size=patch, vision_width=width,
        vision_layers=group_layer + _count(state, TRUNK + "layers2."),
        vision_heads=width // k_conv.shape[1], vision_mlp_ratio=c_fc.shape[0] / width,
        group_layer=group_layer,
        num_centers=_tensor(state, SEMANTIC + "semantic_center").shape[0],
        cross_layers=_count(state, SEMANTIC + "cross_att."),
        embed_dim=_tensor(state, CLIP + "visual.proj").shape[1],
        vocab_size=token_embedding.shape[0],
        context_length=_tensor(state, CLIP + "positional_embedding").shape[0],
        text_width=text_width, text_layers=_count(state, CLIP + "transformer.resblocks."),
        text_heads=_heads(text_width, text_heads, "text", "text_heads (--text-heads)"),
        mapping_scale=_OFFICIAL_MAPPING_SCALE,
        with_reconstruction=any(n.startswith(_RECONSTRUCTION_PREFIXES) for n in state),
    )
    values["train_context_length"] = min(ModelConfig.train_context_length,
                                         values["context_length"])
    if values["with_reconstruction"]:
        decoder_width = _tensor(state, DECODER + "decoder_embed.weight").shape[0]
        values.update(recon_layers=_count(state, TRUNK + "layers_mae2."),
                      decoder_width=decoder_width,
                      decoder_layers=_count(state, DECODER + "decoder_blocks."),
                      decoder_heads=decoder_heads or _OFFICIAL_DECODER_HEADS)
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise ConversionError(f"the tensor shapes give an invalid model config: {e} (pass "
                              f"text_heads / decoder_heads where shapes cannot tell)") from e


def load_official_state(state: dict[str, torch.Tensor], source: str = "<state dict>",
                        text_heads: int | None = None, decoder_heads: int | None = None,
                        inference_only: bool = False) -> tuple[SegCLIP, LoadReport]:
    """Build the SegCLIP of an official state dict and fill every one of its tensors.

    Args:
        state: the official `model.state_dict()`, with or without the `clip.` prefix.
        inference_only: drop the reconstruction branch (listed as ignored in the report).

    Raises:
        ConversionError: the dict is not an official SegCLIP state dict, or a key has no place,
            a parameter is left unfilled, or a shape differs.
    """
    state = canonical_official(state)
    if SEMANTIC + "semantic_center" not in state:
        hint = (" It looks like CLIP weights: use `segclip-convert clip`."
                if CLIP + "visual.transformer.resblocks.0.ln_1.weight" in state else "")
        raise ConversionError(f"{source} is not an official SegCLIP state dict: it has no "
                              f"{SEMANTIC}semantic_center.{hint}")
    ignored = tuple(n for n in state
                    if inference_only and n.startswith(_RECONSTRUCTION_PREFIXES))
    dropped = frozenset(ignored)
    state = {n: t for n, t in state.items() if n not in dropped}
    config = infer_official_config(state, text_heads, decoder_heads)
    model = SegCLIP(config)
    renamed = _place(state, official_to_segclip_names(state, config), model, source)
    model.load_state_dict(renamed, strict=True)
    notes = (f"inferred config: vision {config.vision_layers} layers x {config.vision_width} "
             f"({config.vision_heads} heads, from k_conv groups), group after block "
             f"{config.group_layer}, {config.num_centers} centers; text {config.text_layers} "
             f"layers x {config.text_width} ({config.text_heads} heads, "
             f"{'given' if text_heads else 'width/64 rule'})",)
    return model.eval(), LoadReport(source=source, loaded=tuple(renamed), ignored=ignored,
                                    config=config, notes=notes)


def _place(state: dict[str, torch.Tensor], names: dict[str, str | None], model: SegCLIP,
           source: str) -> dict[str, torch.Tensor]:
    """Rename `state` into `model`'s names; every key and every model tensor must pair up."""
    expected = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    unexpected, mismatched = [], []
    for name, tensor in state.items():
        ours = names[name]
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        if ours in claimed:
            raise ConversionError(f"{source}: two keys map onto {ours} (one is {name})")
        claimed.add(ours)
        if tensor.shape == expected[ours].shape:
            renamed[ours] = tensor
        else:
            mismatched.append(f"{name} {tuple(tensor.shape)} vs {ours} "
                              f"{tuple(expected[ours].shape)}")
    missing = [n for n in expected if n not in claimed]
    if unexpected or missing or mismatched:
        parts = [f"{len(unexpected)} unexpected keys {unexpected[:4]}" if unexpected else "",
                 f"{len(missing)} parameters not filled {missing[:4]}" if missing else "",
                 f"{len(mismatched)} shape mismatches {mismatched[:3]}" if mismatched else ""]
        raise ConversionError(f"{source} does not map onto SegCLIP: "
                              + "; ".join(p for p in parts if p))
    return renamed


def load_official(path: str | Path, text_heads: int | None = None,
                  decoder_heads: int | None = None, inference_only: bool = False,
                  ) -> tuple[SegCLIP, LoadReport]:
    """`load_official_state` on a file, read with `torch.load(weights_only=True)`."""
    state = read_state_dict(path, "official SegCLIP")
    return load_official_state(state, str(path), text_heads, decoder_heads, inference_only)


def convert_official(path: str | Path, out: str | Path, text_heads: int | None = None,
                     decoder_heads: int | None = None, inference_only: bool = False,
                     ) -> LoadReport:
    """`segclip-convert official`: the official file as a segclip checkpoint at `out`."""
    model, report = load_official(path, text_heads, decoder_heads, inference_only)
    save_checkpoint(model, out, meta={"converted_from": "official-segclip",
                                      "source": Path(path).name,
                                      "source_sha256": file_sha256(path)})
    return report


def official_state_dict(model: SegCLIP) -> dict[str, torch.Tensor]:
    """The model's tensors under the official names (the inverse of `load_official_state`)."""
    if model.config.mapping_scale != _OFFICIAL_MAPPING_SCALE:
        raise ConversionError(f"mapping_scale is {model.config.mapping_scale}; the official "
                              f"model has no such multiplier (it is 1), so its weights would "
                              f"not reproduce this model")
    state = model.state_dict()
    names = segclip_to_official_names(state, model.config)
    unnamed = [n for n, official in names.items() if official is None]
    if unnamed:
        raise ConversionError(f"{len(unnamed)} segclip tensors have no official name: "
                              f"{unnamed[:4]}")
    return {names[n]: t.detach().cpu().clone() for n, t in state.items()}


def export_official(checkpoint: str | Path, out: str | Path) -> Path:
    """`segclip-convert to-official`: a segclip checkpoint as a plain official state dict."""
    payload = read_checkpoint(checkpoint)
    model = model_from_payload(payload, checkpoint)
    return atomic_torch_save(official_state_dict(model), out)

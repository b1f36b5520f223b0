"""Initialise SegCLIP from CLIP weights (paper §3.1; docs/official-implementation.md §3
"Initialisation").

An OpenAI CLIP file (TorchScript archive or plain state dict) or an open_clip state dict uses the
same names as segclip's towers: segclip keeps open_clip's `resblocks` numbering, so blocks
[0, group_layer) run before the semantic group and the rest on the region tokens with no renaming.
Our new modules (`group.*`, `reconstruction.*`) keep their fresh initialisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from segclip.checkpoint import file_sha256, save_checkpoint
from segclip.config import ModelConfig
from segclip.convert._io import read_state_dict
from segclip.convert.report import LoadReport
from segclip.errors import ConversionError
from segclip.model import SegCLIP

NEW_MODULES = ("group.", "reconstruction.")  # not in CLIP: left at their initialisation
# OpenAI metadata tensors and the text causal mask (a buffer in TorchScript): not weights.
_METADATA = ("input_resolution", "context_length", "vocab_size")


def _is_metadata(name: str) -> bool:
    return name in _METADATA or name == "attn_mask" or name.endswith(".attn_mask")


def load_clip_state(model: SegCLIP, state: dict[str, torch.Tensor],
                    source: str = "<state dict>") -> LoadReport:
    """Copy CLIP tensors into `model` in place (cast to its dtype).

    Raises:
        ConversionError: a CLIP tensor of the model is absent from `state`, or a shape differs
            (e.g. ViT-L weights into a ViT-B/16 model).
    """
    if any(name.startswith("clip.visual.transformer.semantic_layer2.") for name in state):
        raise ConversionError(f"{source} is an official SegCLIP file, not CLIP weights; use "
                              f"`segclip-convert official`")
    expected = model.state_dict()
    ignored = tuple(n for n in state if _is_metadata(n))
    unexpected = tuple(n for n in state if n not in expected and not _is_metadata(n))
    missing = tuple(n for n in expected if n not in state)
    lacking = [n for n in missing if not n.startswith(NEW_MODULES)]
    mismatched = [f"{n} {tuple(state[n].shape)} vs {tuple(expected[n].shape)}"
                  for n in expected if n in state and state[n].shape != expected[n].shape]
    if lacking or mismatched:
        parts = [f"lacks {len(lacking)} CLIP tensors of the model, e.g. {lacking[:3]}"
                 if lacking else "",
                 f"{len(mismatched)} shapes differ (file vs model), e.g. {mismatched[:3]}"
                 if mismatched else ""]
        raise ConversionError(f"{source} does not fit the model: "
                              + "; ".join(p for p in parts if p)
                              + f"; expected OpenAI or open_clip weights of the same "
                                f"architecture (pick the matching --config); {len(unexpected)} "
                                f"file keys did not match, e.g. {list(unexpected[:3])}")
    loaded = {n: state[n] for n in expected if n in state}
    model.load_state_dict(loaded, strict=False)
    return LoadReport(source=source, loaded=tuple(loaded), missing=missing,
                      unexpected=unexpected, ignored=ignored, config=model.config)


def load_clip_weights(model: SegCLIP, path: str | Path) -> LoadReport:
    """Initialise `model` in place from an OpenAI or open_clip CLIP file (`--clip-weights`).

    The file is read without unpickling code: `torch.load(weights_only=True)` for state dicts,
    a restricted reader for OpenAI's TorchScript archives.
    """
    return load_clip_state(model, read_state_dict(path, "CLIP"), str(path))


def convert_clip(path: str | Path, out: str | Path, config: str = "vit-b16",
                 seed: int = 0) -> LoadReport:
    """`segclip-convert clip`: a fresh `config` SegCLIP initialised from CLIP, saved at `out`."""
    state = read_state_dict(path, "CLIP")  # fail on a bad file before building the model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegCLIP(ModelConfig.preset(config))
    report = load_clip_state(model, state, str(path))
    save_checkpoint(model, out, meta={"converted_from": "clip", "source": Path(path).name,
                                      "source_sha256": file_sha256(path), "init_seed": seed})
    return report

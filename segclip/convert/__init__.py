"""Weight conversion: official SegCLIP `segclip.bin` <-> segclip checkpoints, and CLIP init.

- `load_official` / `convert_official`: the released checkpoint (docs/official-implementation.md
§5) into a SegCLIP
  whose config is inferred from the tensor shapes; `export_official` / `official_state_dict`: back.
- `load_clip_weights`: an OpenAI (TorchScript or state dict) or open_clip ViT file into a SegCLIP
  (`segclip-train --clip-weights`); `convert_clip`: the same into a fresh checkpoint.

Every file is read without unpickling code (`read_state_dict`).
"""

from segclip.convert._io import read_state_dict
from segclip.convert.clip import convert_clip, load_clip_state, load_clip_weights
from segclip.convert.official import (
    convert_official,
    export_official,
    infer_official_config,
    load_official,
    load_official_state,
    official_state_dict,
    official_to_segclip_names,
    segclip_to_official_names,
)
from segclip.convert.report import LoadReport

__all__ = [
    "LoadReport",
    "convert_clip",
    "convert_official",
    "export_official",
    "infer_official_config",
    "load_clip_state",
    "load_clip_weights",
    "load_official",
    "load_official_state",
    "official_state_dict",
    "official_to_segclip_names",
    "read_state_dict",
    "segclip_to_official_names",
]

"""Read a foreign weights file into a flat `{name: tensor}` dict, never unpickling code.

Plain `torch.save` files go through `torch.load(weights_only=True)`; TorchScript archives (the
OpenAI CLIP downloads) through the restricted reader in `_torchscript`. Wrappers such as
`{"state_dict": ...}` and `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are removed.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from segclip.checkpoint import file_kind
from segclip.convert._torchscript import (
    TorchScriptError,
    is_torchscript_archive,
    read_torchscript_state_dict,
)
from segclip.errors import ConversionError

_WRAPPER_KEYS = ("state_dict", "model", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load the tensors of `path` (a state dict, a checkpoint dict holding one, or TorchScript).

    Args:
        what: how the file is named in error messages ("official SegCLIP", "CLIP").

    Raises:
        ConversionError: the file is missing, empty, unreadable, holds Python objects beyond
            tensors and plain data, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{what} file is empty (0 bytes): {path}")
    if is_torchscript_archive(path):
        try:
            payload: Any = read_torchscript_state_dict(path)
        except (TorchScriptError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
            raise ConversionError(
                f"refusing TorchScript archive {path}: {e}. segclip reads TorchScript tensors "
                f"without running the archive's code; if this archive is trusted, convert it "
                f"yourself with torch.save(torch.jit.load(f).state_dict(), 'state_dict.pt') and "
                f"pass that file") from e
    else:
        payload = _torch_load(path, what)
    return unwrap_state_dict(payload, path, what)


def _torch_load(path: Path, what: str) -> Any:
    kind = file_kind(path)
    if kind != "torch":
        raise ConversionError(f"not {what} weights: {path} is {kind}, not a torch.save file")
    try:
        with warnings.catch_warnings():  # keep stderr to the one error line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "Unsupported global" not in detail:
            raise ConversionError(f"cannot read {what} file {path}: corrupt or not a torch "
                                  f"file ({detail})") from e
        raise ConversionError(
            f"refusing to load {path}: it holds Python objects that only a full unpickle could "
            f"build, which may run arbitrary code ({detail.split(' was not')[0]}); segclip "
            f"loads tensors and plain data only (torch.load weights_only=True). Re-save the "
            f"{what} weights as a plain state dict of tensors") from e
    except Exception as e:  # the weights-only unpickler raises KeyError, IndexError... on garbage
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"cannot read {what} file {path}: truncated or not a torch file "
                              f"({first})") from e


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The reason torch's weights-only unpickler gave, without its long advice text."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


def unwrap_state_dict(payload: Any, path: str | Path, what: str = "weights",
                      ) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside `payload`, with DDP/compile prefixes stripped."""
    if isinstance(payload, Mapping) and payload.get("format") == "segclip-ckpt":
        raise ConversionError(f"{path} is already a segclip checkpoint; load it with "
                              f"segclip.load_checkpoint, there is nothing to convert")
    for key in _WRAPPER_KEYS:
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not isinstance(payload, Mapping) or not payload:
        raise ConversionError(f"{path} does not hold a state dict (found "
                              f"{type(payload).__name__}); expected a dict of tensors with the "
                              f"{what} parameter names")
    state: dict[str, torch.Tensor] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path} is not a state dict: entry {key!r} holds a "
                                  f"{type(value).__name__}, not a tensor")
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in state:
            raise ConversionError(f"{path}: key {key!r} collides with another after removing "
                                  f"its 'module.' prefix")
        state[name] = value
    return state

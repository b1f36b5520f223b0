"""The checkpoint contract (`ckpt.pt`, docs/architecture.md): save atomically, load safely.

A `torch.save` dict `{"format": "segclip-ckpt", "version": 1, "config": {...}, "state_dict":
{...}, "meta": {...}}`, read with `torch.load(..., weights_only=True)` so no object of a user's
file is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from segclip.config import ModelConfig
from segclip.errors import CheckpointError, ConfigError, WriteError
from segclip.model import SegCLIP
from segclip.runtime._atomic import atomic_open

CKPT_FORMAT = "segclip-ckpt"
CKPT_VERSION = 1
RECONSTRUCTION_PREFIX = "reconstruction."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to a temp file in the target directory, fsync, then rename over `path`.

    Raises:
        WriteError: the file cannot be written (an OSError: path is a directory, a parent is a
            file, no permission, disk full); nothing is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(obj, f)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e} ({e.filename or path.parent}); "
                         f"choose another output path") from e
    return path


def save_checkpoint(model: SegCLIP, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                    inference_only: bool = False, half: bool = False) -> Path:
    """Write `model` as a segclip checkpoint.

    Args:
        inference_only: drop the reconstruction branch (and record `with_reconstruction=False`).
        half: store floating tensors as float16 (loading casts them back to the model's dtype).
    """
    config = model.config.to_dict()
    state = {}
    for name, tensor in model.state_dict().items():
        if inference_only and name.startswith(RECONSTRUCTION_PREFIX):
            continue
        tensor = tensor.detach().cpu()
        state[name] = tensor.half() if half and tensor.is_floating_point() else tensor.clone()
    if inference_only:
        config["with_reconstruction"] = False
    payload = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": config,
               "state_dict": state, "meta": dict(meta or {})}
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the checkpoint dict (weights only; nothing is unpickled)."""
    path = Path(path)
    if path.is_dir():
        if (path / "segclip.json").is_file():
            raise CheckpointError(f"{path} is a bundle folder; this command takes a checkpoint "
                                  f"(ckpt.pt), e.g. the one the bundle was exported from")
        raise CheckpointError(f"{path} is a folder, not a checkpoint; pass the ckpt.pt file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    return validate_payload(load_weights_only(path), path)


def load_weights_only(path: Path, what: str = "checkpoint", prefix: str = "") -> Any:
    """`torch.load(weights_only=True)` of `path` with warnings silenced; any failure becomes a
    one-line CheckpointError starting with `prefix` that names `path` (`what` describes it)."""
    kind = file_kind(path)
    if kind != "torch":
        raise CheckpointError(f"{prefix}not a {what}: {path} is {kind}, not a torch.save file")
    try:
        with warnings.catch_warnings():  # e.g. torch's TorchScript notice: stderr stays one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps every weights-only failure in this type; garbage bytes show up as an
        # "Unsupported operand", a forbidden object as an "Unsupported global"/class.
        if "Unsupported operand" not in str(e):
            raise CheckpointError(
                f"{prefix}refusing to load {path}: it holds Python objects that only a full "
                f"unpickle could build (possibly code); segclip loads tensors and plain data only "
                f"(torch.load weights_only=True). Re-save it as a plain state dict.") from e
        raise CheckpointError(f"{prefix}cannot read {what} {path}: truncated or not a torch "
                              f"file (corrupt pickle data)") from e
    except Exception as e:  # the weights-only unpickler raises KeyError etc. on garbage bytes
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{prefix}cannot read {what} {path}: truncated or not a torch "
                              f"file ({detail})") from e


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (torch >= 1.6)
_PICKLE_PROTOCOL = 0x80  # a pickle stream (legacy torch.save) starts with PROTO


def file_kind(path: Path) -> str:
    """"torch" for a zip or pickle stream (torch.load decides the rest), else a description."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if head.startswith(_ZIP_MAGIC) or (head and head[0] == _PICKLE_PROTOCOL):
        return "torch"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head[:64]):
        return "an ONNX model"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of another format"
    if b"\x00" in head:
        return "a binary file of another format"
    return "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"


def validate_payload(payload: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check the format marker, version and field types of a loaded checkpoint dict."""
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        hint = ""
        if isinstance(payload, dict) and any(k.startswith("clip.") for k in payload):
            hint = " It looks like an official SegCLIP file: run `segclip-convert official` first."
        elif isinstance(payload, dict) and "visual.conv1.weight" in payload:
            hint = " It looks like CLIP weights: run `segclip-convert clip` first."
        raise CheckpointError(f"{path} is not a segclip checkpoint (no format "
                              f"{CKPT_FORMAT!r}).{hint}")
    if payload.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} is not "
                              f"supported (expected {CKPT_VERSION}); upgrade segclip")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"),
                                                                      dict):
        raise CheckpointError(f"{path}: checkpoint lacks its 'config' or 'state_dict' dict")
    return payload


def config_from_payload(payload: dict[str, Any], path: str | os.PathLike = "<checkpoint>",
                        ) -> ModelConfig:
    """The model config of a validated checkpoint dict."""
    try:
        return ModelConfig.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from e


def load_payload_weights(model: SegCLIP, payload: dict[str, Any],
                         path: str | os.PathLike = "<checkpoint>") -> None:
    """Load a validated checkpoint dict's state dict into `model` strictly."""
    expected = set(model.state_dict())
    given = set(payload["state_dict"])
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not match the model: "
                              f"{len(missing)} missing {missing[:5]}, "
                              f"{len(unexpected)} unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:  # e.g. shape mismatches, one per line after a header line
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckpointError(f"{path}: {detail}") from e


def model_from_payload(payload: dict[str, Any], path: str | os.PathLike = "<checkpoint>",
                       ) -> SegCLIP:
    """Build the model of a validated checkpoint dict and load its weights strictly."""
    model = SegCLIP(config_from_payload(payload, path))
    load_payload_weights(model, payload, path)
    return model


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    ) -> SegCLIP:
    """Load a segclip checkpoint into a fresh model in eval mode."""
    payload = read_checkpoint(path)
    return model_from_payload(payload, path).to(map_location).eval()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (recorded in bundles as the source checkpoint's identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

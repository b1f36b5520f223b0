"""Helpers of the reliability tests: CLI assertions and crafted bad files.

Imported by the tests of this folder (pytest puts the folder on sys.path; no __init__.py). Nothing
here imports torch at module level, so runtime-only tests still collect without it.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

RUNNER = CliRunner()
# Warning categories Python hides by default (a user never sees them on stderr).
_HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                      ResourceWarning)


# ---- running commands ---------------------------------------------------------------------------
def invoke(app: Any, args: Sequence[str]) -> Any:
    """Run a typer app in-process; `result.user_warnings` lists the warnings a user would see.

    pytest records warnings instead of printing them, so a warning that would add lines to the
    user's stderr is invisible in `result.stderr`; it is collected here instead.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in _HIDDEN_BY_DEFAULT:
            warnings.filterwarnings("ignore", category=category)
        result = RUNNER.invoke(app, [str(a) for a in args])
    result.user_warnings = [f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
                            for w in caught]
    return result


def assert_user_error(result: Any, *fragments: str) -> str:
    """Exit code 2, exactly one `error: ...` line on stderr holding every fragment, no traceback,
    no stdout, and no warning that would add lines to stderr. Returns the line."""
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit), f"unhandled {result.exception!r}\n{result.output}"
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert getattr(result, "user_warnings", []) == [], result.user_warnings
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, hidden ones included ({} if absent)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def entries(root: Path) -> list[str]:
    """Names directly under `root` (hidden included), sorted."""
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---- code-running pickles -------------------------------------------------------------------
class CodeRunner:
    """Unpickling this object runs `code` (here: create the marker file): the attack a full
    `pickle.load` / `torch.load(weights_only=False)` allows."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


class SystemRunner(CodeRunner):
    """The same attack through `os.system`."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def write_code_pickles(folder: Path, marker: Path, base: dict[str, Any] | None = None,
                       ) -> dict[str, Path]:
    """Files that run code when fully unpickled, in every container torch reads.

    Args:
        base: a valid payload (e.g. a checkpoint dict) to hide the object in, so that a loader
            reading fields before values would still meet it.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    base = dict(base or {})
    files: dict[str, Path] = {}

    def save(name: str, obj: Any, **kwargs: Any) -> None:
        files[name] = folder / f"{name}.pt"
        torch.save(obj, files[name], **kwargs)

    save("zip_top_level", CodeRunner(marker))
    save("zip_in_state_dict", {**base, "state_dict": {**base.get("state_dict", {}),
                                                      "evil": CodeRunner(marker)}})
    save("zip_in_meta", {**base, "meta": {"note": SystemRunner(marker)}})
    save("legacy_format", {**base, "meta": CodeRunner(marker)},
         _use_new_zipfile_serialization=False)
    files["plain_pickle"] = folder / "plain_pickle.pt"
    files["plain_pickle"].write_bytes(pickle.dumps(CodeRunner(marker), protocol=2))
    return files


# ---- bad checkpoints ----------------------------------------------------------------------------
# kind -> fragment every checkpoint-reading command must put in its one-line message
CHECKPOINT_KINDS = {
    "missing": "not found",
    "empty": "empty (0 bytes)",
    "truncated_head": "truncated",
    "truncated_half": "truncated",
    "truncated_tail": "truncated",
    "text_file": "is a text file, not a torch.save file",
    "json_file": "is a JSON file, not a torch.save file",
    "onnx_file": "is an ONNX model, not a torch.save file",
    "npz_file": "not a torch file",
    "torchscript": "cannot read checkpoint",
    "bare_state_dict": "not a segclip checkpoint",
    "official_layout": "segclip-convert official",
    "other_version": "checkpoint version 2 is not supported",
    "missing_key": "1 missing ['positional_embedding']",
    "extra_key": "1 unexpected ['extra.weight']",
    "wrong_shape": "size mismatch for positional_embedding",
    "unknown_config_field": "unknown ModelConfig fields ['bogus']",
}
# kinds whose file is a readable segclip checkpoint that does not fit its own config
MODEL_MISMATCH_KINDS = ("missing_key", "extra_key", "wrong_shape", "unknown_config_field")


def write_bad_checkpoint(kind: str, good: Path, path: Path, onnx_file: Path) -> Path:
    """Write a checkpoint of `kind` (CHECKPOINT_KINDS) derived from the valid `good` at `path`."""
    import numpy as np
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    payload = torch.load(good, map_location="cpu", weights_only=True)
    state = dict(payload["state_dict"])
    raw = {
        "missing": None,
        "empty": b"",
        "truncated_head": data[:100],
        "truncated_half": data[:len(data) // 2],
        "truncated_tail": data[:-1],
        "text_file": b"this is not a checkpoint\n",
        "json_file": json.dumps({"format": "segclip-ckpt", "version": 1}).encode(),
        "onnx_file": onnx_file.read_bytes() if kind == "onnx_file" else b"",
    }
    if kind in raw:
        if raw[kind] is not None:
            path.write_bytes(raw[kind])
        return path
    if kind == "npz_file":
        buffer = io.BytesIO()
        np.savez(buffer, weights=np.zeros(4, np.float32))
        path.write_bytes(buffer.getvalue())
    elif kind == "torchscript":
        with warnings.catch_warnings():  # torch.jit is deprecated; the archive still loads
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    elif kind == "bare_state_dict":
        torch.save(state, path)
    elif kind == "official_layout":
        from segclip.checkpoint import model_from_payload
        from segclip.convert import official_state_dict

        torch.save(official_state_dict(model_from_payload(payload, good)), path)
    elif kind == "other_version":
        torch.save({**payload, "version": 2}, path)
    elif kind == "missing_key":
        state.pop("positional_embedding")
        torch.save({**payload, "state_dict": state}, path)
    elif kind == "extra_key":
        state["extra.weight"] = torch.zeros(2)
        torch.save({**payload, "state_dict": state}, path)
    elif kind == "wrong_shape":
        state["positional_embedding"] = torch.zeros(3, 5)
        torch.save({**payload, "state_dict": state}, path)
    elif kind == "unknown_config_field":
        torch.save({**payload, "config": {**payload["config"], "bogus": 1}}, path)
    else:
        raise KeyError(kind)
    return path


# ---- images ------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A ~100-byte PNG whose header claims width x height RGB pixels (a decompression bomb: the
    IDAT holds a few zlib-compressed zero rows that would inflate to the full image)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b""))
    return path


def write_image(kind: str, path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    """Write an image file of `kind`; `size` is (width, height).

    Kinds: "rgb", "zero_bytes", "truncated_png", "truncated_jpeg", "not_an_image", "one_pixel",
    "sixteen_bit", "cmyk" (JPEG), "animated" (GIF, two frames), "rgba", "palette".
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(kind))
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if kind == "rgb":
        image.save(path, format="PNG")
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind in ("truncated_png", "truncated_jpeg"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if kind == "truncated_png" else "JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "not_an_image":
        path.write_text("label,value\ncat,1\n")
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (200, 30, 30)).save(path, format="PNG")
    elif kind == "sixteen_bit":
        grey = rng.integers(0, 65536, size=(size[1], size[0]), dtype=np.uint16)
        Image.fromarray(grey).save(path, format="PNG")
        assert Image.open(path).mode.startswith("I")
    elif kind == "cmyk":
        image.convert("CMYK").save(path, format="JPEG")
    elif kind == "animated":
        frames = [image, Image.fromarray(255 - pixels)]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=20,
                       loop=0)
    elif kind == "rgba":
        rgba = np.dstack([pixels, np.full(pixels.shape[:2], 128, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(path, format="PNG")
    elif kind == "palette":
        image.convert("P").save(path, format="PNG")
    else:
        raise KeyError(kind)
    return path

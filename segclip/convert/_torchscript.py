"""Read the tensors of a TorchScript archive without running any of its code.

OpenAI distributes CLIP as TorchScript archives (`ViT-B-16.pt`). `torch.jit.load` compiles and
runs the archive's code and `torch.load(weights_only=True)` refuses such archives, so this module
reads them itself:

- `data.pkl` (the pickled module tree) goes through a restricted unpickler that knows a handful of
  globals: TorchScript classes (`__torch__.*`) become inert attribute records, tensors are rebuilt
  from the raw storages under `data/`, and any other global is refused;
- the class definitions under `code/` are read as text only, for their `__parameters__` and
  `__buffers__` lists, so the result equals the `state_dict()` that `torch.jit.load` would give.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:[ \t]+.*\n?|\n)*)", re.MULTILINE)
_LIST_RE = r"^[ \t]+{}\s*=\s*\[([^\]]*)\]"


class TorchScriptError(ValueError):
    """The archive is malformed or holds something this reader refuses to build."""


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a zip whose top folder holds `constants.pkl` (how torch itself tells them apart)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(re.fullmatch(r"[^/]+/constants\.pkl", name) for name in archive.namelist())


class _ScriptObject:
    """An inert stand-in for a TorchScript class instance: it only keeps its pickled state."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors and inert records only; refuses every global it does not know."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _tag: value
        raise TorchScriptError(f"the archive's data.pkl asks for the global {module}.{name}, "
                               f"which a weights-only reader does not build")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise TorchScriptError(f"unsupported persistent id in data.pkl: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError as e:
                raise TorchScriptError(f"storage record data/{key} is missing") from e
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype)  # (numel,)
            if flat.numel() != numel:
                raise TorchScriptError(f"storage data/{key} holds {flat.numel()} elements, "
                                       f"data.pkl says {numel}")
            self._storages[key] = flat
        return self._storages[key]


def _declared_state(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """qualname -> names listed in `__parameters__` and `__buffers__` of the class source."""
    declared: dict[str, set[str]] = {}
    code_dir = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code_dir) and name.endswith(".py")):
            continue
        module = name[len(code_dir):-len(".py")].replace("/", ".")
        source = archive.read(name).decode("utf-8", errors="replace")
        for match in _CLASS_RE.finditer(source):
            names: set[str] = set()
            for field in ("__parameters__", "__buffers__"):
                listed = re.search(_LIST_RE.format(field), match.group(2), re.MULTILINE)
                if listed:
                    names.update(re.findall(r"\"([^\"]*)\"", listed.group(1)))
            declared[f"{module}.{match.group(1)}"] = names
    return declared


def _collect(obj: _ScriptObject, prefix: str, declared: dict[str, set[str]],
             out: dict[str, torch.Tensor]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return
    keep = declared.get(obj.qualname)  # None: class source not found, keep every tensor
    for attr, value in state.items():
        if isinstance(value, torch.Tensor) and (keep is None or attr in keep):
            out[f"{prefix}{attr}"] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{attr}.", declared, out)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript module archive, by their dotted names.

    Raises:
        TorchScriptError: the archive is malformed, big-endian, or its pickle asks for anything
            beyond TorchScript classes, storages and tensors.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise TorchScriptError(f"expected one <archive>/data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode().strip()
            if order != "little":
                raise TorchScriptError(f"byte order {order!r} is not supported")
        with archive.open(pickles[0]) as data:
            root = _RestrictedUnpickler(data, archive, prefix).load()
        if not isinstance(root, _ScriptObject):
            raise TorchScriptError(f"data.pkl holds a {type(root).__name__}, not a module")
        state: dict[str, torch.Tensor] = {}
        _collect(root, "", _declared_state(archive, prefix), state)
    return state

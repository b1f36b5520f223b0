"""The one `--device` vocabulary of every segclip command (docs/architecture.md "Backends").

`auto` (a GPU when one is usable, else the CPU), `cpu`, `cuda` (GPU 0) and `cuda:N` (GPU N), in
`segclip-run`, `segclip-serve`, `segclip-eval`, `segclip-train` and the `Segmenter`. Parsing is
torch-free; whether the device exists is checked by whoever runs on it (a runtime backend, or
`segclip.devices.torch_device` for PyTorch).
"""

from __future__ import annotations

import re

from segclip.runtime.errors import EngineError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(spec: str) -> tuple[str, int | None]:
    """`"cuda:1"` -> `("cuda", 1)`, `"cpu"` -> `("cpu", None)`.

    Raises:
        EngineError: anything else (`gpu`, `tpu`, `cpu:1`, `cuda:-1`), naming the choices.
    """
    match = _PATTERN.match(str(spec).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise EngineError(f"unknown device {spec!r}; choose one of {DEVICE_CHOICES}")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)

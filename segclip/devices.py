"""The PyTorch device of `segclip-train` and `segclip-eval CKPT`, from the one `--device`
vocabulary (`segclip.runtime.devices`): a device that is asked for and absent is an error,
never a silent fall-back to the CPU (docs/architecture.md "Command contracts")."""

from __future__ import annotations

import torch

from segclip.errors import ConfigError
from segclip.runtime.devices import parse_device
from segclip.runtime.errors import EngineError


def torch_device(spec: str | None, default_index: int = 0) -> torch.device:
    """`auto|cpu|cuda|cuda:N` -> a usable `torch.device`; None means `auto`.

    Args:
        default_index: the GPU for plain `cuda` / `auto` (torchrun's LOCAL_RANK).

    Raises:
        ConfigError: an unknown device, or a GPU that is not present (the message says what is).
    """
    try:
        kind, index = parse_device("auto" if spec is None else spec)
    except EngineError as e:
        raise ConfigError(str(e)) from None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cpu" or (kind == "auto" and available == 0):
        return torch.device("cpu")
    gpu = default_index if index is None else index
    if gpu >= available:
        present = (f"{available} CUDA GPU(s) (cuda:0..cuda:{available - 1})" if available
                   else "no CUDA GPU")
        raise ConfigError(f"device {spec!r} is not available: this machine has {present} "
                          f"(torch {torch.__version__}); use --device cpu")
    return torch.device(f"cuda:{gpu}")

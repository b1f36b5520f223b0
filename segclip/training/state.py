"""Resumable training state (docs/architecture.md "Checkpoint contract": optimizer state lives
beside
`ckpt.pt`): `RUN/train_state.pt`, written atomically, loadable with `weights_only=True`.

It holds the step, the optimizer and GradScaler state, the skipped-step count, the configs of the
run and every rank's RNG states stored as tensors (torch CPU/CUDA, numpy, Python `random`). The
data position is the step itself (`segclip.training.data`). The model weights are `ckpt.pt`
(written at the same step; both record it and resuming checks they agree). While a new pair is
being written, the state that matches the previous `ckpt.pt` is kept as `train_state-STEP.pt`
(`kept_state_file`), so a kill at any moment leaves a matching pair.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segclip.checkpoint import atomic_torch_save, load_weights_only
from segclip.errors import CheckpointError

STATE_FORMAT = "segclip-train-state"
STATE_VERSION = 1
STATE_FILE = "train_state.pt"
CKPT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.jsonl"
KEPT_STATE_GLOB = "train_state-*.pt"
_STATE_KEYS = ("step", "optimizer", "scaler", "rng", "train_config", "model_config", "data",
               "skipped", "elapsed")


def kept_state_file(run: Path, step: int) -> Path:
    """`RUN/train_state-STEP.pt`: the state of step STEP, kept while a newer pair is written."""
    return run / f"train_state-{int(step)}.pt"


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors."""
    np_state = np.random.get_state()  # ('MT19937', keys[624], pos, has_gauss, cached)
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64),
        "python_keys": torch.tensor(py_keys, dtype=torch.int64),
        "python_version": torch.tensor(py_version, dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss,
                                     dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"])
    random.setstate((int(state["python_version"]),
                     tuple(int(k) for k in state["python_keys"].tolist()),
                     None if np.isnan(gauss) else gauss))


def save_train_state(path: str | Path, *, step: int, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, rng: list[dict[str, torch.Tensor]],
                     train_config: dict[str, Any], model_config: dict[str, Any],
                     data: list[str], skipped: int, elapsed: float) -> Path:
    """Write the resumable state atomically; `rng` holds one entry per rank."""
    payload = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng, "train_config": train_config, "model_config": model_config,
        "data": data, "skipped": skipped, "elapsed": elapsed,
    }
    return atomic_torch_save(payload, path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read and check a train state (weights only: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (was the run started with "
                              "this --out?)")
    payload = load_weights_only(path, "train state", prefix="cannot resume: ")
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"cannot resume: {path} is not a segclip train state")
    if payload.get("version") != STATE_VERSION:
        raise CheckpointError(f"cannot resume: {path} has version {payload.get('version')!r}, "
                              f"expected {STATE_VERSION}")
    missing = [key for key in _STATE_KEYS if key not in payload]
    if missing or not isinstance(payload["rng"], list):
        raise CheckpointError(f"cannot resume: {path} is not a segclip train state (lacks "
                              f"{missing or ['rng list']})")
    return payload

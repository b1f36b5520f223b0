"""Shared by the tests of model options that must survive export: export, parity, runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_passes_and_segments(model: Any, out: Path) -> None:
    """Export `model` to a bundle under `out`, require its recorded parity to pass, and segment
    a 70x90 image with the torch-free Segmenter (the label map has the image's size)."""
    import json

    import numpy as np

    from segclip.export import export_model
    from segclip.runtime import Segmenter

    bundle = export_model(model, out / "bundle")
    parity = json.loads((bundle / "segclip.json").read_text())["parity"]
    assert parity["passed"], parity["failures"]
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    result = Segmenter(bundle, device="cpu").segment(image, ["red circle", "blue star"])
    assert result.label_map.shape == (70, 90)

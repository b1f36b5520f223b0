"""Export fixtures: the model of the shared `tiny_checkpoint` and one bundle exported from it
per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def checkpoint_model(tiny_checkpoint: Path) -> Any:
    """The model of `tiny_checkpoint`, eval mode (read-only: tests must not edit it)."""
    from segclip.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported once with the fp16 variant (default opset, verified);
    read-only: tests that modify a bundle copy it first."""
    from segclip.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("export") / "bundle",
                         fp16=True)


@pytest.fixture(scope="session")
def manifest(bundle: Path) -> dict[str, Any]:
    import json

    return json.loads((bundle / "segclip.json").read_text())

"""Fixtures of the reliability tests, each built once per session and read-only: tests
that damage a file copy it first."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def rel_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_checkpoint` exported (and parity-verified) as a bundle."""
    from segclip.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("rel_export") / "bundle")


@pytest.fixture(scope="session")
def rel_run(synth_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step `segclip-train` run of the tiny preset on the synthetic world (ckpt.pt,
    train_state.pt, metrics.jsonl at step 2)."""
    from _reliability_support import invoke

    from segclip.cli.train import app

    out = tmp_path_factory.mktemp("rel_train") / "run"
    result = invoke(app, ["--config", "tiny", "--recipe", "synth", "--data", synth_world,
                          "--out", out, "--steps", "2", "--batch-size", "4", "--ckpt-every", "1",
                          "--log-every", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(rel_run: Path, tmp_path: Path) -> Path:
    """A private copy of `rel_run` that a test may damage."""
    return Path(shutil.copytree(rel_run, tmp_path / "run"))

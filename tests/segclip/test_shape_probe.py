"""scripts/shape_probe.py: the supervised shape control behind docs/synthetic-world.md ("What
limits it")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "shape_probe.py"


@pytest.fixture(scope="module")
def probe() -> object:
    spec = importlib.util.spec_from_file_location("shape_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segclip.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("shape-probe") / "world"
    generate(SynthConfig(num=80, val_num=0, eval_num=0, seed=3), root)
    return root


def test_single_object_items_match_the_captions(probe: object, world: Path) -> None:
    items = probe.single_object_items(world)
    pairs = [json.loads(line) for line in (world / "train" / "pairs.jsonl").open()]
    assert 0 < len(items) < 80
    for index, shape in items:
        assert probe.SHAPES[shape] in pairs[index]["caption"]


@pytest.mark.parametrize("tower", ["vit", "cnn"])
def test_a_short_run_reports_loss_and_accuracy(probe: object, world: Path, tower: str) -> None:
    row = probe.run(tower, world, steps=3, lr=1e-3, holdout=5, seed=0, overrides={})
    assert row["tower"] == tower and row["steps"] == 3 and row["heldout_images"] == 5
    assert 0.0 <= row["heldout_accuracy"] <= 1.0
    assert 0.0 < row["train_loss_last100"] < 10.0
    assert row["parameters"] > (500_000 if tower == "vit" else 50_000)

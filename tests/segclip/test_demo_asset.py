"""The shipped demo model (segclip/assets/demo_tiny.pt) still loads and scores on the synthetic
world's held-out evaluation split (the figures in docs/synthetic-world.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSET = Path(__file__).resolve().parents[2] / "segclip" / "assets" / "demo_tiny.pt"


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segclip.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("demo-world") / "world"
    generate(SynthConfig(num=0, val_num=0, eval_num=100, seed=0), root)
    return root


def test_demo_asset_is_small_and_inference_only() -> None:
    from segclip.checkpoint import read_checkpoint

    assert ASSET.stat().st_size <= 10 * 1024 * 1024
    payload = read_checkpoint(ASSET)
    assert payload["config"]["with_reconstruction"] is False
    assert not any(k.startswith("reconstruction.") for k in payload["state_dict"])


def test_demo_asset_scores_above_all_background(eval_set: Path) -> None:
    from segclip.checkpoint import load_checkpoint
    from segclip.evaluation.datasets import VocDataset, load_classes
    from segclip.evaluation.evaluate import evaluate_model, find_held_out

    model = load_checkpoint(ASSET)
    names = load_classes(eval_set / "classes.txt").names
    data = VocDataset(eval_set / "eval")
    result = evaluate_model(model, data, names, 0.8, diagnostics=True,
                            held_out=find_held_out(data.root))
    baseline = result.diagnostics["all_background_miou"]
    # measured when the model was trained: mIoU 10.69 %, all-background 3.56 %, oracle 56.3 %,
    # colour named right on 81.7 % of foreground pixels
    assert result.miou == pytest.approx(0.1069, abs=0.002)
    assert result.miou > baseline + 0.04
    assert result.diagnostics["oracle_miou"] > 0.55
    assert result.diagnostics["colour_accuracy"] > 0.80

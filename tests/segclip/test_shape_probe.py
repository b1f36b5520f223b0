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


def test_a_short_run_with_the_recipe_options(probe: object, world: Path) -> None:
    row = probe.run("vit", world, steps=3, lr=1e-3, holdout=5, seed=0, overrides={},
                    pool="max", warmup=1, aug=True, smoothing=0.1, batch_size=4)
    assert (row["pool"], row["aug"], row["batch"], row["warmup"]) == ("max", True, 4, 1)
    assert 0.0 <= row["heldout_accuracy"] <= 1.0
    # the count is the image tower and head only, not the text tower SegCLIP also builds
    assert 500_000 < row["parameters"] < 1_000_000


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_patch_pooling_matches_a_hand_computed_pool(probe: object, pool: str) -> None:
    import torch

    torch.manual_seed(0)
    model = probe.ViTProbe(pool).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, _, _ = model.model.embed_patches(images)  # (2, 64, D)
        for block in model.tower.transformer.resblocks:
            tokens = block(tokens)
        pooled = tokens.amax(dim=1) if pool == "max" else tokens.mean(dim=1)
        expected = model.head(model.tower.ln_post(pooled) @ model.tower.proj)
        torch.testing.assert_close(model(images), expected)


def test_augment_only_rotates_and_flips(probe: object) -> None:
    import torch

    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = probe.augment(images, torch.Generator().manual_seed(1))
    variants = [torch.rot90(img, k, dims=(1, 2)) for img in images for k in range(4)]
    for index, image in enumerate(out):
        candidates = variants[index * 4:(index + 1) * 4]
        candidates += [torch.flip(v, dims=(2,)) for v in candidates]
        assert any(torch.equal(image, v) for v in candidates)


def test_learning_rate_schedule(probe: object) -> None:
    assert probe.lr_at(0, 100, 1.0, warmup=-1) == 1.0 == probe.lr_at(99, 100, 1.0, warmup=-1)
    assert probe.lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert probe.lr_at(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert probe.lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert probe.lr_at(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert probe.lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_norms_biases_and_embeddings(probe: object) -> None:
    model = probe.ViTProbe()
    decay, keep = probe.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert "model.visual.ln_pre.weight" in kept and "model.visual.positional_embedding" in kept
    assert "model.visual.conv1.weight" in {names[id(p)] for p in decay["params"]}

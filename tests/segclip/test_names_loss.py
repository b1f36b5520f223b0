"""The names loss (`TrainConfig.names_weight`): names read from captions against the world's
object lists, the loss against a literal per-image, per-name loop, and a run that trains with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segclip.config import ModelConfig
from segclip.data.pairs import PairDataset, PairsConfig
from segclip.errors import ConfigError, DataError
from segclip.evaluation.datasets import load_classes
from segclip.losses import names_flat_loss, names_loss
from segclip.training import TrainConfig, train
from segclip.training.names import NameTargets, mentioned, name_pattern


def test_name_pattern_takes_whole_words_and_plurals() -> None:
    square = name_pattern("green square")
    assert square.search("two green squares") and square.search("a green  square.")
    assert not square.search("a greenish square") and not square.search("a green squared")
    assert not square.search("a red square")
    assert name_pattern("blue glass").search("three blue glasses")


def test_captions_mention_exactly_the_world_objects(synth_world: Path) -> None:
    names = load_classes(synth_world / "classes.txt").names
    dataset = PairDataset([synth_world / "train"], PairsConfig(image_size=64, patch_size=8))
    captions = [dataset.caption(i) for i in range(len(dataset))]
    hits = mentioned(captions, names)  # (P, C)
    meta = [json.loads(line) for line in
            (synth_world / "train" / "meta.jsonl").read_text().splitlines()]
    for row, record, caption in zip(hits, meta, captions):
        found = {n for n, hit in zip(names, row) if hit}
        assert found == {o["class"] for o in record["objects"]}, caption


def test_never_mentioned_names_are_dropped() -> None:
    names = ["red star", "blue circle", "green star"]
    built = NameTargets.build(["a red star", "two red stars and a blue circle"], names, 16)
    assert built.names == ("red star", "blue circle")
    assert built.targets.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert built.tokens.shape == (2, 16)
    with pytest.raises(DataError, match="no caption mentions"):
        NameTargets.build(["a yellow square"], names, 16)


def literal_names_loss(regions, present, text, targets, scale) -> torch.Tensor:
    """Per image and name: the best present region's cosine, then cross-entropy to the uniform
    distribution over the mentioned names, written out with loops."""
    losses = []
    for b in range(regions.shape[0]):
        wanted = [c for c in range(text.shape[0]) if targets[b, c] > 0]
        if not wanted:
            continue
        scores = []
        for c in range(text.shape[0]):
            best = max(float(regions[b, r] @ text[c]) for r in range(regions.shape[1])
                       if present[b, r])
            scores.append(scale * best)
        log_norm = math.log(sum(math.exp(s) for s in scores))
        losses.append(-sum(scores[c] - log_norm for c in wanted) / len(wanted))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def random_case(seed: int, images: int, regions: int, names: int, mention: float,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(regions (B, L, 8), text (C, 8), present (B, L), targets (B, C)) in float64; the first
    two regions are always present, image 0 mentions name 1 and image 2 mentions none."""
    gen = torch.Generator().manual_seed(seed)
    region = F.normalize(torch.randn(images, regions, 8, generator=gen, dtype=torch.float64),
                         dim=-1)
    text = F.normalize(torch.randn(names, 8, generator=gen, dtype=torch.float64), dim=-1)
    present = torch.rand(images, regions, generator=gen) > 0.3
    present[:, :2] = True
    targets = (torch.rand(images, names, generator=gen) > 1 - mention).double()
    targets[2] = 0
    targets[0, 1] = 1
    return region, text, present, targets


def test_names_loss_matches_the_literal_loop() -> None:
    regions, text, present, targets = random_case(0, 5, 4, 6, 0.4)
    got = names_loss(regions, present, text, targets, torch.tensor(7.0, dtype=torch.float64))
    torch.testing.assert_close(got, literal_names_loss(regions, present, text, targets, 7.0))


def test_names_loss_reaches_only_present_regions() -> None:
    gen = torch.Generator().manual_seed(1)
    regions = F.normalize(torch.randn(3, 4, 8, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    present = torch.tensor([[True, True, False, False]] * 3)
    targets = torch.eye(5)[:3]
    names_loss(regions, present, text, targets, torch.tensor(10.0)).backward()
    assert regions.grad[:, 2:].abs().max() == 0 and regions.grad[:, :2].abs().max() > 0
    none = names_loss(regions, present, text, torch.zeros(3, 5), torch.tensor(10.0))
    assert float(none.detach()) == 0.0 and none.requires_grad


def literal_names_flat_loss(regions, present, text, targets, scale) -> torch.Tensor:
    """Per image with a mention: each mentioned name picks its best present region; every other
    present region's softmax over all names against the uniform distribution, KL(u || p)."""
    losses = []
    count = text.shape[0]
    for b in range(regions.shape[0]):
        wanted = [c for c in range(count) if targets[b, c] > 0]
        if not wanted:
            continue
        rows = [r for r in range(regions.shape[1]) if present[b, r]]
        picked = {max(rows, key=lambda r: float(regions[b, r] @ text[c])) for c in wanted}
        for r in rows:
            if r in picked:
                continue
            scores = [scale * float(regions[b, r] @ text[c]) for c in range(count)]
            log_norm = math.log(sum(math.exp(s) for s in scores))
            losses.append(sum((1 / count) * (math.log(1 / count) - (s - log_norm))
                              for s in scores))
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def test_names_flat_loss_matches_the_literal_loop() -> None:
    regions, text, present, targets = random_case(2, 6, 5, 7, 0.3)
    got = names_flat_loss(regions, present, text, targets, torch.tensor(9.0, dtype=torch.float64))
    want = literal_names_flat_loss(regions, present, text, targets, 9.0)
    assert float(want) > 0
    torch.testing.assert_close(got, want)


def test_names_flat_loss_spares_picked_regions_and_is_zero_when_flat() -> None:
    text = torch.eye(4)  # (C, D): name c is axis c
    regions = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0.5, 0.5]]])  # (1, 3, 4)
    regions.requires_grad_()
    present = torch.ones(1, 3, dtype=torch.bool)
    targets = torch.tensor([[1.0, 1.0, 0, 0]])  # names 0 and 1 pick regions 0 and 1
    flat = names_flat_loss(regions, present, text, targets, torch.tensor(10.0))
    assert abs(float(flat.detach())) < 1e-6  # region 2 scores every name alike
    regions2 = regions.detach().clone()
    regions2[0, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # region 2 now names "2"
    regions2.requires_grad_()
    loss = names_flat_loss(regions2, present, text, targets, torch.tensor(10.0))
    loss.backward()
    assert float(loss.detach()) > 1.0
    assert regions2.grad[0, :2].abs().max() == 0 and regions2.grad[0, 2].abs().max() > 0
    none = names_flat_loss(regions2, present, text, torch.zeros(1, 4), torch.tensor(10.0))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_names_weight_needs_a_names_file() -> None:
    for weight in ("names_weight", "names_flat_weight"):
        with pytest.raises(ConfigError, match="needs names=FILE"):
            TrainConfig(**{weight: 1.0})
    with pytest.raises(ConfigError, match="names_flat_weight must be >= 0"):
        TrainConfig(names_flat_weight=-1.0, names="classes.txt")
    with pytest.raises(ConfigError, match="names_weight must be >= 0"):
        TrainConfig(names_weight=-1.0, names="classes.txt")


def test_a_run_trains_with_the_names_loss(synth_world: Path, tmp_path: Path) -> None:
    model = ModelConfig.preset("tiny", vision_layers=2, group_layer=1, text_layers=1)
    config = TrainConfig(steps=3, batch_size=8, lower_lr_scope="none", freeze_embeddings=False,
                         lr=1e-3, ckpt_every=0, log_every=1, names_weight=1.0,
                         names_flat_weight=0.5, names=str(synth_world / "classes.txt"),
                         captions="objects")
    run = train(model, config, [synth_world], tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
               .splitlines()]
    for term in ("names", "names_flat"):
        values = np.array([r[term] for r in records])
        assert len(values) == 3 and np.isfinite(values).all() and (values >= 0).all()
    assert all(r["names"] > 0 for r in records)
    assert sorted(run.losses) == [1, 2, 3]


def test_a_bad_names_file_stops_training_with_one_line(synth_world: Path, tmp_path: Path) -> None:
    model = ModelConfig.preset("tiny", vision_layers=2, group_layer=1, text_layers=1)
    empty = tmp_path / "names.txt"
    empty.write_text("\n \n")
    for names, message in ((empty, "is empty"), (tmp_path / "missing.txt", "not found")):
        config = TrainConfig(steps=1, batch_size=8, lower_lr_scope="none",
                             freeze_embeddings=False, names_weight=1.0, names=str(names))
        with pytest.raises(DataError, match=message):
            train(model, config, [synth_world], tmp_path / "run", progress=False)
        assert not (tmp_path / "run" / "ckpt.pt").exists()

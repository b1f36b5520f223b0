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
from segclip.losses import names_loss
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


def test_names_loss_matches_the_literal_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(5, 4, 8, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    present = torch.rand(5, 4, generator=gen) > 0.3
    present[:, 0] = True
    targets = (torch.rand(5, 6, generator=gen) > 0.6).double()
    targets[2] = 0  # a caption that mentions none: skipped
    targets[0, 1] = 1
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


def test_names_weight_needs_a_names_file() -> None:
    with pytest.raises(ConfigError, match="names_weight > 0 needs names=FILE"):
        TrainConfig(names_weight=1.0)
    with pytest.raises(ConfigError, match="names_weight must be >= 0"):
        TrainConfig(names_weight=-1.0, names="classes.txt")


def test_a_run_trains_with_the_names_loss(synth_world: Path, tmp_path: Path) -> None:
    model = ModelConfig.preset("tiny", vision_layers=2, group_layer=1, text_layers=1)
    config = TrainConfig(steps=3, batch_size=8, lower_lr_scope="none", freeze_embeddings=False,
                         lr=1e-3, ckpt_every=0, log_every=1, names_weight=1.0,
                         names=str(synth_world / "classes.txt"), captions="objects")
    run = train(model, config, [synth_world], tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
               .splitlines()]
    values = np.array([r["names"] for r in records])
    assert len(values) == 3 and np.isfinite(values).all() and (values > 0).all()
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

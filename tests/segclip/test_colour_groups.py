"""Colour-grouped batches (`TrainConfig.colour_groups`): the regrouped epoch order against a
literal check of its runs, the colour keys of a synthetic world, and a run that trains with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segclip.data.pairs import PairDataset, PairsConfig
from segclip.errors import ConfigError, DataError
from segclip.training import TrainConfig
from segclip.training.data import StepBatchSampler, colour_keys, grouped_order, plan_phases


def runs_of(order: np.ndarray, keys: np.ndarray) -> list[list[int]]:
    """`order` cut wherever the key changes."""
    runs: list[list[int]] = [[int(order[0])]]
    for previous, item in zip(order[:-1], order[1:]):
        if keys[item] == keys[previous]:
            runs[-1].append(int(item))
        else:
            runs.append([int(item)])
    return runs


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_order_is_a_permutation_of_same_key_runs(group: int) -> None:
    keys = np.random.default_rng(0).integers(0, 7, 200)  # (P,)
    order = grouped_order(keys, group, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(200))
    segments = runs_of(order, keys)  # maximal same-key stretches (adjacent runs may merge)
    for key in range(7):  # a key's items come in at most ceil(count / group) stretches
        count = int((keys == key).sum())
        mine = [len(s) for s in segments if keys[s[0]] == key]
        assert sum(mine) == count and len(mine) <= -(-count // group)
    shuffled = runs_of(np.random.default_rng(1).permutation(200), keys)
    assert len(shuffled) > len(segments) * 1.5  # plain shuffling would not pass the above
    assert np.array_equal(order, grouped_order(keys, group, seed=3, epoch=1))
    assert not np.array_equal(order, grouped_order(keys, group, seed=3, epoch=2))


def test_colour_keys_follow_the_world_meta(synth_world: Path) -> None:
    dataset = PairDataset([synth_world / "train"], PairsConfig(image_size=64, patch_size=8))
    keys = colour_keys(dataset)
    meta = [json.loads(line) for line in
            (synth_world / "train" / "meta.jsonl").read_text().splitlines()]
    colours = [frozenset(o["class"].split()[0] for o in m["objects"]) for m in meta]
    for i in range(len(meta)):
        for j in range(len(meta)):
            assert (keys[i] == keys[j]) == (colours[i] == colours[j])


def test_grouped_batches_hold_same_colour_runs(synth_world: Path) -> None:
    dataset = PairDataset([synth_world / "train"], PairsConfig(image_size=64, patch_size=8))
    keys = colour_keys(dataset)
    phases = plan_phases(dataset, steps=4, epochs=0, curriculum_steps=0, batch_size=8,
                         world_size=1, colour_groups=4)
    sampler = StepBatchSampler(phases, 8, seed=1)
    order = grouped_order(keys, 4, seed=1, epoch=0)
    assert [i for i, _ in sampler.batch(0)] == order[:8].tolist()


def test_colour_groups_need_the_world_meta(synth_world: Path, tmp_path: Path) -> None:
    import shutil

    train = shutil.copytree(synth_world / "train", tmp_path / "train")
    (train / "meta.jsonl").unlink()
    dataset = PairDataset([train], PairsConfig(image_size=64, patch_size=8))
    with pytest.raises(DataError, match="colour_groups needs .*meta.jsonl"):
        colour_keys(dataset)
    with pytest.raises(ConfigError, match="colour_groups must be >= 0"):
        TrainConfig(colour_groups=-1)


def test_object_captions_name_every_object_and_nothing_else(synth_world: Path) -> None:
    from segclip.training.data import object_captions

    dataset = PairDataset([synth_world / "train"], PairsConfig(image_size=64, patch_size=8))
    before = [dataset.caption(i) for i in range(len(dataset))]
    object_captions(dataset)
    meta = [json.loads(line) for line in
            (synth_world / "train" / "meta.jsonl").read_text().splitlines()]
    for index, record in enumerate(meta):
        names = [o["class"] for o in record["objects"]]
        caption = dataset.caption(index)
        words = caption.replace(" and ", " | ").split(" | ")
        assert [w.split(" ", 1)[1] for w in words] == names, caption
        assert all(w.split(" ", 1)[0] == ("an" if n[0] in "aeiou" else "a")
                   for w, n in zip(words, names))
    assert before != [dataset.caption(i) for i in range(len(dataset))]
    with pytest.raises(ConfigError, match="captions must be 'given' or 'objects'"):
        TrainConfig(captions="positions")

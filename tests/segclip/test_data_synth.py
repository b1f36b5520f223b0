"""The synthetic shapes world: determinism, mask/caption consistency, held-out combinations."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segclip.data.captions import POSITION_PHRASES, position_words
from segclip.data.synth import (
    CLASSES,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_CLASSES,
    SynthConfig,
    class_id,
    generate,
    make_scene,
)
from segclip.errors import ConfigError, DataError

CONFIG = SynthConfig(num=40, val_num=24, eval_num=24, seed=3, size=64)
MENTION = re.compile(
    rf"\b(a|an|two|three) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(s?)\b"
)
NUMBERS = {"a": 1, "an": 1, "two": 2, "three": 3}
BACKGROUND_WORDS = ("background", "grey", "gray", "brown", "teal", "beige", "tan", "slate")


def caption_counts(caption: str) -> Counter:
    """Independent parse of a caption: class name -> instance count."""
    counts: Counter = Counter()
    for number, colour, shape, plural in MENTION.findall(caption):
        assert (plural == "s") == (NUMBERS[number] > 1), caption
        counts[f"{colour} {shape}"] += NUMBERS[number]
    return counts


def read_meta(split_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (split_dir / "meta.jsonl").read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(CONFIG, tmp_path_factory.mktemp("synth") / "world")


def test_vocabulary_and_held_out() -> None:
    assert len(CLASSES) == 24 and len(set(CLASSES)) == 24
    assert CLASSES[0] == "red circle" and class_id("red circle") == 1
    assert class_id("orange star") == 24
    assert set(HELD_OUT) <= set(CLASSES) and len(HELD_OUT) == 4
    assert len({name.split()[0] for name in HELD_OUT}) == 4  # spread across colours
    assert len({name.split()[1] for name in HELD_OUT}) == 4  # and shapes
    assert not set(HELD_OUT) & set(TRAIN_CLASSES) and len(TRAIN_CLASSES) == 20


def test_layout(world: Path) -> None:
    assert (world / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert (world / "held_out.txt").read_text().splitlines() == list(HELD_OUT)
    pairs = [json.loads(line) for line in (world / "train/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == CONFIG.num and set(pairs[0]) == {"image", "caption"}
    assert pairs[0]["image"] == "images/000001.png"
    assert (world / "train/images/000040.png").is_file()
    for split in ("val", "eval"):
        root = world / split
        ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
        assert ids == [f"{i:06d}" for i in range(1, 25)]
        assert (root / "classes.txt").read_text().splitlines() == list(CLASSES)
        image = Image.open(root / "JPEGImages" / f"{ids[0]}.png")
        mask = Image.open(root / "SegmentationClass" / f"{ids[0]}.png")
        assert image.mode == "RGB" and image.size == (64, 64)
        assert mask.mode == "P" and mask.size == (64, 64)


def test_same_seed_same_bytes(world: Path, tmp_path: Path) -> None:
    again = all_files(generate(CONFIG, tmp_path / "again"))
    assert again == all_files(world)
    other = generate(SynthConfig(num=3, val_num=0, eval_num=0, seed=4), tmp_path / "other")
    assert (other / "train/images/000001.png").read_bytes() != again["train/images/000001.png"]


def test_files_equal_make_scene(world: Path) -> None:
    for index in (0, 7):
        scene = make_scene(CONFIG, "eval", index)
        name = f"{index + 1:06d}.png"
        assert np.array_equal(np.asarray(Image.open(world / "eval/JPEGImages" / name)), scene.image)
        assert np.array_equal(np.asarray(Image.open(world / "eval/SegmentationClass" / name)),
                              scene.mask)
        train = make_scene(CONFIG, "train", index)
        assert np.array_equal(np.asarray(Image.open(world / "train/images" / name)), train.image)


@pytest.mark.parametrize("split", ["train", "val", "eval"])
def test_caption_names_exactly_the_mask_classes(world: Path, split: str) -> None:
    metas = read_meta(world / split)
    for index, meta in enumerate(metas):
        scene = make_scene(CONFIG, split, index)
        counts = caption_counts(meta["caption"])
        mask_ids = set(np.unique(scene.mask).tolist()) - {0, 255}
        assert {class_id(name) for name in counts} == mask_ids, meta["caption"]
        assert counts == Counter(obj["class"] for obj in meta["objects"]), meta["caption"]
        assert all(obj["pixels"] >= 8 for obj in meta["objects"])
        assert not any(word in meta["caption"].split() for word in BACKGROUND_WORDS)


def test_held_out_only_outside_training(world: Path) -> None:
    held_ids = {class_id(name) for name in HELD_OUT}
    for index, meta in enumerate(read_meta(world / "train")):
        assert not set(caption_counts(meta["caption"])) & set(HELD_OUT)
        assert not any(name in meta["caption"] for name in HELD_OUT)
        assert not set(np.unique(make_scene(CONFIG, "train", index).mask).tolist()) & held_ids
    for split in ("val", "eval"):
        seen = set()
        for path in (world / split / "SegmentationClass").glob("*.png"):
            seen |= set(np.unique(np.asarray(Image.open(path))).tolist())
        assert held_ids <= seen  # 24 images cycle through all 24 classes


def test_mask_matches_image_colours(world: Path) -> None:
    for index in range(12):
        scene = make_scene(CONFIG, "val", index)
        assert set(np.unique(scene.mask).tolist()) <= {0, 255, *range(1, 25)}
        for cid in set(np.unique(scene.mask).tolist()) - {0, 255}:
            colour = np.array(COLOURS[CLASSES[cid - 1].split()[0]])
            pixels = scene.image[scene.mask == cid].astype(int)  # (n, 3)
            assert np.abs(pixels - colour).max() <= 18 + 12  # jitter + noise
        ignore = scene.mask == 255  # only thin borders: a labelled pixel within 2 px of each
        padded = np.pad(scene.mask, 2, mode="edge")
        near = np.stack([padded[2 + dy:66 + dy, 2 + dx:66 + dx]
                         for dy in range(-2, 3) for dx in range(-2, 3)])  # (25, H, W)
        assert 0 < ignore.mean() < 0.2
        assert (near != 255).any(axis=0)[ignore].all()


def test_position_words_follow_layout(world: Path) -> None:
    phrase_to_place = {p: place for place, ps in POSITION_PHRASES.items() for p in ps}
    alternatives = "|".join(map(re.escape, sorted(phrase_to_place, key=len, reverse=True)))
    pattern = re.compile(
        rf"\b(?:a|an) ((?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})) "
        rf"({alternatives})"
    )
    prefix = re.compile(rf"^({alternatives}) there is an? (\w+ \w+)$")
    checked = 0
    for meta in read_meta(world / "train") + read_meta(world / "val"):
        found = pattern.findall(meta["caption"])
        found += [(name, where) for where, name in prefix.findall(meta["caption"])]
        for name, where in found:
            (obj,) = [o for o in meta["objects"] if o["class"] == name]
            assert position_words(*obj["centroid"]) == phrase_to_place[where], meta["caption"]
            checked += 1
    assert checked >= 5


def test_bad_config_and_existing_output(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="size must be in 32..1024 pixels, got 8"):
        SynthConfig(size=8)
    with pytest.raises(ConfigError, match="num must be >= 0"):
        SynthConfig(num=-1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="already exists"):
        generate(SynthConfig(num=1, val_num=0, eval_num=0), tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written


def test_other_sizes_render() -> None:
    scene = make_scene(SynthConfig(size=96, seed=1), "eval", 5)
    assert scene.image.shape == (96, 96, 3) and scene.mask.shape == (96, 96)
    assert set(np.unique(scene.mask).tolist()) - {0, 255}

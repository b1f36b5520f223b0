"""Pair sources and the training dataset: every format yields the same samples, augmentation is
deterministic per (seed, epoch, index), and bad input raises `DataError` naming the file."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from segclip.data.pairs import EpochSampler, PairDataset, PairsConfig, epoch_order
from segclip.data.sources import read_image, read_source
from segclip.data.superpixels import build_cache, cache_file, load_segments, patch_labels
from segclip.data.synth import SynthConfig, generate
from segclip.data.transforms import CropBox, RandomResizedCrop, resized_crop, to_tensor
from segclip.errors import ConfigError, DataError
from segclip.runtime.contract import CLIP_MEAN, CLIP_STD

# (image file, caption); image b has two captions, as a COCO image has five
PAIRS = [("a.png", "a red circle"), ("b.png", "two blue stars"), ("b.png", "stars in blue"),
         ("c.png", "an orange square on the left")]
NO_SUPERPIXELS = PairsConfig(superpixels=False, seed=7)


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as shard:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            shard.addfile(info, io.BytesIO(data))


@pytest.fixture
def formats(tmp_path: Path) -> dict[str, Path]:
    """The same pairs in every supported format."""
    images = {"a.png": png_bytes(0, (40, 48)), "b.png": png_bytes(1, (64, 40)),
              "c.png": png_bytes(2, (50, 50))}
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    jsonl = folder / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in PAIRS))
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        with open(folder / f"pairs{suffix}", "w", newline="") as table:
            writer = csv.writer(table, delimiter=delimiter)
            writer.writerow(["image", "caption"])
            writer.writerows(PAIRS)
    karpathy = {"images": [
        {"filepath": "imgs", "filename": name, "split": "train",
         "sentences": [{"raw": c, "tokens": c.split()} for i, c in PAIRS if i == name]}
        for name in images] + [{"filepath": "imgs", "filename": "a.png", "split": "val",
                                "sentences": [{"raw": "not a training caption"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    coco = {"images": [{"id": k, "file_name": name} for k, name in enumerate(images)],
            "annotations": [{"id": 10 + n, "image_id": list(images).index(i), "caption": c}
                            for n, (i, c) in enumerate(PAIRS)]}
    (folder / "captions_train.json").write_text(json.dumps(coco))
    shards = tmp_path / "shards"
    shards.mkdir()
    members = [(f"{n:09d}.png", images[i]) for n, (i, _) in enumerate(PAIRS)]
    members += [(f"{n:09d}.txt", c.encode()) for n, (_, c) in enumerate(PAIRS)]
    write_tar(shards / "00000.tar", sorted(members[:2] + members[4:6]))  # keys 0, 1
    write_tar(shards / "00001.tar", sorted(members[2:4] + members[6:8]))  # keys 2, 3
    return {"jsonl": jsonl, "folder": folder, "csv": folder / "pairs.csv",
            "tsv": folder / "pairs.tsv", "karpathy": tmp_path / "dataset_coco.json",
            "coco": folder / "captions_train.json", "shards": shards,
            "one_shard": shards / "00000.tar"}


@pytest.mark.parametrize("kind", ["folder", "csv", "tsv", "karpathy", "coco", "shards"])
def test_every_format_yields_the_same_samples(formats: dict[str, Path], kind: str) -> None:
    reference = PairDataset(formats["jsonl"], NO_SUPERPIXELS)
    dataset = PairDataset(formats[kind], NO_SUPERPIXELS)
    assert len(dataset) == len(PAIRS)
    for index in range(len(PAIRS)):
        expected, sample = reference[(index, 3)], dataset[(index, 3)]
        assert dataset.caption(index) == PAIRS[index][1]
        assert set(sample) == {"image", "tokens", "box", "index"}
        for key in expected:
            assert torch.equal(sample[key], expected[key]), (kind, index, key)


def test_source_keys_and_roots(formats: dict[str, Path]) -> None:
    source = read_source(formats["jsonl"])
    assert source.root == formats["folder"] and [r.key for r in source.images()] == ["a", "b", "c"]
    shard = read_source(formats["one_shard"])
    assert [p.image.key for p in shard.pairs] == ["00000/000000000", "00000/000000001"]
    assert [p.caption for p in shard.pairs] == [c for _, c in PAIRS[:2]]
    assert read_image(shard.pairs[1].image).size == (64, 40)
    karpathy = read_source(formats["karpathy"])  # split == "train" only; one sample per caption
    assert [p.caption for p in karpathy.pairs] == [c for _, c in PAIRS]
    assert karpathy.images()[0].key == "imgs/a"


def test_sample_contents(formats: dict[str, Path]) -> None:
    dataset = PairDataset(formats["jsonl"], PairsConfig(image_size=32, patch_size=8,
                                                        superpixels=False))
    sample = dataset[(1, 0)]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["tokens"], open_clip.tokenize(PAIRS[1][1], context_length=32)[0])
    assert sample["tokens"].shape == (32,) and int(sample["index"]) == 1
    x0, y0, x1, y1 = sample["box"].tolist()
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert (x1 - x0) * (y1 - y0) >= 0.5 - 0.05  # scale >= 0.5 up to rounding


def test_deterministic_per_seed_epoch_index(formats: dict[str, Path]) -> None:
    dataset = PairDataset(formats["jsonl"], NO_SUPERPIXELS)
    again = PairDataset(formats["jsonl"], NO_SUPERPIXELS)
    assert torch.equal(dataset[(2, 5)]["image"], again[(2, 5)]["image"])
    boxes = {tuple(dataset[(2, epoch)]["box"].tolist()) for epoch in range(6)}
    assert len(boxes) > 1  # a new crop each epoch
    dataset.set_epoch(5)
    assert torch.equal(dataset[2]["box"], again[(2, 5)]["box"])
    other_seed = PairDataset(formats["jsonl"], PairsConfig(superpixels=False, seed=8))
    assert any(not torch.equal(other_seed[(i, 0)]["box"], dataset[(i, 0)]["box"])
               for i in range(4))


def test_epoch_sampler_resumes() -> None:
    sampler = EpochSampler(10, seed=1, epoch=2)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(10)) and {e for _, e in full} == {2}
    assert [i for i, _ in full] == epoch_order(10, 1, 2).tolist()
    assert list(EpochSampler(10, seed=1, epoch=2, start=4)) == full[4:]
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in full] and len(sampler) == 10
    with pytest.raises(ConfigError, match="start must be in 0..10, got 11"):
        sampler.set_epoch(0, start=11)


def test_superpixel_labels_follow_the_crop(tmp_path: Path) -> None:
    world = generate(SynthConfig(num=4, val_num=0, eval_num=0, seed=2), tmp_path / "world")
    with pytest.raises(DataError, match="segclip-data superpixels"):
        PairDataset(world)
    build_cache(world, progress=False)
    dataset = PairDataset(world, PairsConfig(image_size=64, patch_size=8, seed=3))
    source = dataset.sources[0]
    for index in range(4):
        sample = dataset[(index, 1)]
        ref = source.pairs[index].image
        rng = np.random.default_rng([3, 1, index])
        image, box = RandomResizedCrop(64)(read_image(ref), rng)
        assert torch.equal(sample["image"], to_tensor(image))
        assert torch.allclose(sample["box"], torch.tensor(box.normalized()))
        expected = patch_labels(load_segments(cache_file(source, ref)), box.normalized(), 64, 8)
        assert sample["patch_labels"].dtype == torch.int64 and sample["patch_labels"].shape == (64,)
        assert torch.equal(sample["patch_labels"], torch.from_numpy(expected))


def test_to_tensor_normalises_with_clip_stats() -> None:
    image = Image.new("RGB", (2, 2), (255, 0, 255))
    tensor = to_tensor(image)
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1],
                (1 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert tensor.shape == (3, 2, 2)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor(expected))
    crop = resized_crop(Image.new("RGB", (10, 8), (9, 9, 9)), CropBox(1, 2, 4, 5, 8, 10), 6)
    assert crop.size == (6, 6)


def test_errors_name_the_file(formats: dict[str, Path], tmp_path: Path) -> None:
    folder = formats["folder"]
    with pytest.raises(DataError, match="does not exist"):
        read_source(tmp_path / "nope.jsonl")
    (folder / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_source(folder / "bad.jsonl")
    (folder / "missing.jsonl").write_text('{"image": "gone.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"gone\.png not found"):
        read_source(folder / "missing.jsonl")
    (folder / "cols.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(DataError, match="needs columns 'image' and 'caption'"):
        read_source(folder / "cols.csv")
    (folder / "pairs.parquet").write_text("x")
    with pytest.raises(DataError, match="unsupported data file"):
        read_source(folder / "pairs.parquet")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.jsonl").write_text('{"image": "broken.png", "caption": "x"}\n')
    dataset = PairDataset(folder / "broken.jsonl", NO_SUPERPIXELS)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        dataset[0]
    (tmp_path / "gz.tar").write_bytes(gzip.compress(formats["one_shard"].read_bytes()))
    with pytest.raises(DataError, match=r"gz\.tar .*uncompressed"):
        read_source(tmp_path / "gz.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no pairs.jsonl"):
        read_source(tmp_path / "empty")
    with pytest.raises(DataError, match="no data sources"):
        PairDataset([], NO_SUPERPIXELS)


def test_concatenated_sources(formats: dict[str, Path]) -> None:
    both = PairDataset([formats["jsonl"], formats["one_shard"]], NO_SUPERPIXELS)
    assert len(both) == len(PAIRS) + 2
    assert both.caption(len(PAIRS)) == PAIRS[0][1]
    assert torch.equal(both[(len(PAIRS) + 1, 0)]["tokens"],
                       PairDataset(formats["one_shard"], NO_SUPERPIXELS)[(1, 0)]["tokens"])

"""Superpixels: patch labels against a literal loop reference and the official torch code, crop
consistency between image and map, and the resumable atomic cache."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segclip.data.sources import read_source
from segclip.data.superpixels import (
    FelzenszwalbParams,
    build_cache,
    cache_file,
    crop_segments,
    load_segments,
    nearest_indices,
    patch_labels,
    save_segments,
    segment,
)
from segclip.data.synth import SynthConfig, generate
from segclip.data.transforms import CropBox, resized_crop, sample_crop
from segclip.errors import ConfigError, DataError


def reference_patch_labels(segments, box, size, patch):
    """The rule written out with loops: box as exact Fractions (or floats), floor/ceil crop,
    torch-'nearest' resize (float32 index arithmetic), truncated mean per patch."""
    height, width = len(segments), len(segments[0])
    top, bottom, left, right = 0, height, 0, width
    if box is not None:
        x0, y0, x1, y1 = box
        left, right = math.floor(x0 * width), math.ceil(x1 * width)
        top, bottom = math.floor(y0 * height), math.ceil(y1 * height)
        if bottom - top < 2 or right - left < 2:
            top, bottom, left, right = 0, height, 0, width
    crop = [[int(segments[y][x]) for x in range(left, right)] for y in range(top, bottom)]
    crop_h, crop_w = len(crop), len(crop[0])
    scale_h = np.float32(crop_h) / np.float32(size)
    scale_w = np.float32(crop_w) / np.float32(size)
    resized = [[0] * size for _ in range(size)]
    for i in range(size):
        src_i = min(int(np.floor(np.float32(i) * scale_h)), crop_h - 1)
        for j in range(size):
            src_j = min(int(np.floor(np.float32(j) * scale_w)), crop_w - 1)
            resized[i][j] = crop[src_i][src_j]
    labels = []
    for pi in range(size // patch):
        for pj in range(size // patch):
            total = 0
            for di in range(patch):
                for dj in range(patch):
                    total += resized[pi * patch + di][pj * patch + dj]
            labels.append(int(total / (patch * patch)))
    return labels


def official_patch_labels(segments, box, size, patch):
    """The official `get_felzenszwalb_from_cache` body (torch interpolate, np.mean, cast)."""
    crop = crop_segments(segments, box)
    tensor = torch.tensor(crop).reshape(1, 1, *crop.shape).to(torch.float)
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="nearest")
    resized = resized.squeeze().to(torch.long).numpy()
    grid = size // patch
    blocks = resized.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(grid * grid, -1)  # '(x1 p1) (x2 p2) -> (x1 x2) (p1 p2)'
    return np.mean(blocks, axis=-1).astype(np.int64)


def random_map(rng, height, width, segments=40):
    return rng.integers(0, segments, size=(height, width)).astype(np.int64)


CASES = [(64, 64, 64, 8), (50, 70, 64, 8), (37, 91, 64, 16), (224, 224, 224, 16), (120, 90, 96, 8)]


@pytest.mark.parametrize("height,width,size,patch", CASES)
def test_patch_labels_equal_loop_reference(height: int, width: int, size: int, patch: int) -> None:
    rng = np.random.default_rng(height * width)
    segments = random_map(rng, height, width)
    boxes = [None, (0.0, 0.0, 1.0, 1.0), (0.999, 0.2, 1.0, 0.9), (0.1, 0.1, 0.1, 0.1)]
    for _ in range(3):  # arbitrary float boxes
        (x0, x1), (y0, y1) = np.sort(rng.uniform(0, 1, (2, 2)), axis=1).tolist()
        boxes.append((x0, y0, x1, y1))
    for _ in range(3):  # crop boxes the augmentation produces, checked with exact fractions
        box = sample_crop(width, height, rng)
        labels = patch_labels(segments, box.normalized(), size, patch)
        exact = (Fraction(box.left, width), Fraction(box.top, height),
                 Fraction(box.left + box.width, width), Fraction(box.top + box.height, height))
        assert labels.tolist() == reference_patch_labels(segments, exact, size, patch)
    for box in boxes:
        labels = patch_labels(segments, box, size, patch)
        assert labels.dtype == np.int64 and labels.shape == ((size // patch) ** 2,)
        assert labels.tolist() == reference_patch_labels(segments, box, size, patch)
        assert np.array_equal(labels, official_patch_labels(segments, box, size, patch))


def test_nearest_indices_match_torch() -> None:
    for in_size in (1, 3, 37, 50, 63, 64, 100, 113, 224, 300):
        for out_size in (64, 96, 224):
            grid = torch.arange(in_size, dtype=torch.float).reshape(1, 1, in_size, 1)
            expected = torch.nn.functional.interpolate(grid, size=(out_size, 1), mode="nearest")
            assert nearest_indices(in_size, out_size).tolist() == expected.flatten().long().tolist()


def test_mean_not_majority_and_small_box() -> None:
    segments = np.zeros((8, 8), np.int64)
    segments[0, 0] = 9  # in the 2x2 patch: [9, 0, 0, 0] -> mean 2.25 -> 2 (a vote would give 0)
    assert patch_labels(segments, None, 8, 2)[0] == 2
    box = (0.5, 0.5, 0.6, 0.6)  # under 2 px of the map: the whole map is used
    assert np.array_equal(crop_segments(segments, box), segments)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        patch_labels(segments, None, 10, 4)


def test_crop_matches_image_crop() -> None:
    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (48, 80), (97, 61)):
        segments = random_map(rng, height, width, segments=200)
        half = segments[::2, ::2]  # a map stored at half resolution
        for _ in range(30):
            box = sample_crop(width, height, rng)
            edges = box.normalized()
            same = segments[box.top:box.top + box.height, box.left:box.left + box.width]
            assert np.array_equal(crop_segments(segments, edges), same)
            (hh, hw), bottom, right = half.shape, box.top + box.height, box.left + box.width
            top, bottom = math.floor(Fraction(box.top * hh, height)), math.ceil(
                Fraction(bottom * hh, height))
            left, right = math.floor(Fraction(box.left * hw, width)), math.ceil(
                Fraction(right * hw, width))
            assert np.array_equal(crop_segments(half, edges), half[top:bottom, left:right])


def test_patch_labels_align_with_resized_image() -> None:
    """A two-colour image, segments = its colours: after the same crop, every pixel away from the
    colour edge has the colour its resized label says."""
    rng = np.random.default_rng(1)
    size = 64
    for _ in range(10):
        height, width = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        edge = int(rng.integers(width // 3, 2 * width // 3))
        segments = np.zeros((height, width), np.int64)
        segments[:, edge:] = 1
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[segments == 0] = (255, 0, 0)
        pixels[segments == 1] = (0, 0, 255)
        box = sample_crop(width, height, rng)
        image = np.asarray(resized_crop(Image.fromarray(pixels), box, size)).astype(int)
        crop = crop_segments(segments, box.normalized())
        labels = crop[nearest_indices(crop.shape[0], size)[:, None],
                      nearest_indices(crop.shape[1], size)[None, :]]  # (S, S)
        padded = np.pad(labels, 2, mode="edge")
        window = np.stack([padded[2 + dy:size + 2 + dy, 2 + dx:size + 2 + dx]
                           for dy in range(-2, 3) for dx in range(-2, 3)])
        uniform = (window == labels).all(axis=0)
        colour = (image[..., 2] > image[..., 0]).astype(np.int64)
        assert uniform.mean() > 0.5
        assert np.array_equal(colour[uniform], labels[uniform])


def test_params_scaling_rule() -> None:
    assert FelzenszwalbParams.for_side(224) == FelzenszwalbParams(224.0, 0.9, 224)
    small = FelzenszwalbParams.for_side(64)
    assert small.scale == pytest.approx(224 * (64 / 224) ** 2)
    assert small.sigma == pytest.approx(0.9 * 64 / 224) and small.min_size == 18
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), np.uint8))
    assert segment(big).shape == (224, 336)  # stored at short side 224, as the reference
    assert segment(big, max_short_side=None).shape == (300, 450)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    return generate(SynthConfig(num=6, val_num=0, eval_num=0, seed=5), tmp_path / "world")


def test_cache_is_complete_resumable_and_atomic(world: Path) -> None:
    report = build_cache(world, progress=False)
    source = read_source(world)
    assert (report.computed, report.skipped) == (6, 0)
    assert report.folder == world / "train" / "superpixels"
    files = [cache_file(source, ref) for ref in source.images()]
    assert files[0] == world / "train/superpixels/images/000001.npz"
    first = load_segments(files[0])
    image = np.asarray(Image.open(world / "train/images/000001.png"))
    assert first.shape == image.shape[:2] and first.dtype == np.int64
    assert np.array_equal(first, segment(Image.fromarray(image)))
    files[1].unlink()
    stamp = files[0].stat().st_mtime_ns
    again = build_cache(world, progress=False)
    assert (again.computed, again.skipped) == (1, 5) and files[1].is_file()
    assert files[0].stat().st_mtime_ns == stamp
    assert not list(report.folder.rglob("*.tmp"))
    assert json.loads((report.folder / "params.json").read_text())["max_short_side"] == 224
    with pytest.raises(DataError, match="other parameters"):
        build_cache(world, max_short_side=100, progress=False)


def test_cache_errors(tmp_path: Path) -> None:
    path = tmp_path / "a" / "x.npz"
    save_segments(path, np.arange(6).reshape(2, 3))
    assert load_segments(path).tolist() == [[0, 1, 2], [3, 4, 5]]
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="x.npz is corrupt"):
        load_segments(path)
    with pytest.raises(DataError, match="missing.npz not found"):
        load_segments(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="workers"):
        build_cache(tmp_path, workers=0)


def test_crop_box_edges() -> None:
    box = CropBox(top=3, left=10, height=40, width=50, image_height=64, image_width=64)
    assert box.normalized() == (10 / 64, 3 / 64, 60 / 64, 43 / 64)

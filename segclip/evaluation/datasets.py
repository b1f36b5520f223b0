"""Evaluation datasets (docs/official-implementation.md §4): class-list presets and the VOC folder
layout.

Presets carry the official class names (index 1..K; 0 is background, 255 ignore) and background
thresholds: VOC 0.80, Pascal Context 0.25, COCO-Object 0.65. Any VOC-layout folder works with a
`classes.txt`:

    ROOT/JPEGImages/ID.jpg|png, ROOT/SegmentationClass/ID.png (index PNG),
    ROOT/ImageSets/Segmentation/val.txt, ROOT/classes.txt (optional; names classes 1..K)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segclip.errors import DataError
from segclip.runtime.errors import ImageError
from segclip.runtime.images import DEFAULT_MAX_PIXELS, load_image

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@dataclass(frozen=True)
class ClassPreset:
    name: str
    file: str  # package data file under segclip/evaluation/classes/
    threshold: float  # background threshold of the official config


PRESETS: dict[str, ClassPreset] = {
    "voc": ClassPreset("voc", "voc.txt", 0.80),
    "context": ClassPreset("context", "context.txt", 0.25),
    "coco-object": ClassPreset("coco-object", "coco_object.txt", 0.65),
}


@dataclass(frozen=True)
class ClassList:
    names: tuple[str, ...]  # classes 1..K (background excluded)
    threshold: float | None  # the preset's background threshold; None for a plain file
    source: str  # preset name or file path


def parse_names(text: str, source: str) -> tuple[str, ...]:
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise DataError(f"class list {source} is empty; write one class name per line")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"class list {source} repeats {duplicates}; names must be unique")
    if names[0].lower() == "background":
        raise DataError(f"class list {source} starts with 'background'; list classes 1..K "
                        "only (0 is always background)")
    return names


def load_classes(spec: str | Path) -> ClassList:
    """A preset name (`voc`, `context`, `coco-object`) or a path to a one-name-per-line file."""
    key = str(spec)
    if key in PRESETS:
        preset = PRESETS[key]
        text = resources.files("segclip.evaluation").joinpath("classes", preset.file).read_text()
        return ClassList(parse_names(text, key), preset.threshold, key)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"class list not found: {path}; pass a file or one of "
                        f"{sorted(PRESETS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"class list {path} is not UTF-8 text") from e
    return ClassList(parse_names(text, str(path)), None, str(path))


@dataclass(frozen=True)
class Sample:
    image_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8: 0 background, 1..K classes, 255 ignore


class VocDataset:
    """The images and index masks of a VOC-layout folder, in `val.txt` order."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise DataError(f"{self.root} is not a VOC-layout folder: {ids_file} is missing "
                            "(expected JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
        self.ids = tuple(line.split()[0] for line in ids_file.read_text().splitlines()
                         if line.strip())
        if not self.ids:
            raise DataError(f"{ids_file} lists no image ids")

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise DataError(f"image {image_id!r} not found in {self.root / 'JPEGImages'} "
                        f"(tried {', '.join(IMAGE_SUFFIXES)})")

    def __getitem__(self, index: int) -> Sample:
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        mask = read_mask(self.root / "SegmentationClass" / f"{image_id}.png")
        if mask.shape != image.shape[:2]:
            raise DataError(f"{image_id}: mask {mask.shape} and image {image.shape[:2]} differ "
                            "in size")
        return Sample(image_id, image, mask)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, read as `segclip-run` reads images (`segclip.runtime.images`): any
    mode (16-bit scaled to 8 bits), EXIF orientation applied, the pixel limit checked first."""
    try:
        return load_image(Path(path), max_pixels=DEFAULT_MAX_PIXELS)
    except ImageError as e:
        raise DataError(str(e)) from e


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices of a palette or greyscale PNG (the palette is not applied)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"mask {path} has mode {im.mode}; expected an index (P) or "
                                "greyscale (L) PNG")
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from e

"""Training augmentation (docs/official-implementation.md §3 "Data"): RandomResizedCrop only, then
CLIP mean/std.

`RandomResizedCrop(S, scale=(0.5, 1), ratio=(3/4, 4/3), bicubic)` as in torchvision, but drawn
from a numpy `Generator` (so a sample's crop is a function of seed, epoch and index) and
returning the crop box, so that the superpixel map is cropped to the same region. The box is
also given as normalised edges (x0, y0, x1, y1) = (left/W, top/H, right/W, bottom/H). The
official code normalises by W-1/H-1 instead, which shifts the superpixel crop by up to a pixel;
we use exact edges so image and map crops coincide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from segclip.errors import ConfigError
from segclip.runtime.contract import CLIP_MEAN, CLIP_STD


class CropBox(NamedTuple):
    """A crop in pixels of an image of size (image_height, image_width)."""

    top: int
    left: int
    height: int
    width: int
    image_height: int
    image_width: int

    def normalized(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): left, top, right and bottom edges as fractions of the image side."""
        return (
            self.left / self.image_width,
            self.top / self.image_height,
            (self.left + self.width) / self.image_width,
            (self.top + self.height) / self.image_height,
        )


def sample_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """torchvision's `RandomResizedCrop.get_params`: 10 tries, then a central crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w, height, width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w, height, width)


def resized_crop(image: Image.Image, box: CropBox, size: int) -> Image.Image:
    """Crop to `box`, then bicubic resize to size×size (torchvision `F.resized_crop` on PIL)."""
    crop = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    return crop.resize((size, size), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → CLIP-normalised float32 tensor (3, H, W)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    normalised = (pixels - mean) / std  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))  # (3, H, W)


@dataclass(frozen=True)
class RandomResizedCrop:
    size: int  # output side S
    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (width / height)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, CropBox]:
        box = sample_crop(image.width, image.height, rng, self.scale, self.ratio)
        return resized_crop(image, box, self.size), box

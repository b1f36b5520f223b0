"""The training dataset of image–caption pairs with superpixel patch labels
(docs/official-implementation.md §3 "Data").

A sample is the reference's: `RandomResizedCrop(S, scale=(0.5, 1), ratio=(3/4, 4/3), bicubic)`,
CLIP mean/std, the caption tokenised with `open_clip.tokenize(caption, context_length=32)`, and
the cached Felzenszwalb map cropped to the same box and reduced to one label per patch.

Determinism: a sample's crop depends only on (seed, epoch, index), and `EpochSampler` draws the
epoch's order from (seed, epoch), so a resumed run sees the same data in the same order whatever
the number of workers. The sampler yields (index, epoch) pairs, which the dataset accepts
(a plain int index uses the epoch last given to `set_epoch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.data import Dataset, Sampler

from segclip.data.sources import Pair, PairSource, read_image, read_source
from segclip.data.superpixels import cache_file, load_segments, patch_labels
from segclip.data.transforms import RandomResizedCrop, to_tensor
from segclip.errors import ConfigError, DataError

DataSpec = PairSource | str | Path


@dataclass(frozen=True)
class PairsConfig:
    image_size: int = 64  # S: crop side fed to the image tower
    patch_size: int = 8  # p: superpixel labels are per p×p patch
    context_length: int = 32  # training text context (SOT + 30 BPE + EOT)
    seed: int = 42  # crops and epoch order derive from (seed, epoch, index)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    superpixels: bool = True  # load cached superpixels and return "patch_labels"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} must be a positive multiple of "
                              f"patch_size {self.patch_size}")
        if self.context_length < 2:
            raise ConfigError(f"context_length must be >= 2, got {self.context_length}")


def epoch_order(length: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of range(length), (length,) int64."""
    return np.random.default_rng([seed, epoch, 0x5E6C]).permutation(length)


class EpochSampler(Sampler):
    """Seeded per-epoch shuffling that can resume mid-epoch; yields (index, epoch) pairs."""

    def __init__(self, length: int, seed: int = 42, epoch: int = 0, start: int = 0) -> None:
        self.length, self.seed = length, seed
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; `start` skips its first samples (resuming after `start` samples)."""
        if not 0 <= start <= self.length:
            raise ConfigError(f"start must be in 0..{self.length}, got {start}")
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.length, self.seed, self.epoch)[self.start:]
        return iter([(int(index), self.epoch) for index in order])

    def __len__(self) -> int:
        return self.length - self.start


class PairDataset(Dataset):
    """Image–caption pairs from one or more sources (pairs.jsonl, CSV/TSV, COCO JSON, tar shards).

    Each item is a dict: "image" float32 (3, S, S) CLIP-normalised, "tokens" int64 (C,),
    "patch_labels" int64 ((S/p)²,) when `config.superpixels`, "box" float32 (4,) the crop as
    normalised (x0, y0, x1, y1), and "index" int64 ().
    """

    def __init__(
        self,
        data: DataSpec | Sequence[DataSpec],
        config: PairsConfig = PairsConfig(),
        image_root: str | Path | None = None,
    ) -> None:
        specs = [data] if isinstance(data, (PairSource, str, Path)) else list(data)
        if not specs:
            raise DataError("no data sources given")
        self.sources = [
            s if isinstance(s, PairSource) else read_source(s, image_root) for s in specs
        ]
        self.items: list[tuple[int, Pair]] = [
            (number, pair) for number, source in enumerate(self.sources) for pair in source.pairs
        ]
        self.config = config
        self.crop = RandomResizedCrop(config.image_size, config.crop_scale, config.crop_ratio)
        self.epoch = 0
        if config.superpixels:
            self._check_superpixels()

    def _check_superpixels(self) -> None:
        for source in self.sources:
            images = source.images()
            missing = [ref for ref in images if not cache_file(source, ref).is_file()]
            if missing:
                raise DataError(
                    f"superpixels missing for {len(missing)} of {len(images)} images of "
                    f"{source.origin} (first: {cache_file(source, missing[0])}); run "
                    f"`segclip-data superpixels {source.origin}`"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = (item, self.epoch) if isinstance(item, (int, np.integer)) else item
        number, pair = self.items[int(index)]
        rng = np.random.default_rng([self.config.seed, int(epoch), int(index)])
        image, box = self.crop(read_image(pair.image), rng)
        normalised_box = box.normalized()
        sample = {
            "image": to_tensor(image),  # (3, S, S)
            "tokens": open_clip.tokenize(pair.caption, self.config.context_length)[0],  # (C,)
            "box": torch.tensor(normalised_box, dtype=torch.float32),  # (4,)
            "index": torch.tensor(int(index), dtype=torch.int64),
        }
        if self.config.superpixels:
            segments = load_segments(cache_file(self.sources[number], pair.image))  # (H', W')
            labels = patch_labels(segments, normalised_box, self.config.image_size,
                                  self.config.patch_size)  # (h*w,)
            sample["patch_labels"] = torch.from_numpy(labels)
        return sample

    def caption(self, index: int) -> str:
        return self.items[index][1].caption

"""Can an image tower trained from scratch learn *shape* on the synthetic world within the budget?

A supervised control for the demo model's shape-naming failure: 4-way shape classification
(circle, square, triangle, star) on the single-object training images of a `segclip-data synth`
world, with the same crops as training (`PairDataset`), batch 32, AdamW. Two towers:

- `vit`: the `tiny` preset's open_clip ViT (the image tower SegCLIP trains), CLS output -> linear;
- `cnn`: three 3x3 conv layers with max-pooling -> linear (about 60k parameters).

The last `--holdout` single-object images are never trained on and give the accuracy.

    python scripts/shape_probe.py out/demo/world --towers vit,cnn --steps 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segclip.config import ModelConfig
from segclip.data.pairs import PairDataset, PairsConfig
from segclip.model import SegCLIP

SHAPES = ("circle", "square", "triangle", "star")


def single_object_items(world: Path) -> list[tuple[int, int]]:
    """(index in train/pairs, shape id) of every training image with exactly one object."""
    items = []
    with open(world / "train" / "meta.jsonl", encoding="utf-8") as meta:
        for index, line in enumerate(meta):
            objects = json.loads(line)["objects"]
            if len(objects) == 1:
                items.append((index, SHAPES.index(objects[0]["class"].split()[1])))
    return items


class ViTProbe(nn.Module):
    """The `tiny` SegCLIP image tower (plain ViT, no grouping) with a linear shape head."""

    def __init__(self, **overrides: object) -> None:
        super().__init__()
        config = ModelConfig.preset("tiny", **overrides)
        self.tower = SegCLIP(config).visual
        self.head = nn.Linear(config.embed_dim, len(SHAPES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(images))  # (B, 4)


def cnn_probe() -> nn.Module:
    """A small CNN: three conv blocks, global max-pool, linear (B, 3, S, S) -> (B, 4)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(64, len(SHAPES)))


def run(tower: str, world: Path, steps: int, lr: float, holdout: int, seed: int,
        overrides: dict) -> dict:
    """Train one tower; return its final train loss, held-out accuracy and time."""
    items = single_object_items(world)
    train_items, test_items = items[:-holdout], items[-holdout:]
    config = ModelConfig.preset("tiny", **overrides)
    data = PairDataset([world / "train"], PairsConfig(
        image_size=config.image_size, patch_size=config.patch_size, superpixels=False))
    torch.manual_seed(seed)
    model = ViTProbe(**overrides) if tower == "vit" else cnn_probe()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng, losses, start = np.random.default_rng(seed), [], time.time()
    model.train()
    for step in range(steps):
        batch = [train_items[i] for i in rng.integers(0, len(train_items), 32)]
        images = torch.stack([data[(index, step)]["image"] for index, _ in batch])  # (32,3,S,S)
        loss = F.cross_entropy(model(images), torch.tensor([shape for _, shape in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for first in range(0, len(test_items), 100):
            chunk = test_items[first:first + 100]
            images = torch.stack([data[(index, 0)]["image"] for index, _ in chunk])
            predicted = model(images).argmax(dim=1)  # (n,)
            correct += int((predicted == torch.tensor([s for _, s in chunk])).sum())
    return {"tower": tower, "steps": steps, "lr": lr, "overrides": overrides,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_loss_last100": float(np.mean(losses[-100:])), "chance_loss": float(np.log(4)),
            "heldout_accuracy": correct / len(test_items), "heldout_images": len(test_items),
            "minutes": (time.time() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path, help="a segclip-data synth folder")
    parser.add_argument("--towers", default="vit,cnn")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit", default="{}", help="JSON overrides of the tiny preset")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(tower, args.world, args.steps, args.lr, args.holdout, args.seed,
                json.loads(args.vit) if tower == "vit" else {})
            for tower in args.towers.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

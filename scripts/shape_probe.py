"""Can an image tower trained from scratch learn *shape* on the synthetic world within the budget?

A supervised control for the demo model's shape-naming failure: 4-way shape classification
(circle, square, triangle, star) on the single-object training images of a `segclip-data synth`
world, with the same crops as training (`PairDataset`), batch 32, AdamW. Two towers:

- `vit`: the `tiny` preset's open_clip ViT (the image tower SegCLIP trains), CLS output -> linear;
- `cnn`: three 3x3 conv layers with max-pooling -> linear (about 60k parameters).

The last `--holdout` single-object images are never trained on and give the accuracy.

    python scripts/shape_probe.py out/demo/train/world --towers vit,cnn --steps 1000
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

    def __init__(self, pool: str = "cls", **overrides: object) -> None:
        super().__init__()
        config = ModelConfig.preset("tiny", **overrides)
        self.model = SegCLIP(config)
        self.tower = self.model.visual
        self.pool = pool
        self.head = nn.Linear(config.embed_dim, len(SHAPES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return self.head(self.tower(images))  # (B, 4)
        tokens, _, _ = self.model.embed_patches(images)  # (B, N, D), no CLS
        for block in self.tower.transformer.resblocks:
            tokens = block(tokens)
        pooled = tokens.amax(dim=1) if self.pool == "max" else tokens.mean(dim=1)  # (B, D)
        return self.head(self.tower.ln_post(pooled) @ self.tower.proj)  # (B, 4)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Label-preserving for the four shapes: random horizontal flip and rot90 per image."""
    out = []
    for image in images:  # (3, S, S)
        k, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
        image = torch.rot90(image, k, dims=(1, 2))
        out.append(torch.flip(image, dims=(2,)) if flip % 2 else image)
    return torch.stack(out)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, embeddings and 1-d parameters."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or "class_embedding" in name
        (keep if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup for `warmup` steps, then cosine to zero (constant when warmup < 0)."""
    if warmup < 0:
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))


def cnn_probe() -> nn.Module:
    """A small CNN: three conv blocks, global max-pool, linear (B, 3, S, S) -> (B, 4)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(64, len(SHAPES)))


def run(tower: str, world: Path, steps: int, lr: float, holdout: int, seed: int,
        overrides: dict, pool: str = "cls", warmup: int = -1, aug: bool = False,
        smoothing: float = 0.0, batch_size: int = 32, weight_decay: float = 0.05) -> dict:
    """Train one tower; return its final train loss, held-out accuracy and time."""
    items = single_object_items(world)
    train_items, test_items = items[:-holdout], items[-holdout:]
    config = ModelConfig.preset("tiny", **overrides)
    data = PairDataset([world / "train"], PairsConfig(
        image_size=config.image_size, patch_size=config.patch_size, superpixels=False))
    torch.manual_seed(seed)
    model = ViTProbe(pool, **overrides) if tower == "vit" else cnn_probe()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    rng, losses, start = np.random.default_rng(seed), [], time.time()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = [train_items[i] for i in rng.integers(0, len(train_items), batch_size)]
        images = torch.stack([data[(index, step)]["image"] for index, _ in batch])  # (B,3,S,S)
        if aug:
            images = augment(images, generator)
        loss = F.cross_entropy(model(images), torch.tensor([shape for _, shape in batch]),
                               label_smoothing=smoothing)
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
    return {"tower": tower, "steps": steps, "lr": lr, "overrides": overrides, "pool": pool,
            "warmup": warmup, "aug": aug, "smoothing": smoothing, "batch": batch_size,
            "train_images": len(train_items),
            "parameters": sum(p.numel() for n, p in model.named_parameters()
                              if not n.startswith("model.") or n.startswith("model.visual.")),
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
    parser.add_argument("--pool", choices=("cls", "max", "mean"), default="cls",
                        help="ViT output: CLS token, or max/mean over the patch tokens")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="warmup steps then cosine decay; -1: constant learning rate")
    parser.add_argument("--aug", action="store_true", help="random rot90 and flips")
    parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(tower, args.world, args.steps, args.lr, args.holdout, args.seed,
                json.loads(args.vit) if tower == "vit" else {}, args.pool, args.warmup,
                args.aug, args.smoothing, args.batch, args.weight_decay)
            for tower in args.towers.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

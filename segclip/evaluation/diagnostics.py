"""Diagnostics for the synthetic shapes world: why a model segments as it does.

- grouping oracle: each predicted region labelled with its majority true class (ignore excluded),
  mIoU of that map: how good the grouping is, whatever the naming;
- colour / shape naming accuracy on true-foreground pixels, from the best foreground label of the
  score maps (the background decision left out), for class names of the form "colour shape";
- centers in use: distinct regions in the pixel map per image (mean), and over the whole set;
- all-background baseline: mIoU of a map that is background everywhere;
- foreground IoU: background-vs-foreground decision alone;
- seen vs held-out: mIoU over the held-out combinations and over the others (foreground only).

Legend: C classes (background included), K labels, H/W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segclip.evaluation.metrics import IGNORE_INDEX, confusion_matrix, iou_per_class, mean_iou
from segclip.evaluation.protocol import Prediction


def majority_labels(region_map: np.ndarray, mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) map of each region's most frequent true class (ignore pixels not counted; a region
    with only ignore pixels gets 0)."""
    regions, inverse = np.unique(region_map, return_inverse=True)  # (R,), (H*W,)
    target = mask.ravel().astype(np.int64)  # (H*W,)
    valid = target != IGNORE_INDEX
    votes = np.zeros((len(regions), num_classes), np.int64)  # (R, C)
    np.add.at(votes, (inverse.ravel()[valid], target[valid]), 1)
    return votes.argmax(axis=1)[inverse].reshape(mask.shape)  # (H, W)


def split_names(names: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(colours, shapes) of names written "colour shape", or None if any name is not."""
    parts = [name.split() for name in names]
    if not all(len(p) == 2 for p in parts):
        return None
    return [p[0] for p in parts], [p[1] for p in parts]


class SynthDiagnostics:
    """Accumulates the diagnostics over images; `summary()` gives the figures (fractions)."""

    def __init__(self, names: Sequence[str], held_out: Sequence[str] = ()) -> None:
        self.names = tuple(names)
        self.num_classes = len(names) + 1
        unknown = sorted(set(held_out) - set(names))
        if unknown:
            raise ValueError(f"held-out classes {unknown} are not in the class list")
        self.held_out = tuple(held_out)
        self.words = split_names(names)
        self.oracle = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.background = np.zeros_like(self.oracle)
        self.binary = np.zeros((2, 2), np.int64)
        self.colour_hits = self.shape_hits = self.foreground = 0
        self.regions_per_image: list[int] = []
        self.regions_used: set[int] = set()

    def update(self, prediction: Prediction, mask: np.ndarray) -> None:
        """Add one image: its protocol output and (H, W) ground truth."""
        region_map = prediction.region_map.numpy()
        oracle = majority_labels(region_map, mask, self.num_classes)
        self.oracle += confusion_matrix(oracle, mask, self.num_classes)
        self.background += confusion_matrix(np.zeros_like(mask), mask, self.num_classes)
        labels = prediction.label_map.numpy()
        binary_target = np.where(mask == IGNORE_INDEX, IGNORE_INDEX, (mask > 0).astype(np.uint8))
        self.binary += confusion_matrix((labels > 0).astype(np.uint8), binary_target, 2)
        used = np.unique(region_map)
        self.regions_per_image.append(len(used))
        self.regions_used.update(int(r) for r in used)
        fg = (mask != 0) & (mask != IGNORE_INDEX)
        if self.words is not None and fg.any():
            best = prediction.scores[1:].argmax(dim=0).numpy()[fg]  # (n,) label index 0..K-1
            truth = mask[fg].astype(np.int64) - 1  # (n,)
            colours, shapes = (np.array(w) for w in self.words)
            self.colour_hits += int((colours[best] == colours[truth]).sum())
            self.shape_hits += int((shapes[best] == shapes[truth]).sum())
            self.foreground += int(fg.sum())

    def summary(self, confusion: np.ndarray) -> dict[str, float | None]:
        """The figures, given the protocol's (C, C) confusion matrix over the same images."""
        held = [self.names.index(n) + 1 for n in self.held_out]
        seen = [c for c in range(1, self.num_classes) if c not in held]
        naming = self.foreground if self.words is not None and self.foreground else None
        return {
            "oracle_miou": mean_iou(self.oracle),
            "all_background_miou": mean_iou(self.background),
            "foreground_iou": float(iou_per_class(self.binary)[1]),
            "colour_accuracy": self.colour_hits / naming if naming else None,
            "shape_accuracy": self.shape_hits / naming if naming else None,
            "centers_per_image": float(np.mean(self.regions_per_image)),
            "centers_used": len(self.regions_used),
            "seen_miou": mean_iou(confusion, seen),
            "held_out_miou": mean_iou(confusion, held) if held else None,
        }

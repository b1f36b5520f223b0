"""Segmentation metrics (docs/official-implementation.md §4): confusion matrix, per-class IoU and
mIoU as mmseg does.

IoU_c = TP / (TP + FP + FN), NaN when class c is absent from both ground truth and prediction;
mIoU is the mean over the classes that are not NaN. Pixels labelled 255 are ignored.
Legend: C classes (background included), H/W pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segclip.errors import DataError

IGNORE_INDEX = 255


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction.

    Args:
        pred: (H, W) predicted labels in [0, C).
        target: (H, W) ground-truth labels in [0, C) or `ignore_index`.
    """
    if pred.shape != target.shape:
        raise DataError(f"prediction {pred.shape} and ground truth {target.shape} differ in shape")
    pred = pred.astype(np.int64).ravel()  # (H*W,)
    target = target.astype(np.int64).ravel()  # (H*W,)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise DataError(f"ground truth holds label {int(target[bad][0])}, outside "
                        f"0..{num_classes - 1} and not the ignore index {ignore_index}; is the "
                        "class list complete?")
    if ((pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f"prediction holds labels outside 0..{num_classes - 1}")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes ** 2)  # (C*C,)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """(C,) float64 IoU per class; NaN where the class has no ground truth and no prediction."""
    tp = np.diag(confusion).astype(np.float64)  # (C,)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp  # (C,) TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean of the non-NaN IoUs (of `classes` only, if given); NaN if all are NaN."""
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[list(classes)]
    valid = iou[~np.isnan(iou)]
    return float(valid.mean()) if valid.size else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def format_table(names: Sequence[str], iou: np.ndarray, miou: float) -> str:
    """A plain-text per-class IoU table (percent), mIoU last."""
    width = max(len("mIoU"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for name, value in zip(names, iou):
        lines.append(f"{name:<{width}}  {'n/a' if np.isnan(value) else f'{100 * value:7.2f}'}")
    lines.append(f"{'-' * width}  -------")
    lines.append(f"{'mIoU':<{width}}  {100 * miou:7.2f}")
    return "\n".join(lines)

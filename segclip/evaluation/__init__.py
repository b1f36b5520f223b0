"""Zero-shot segmentation evaluation (docs/official-implementation.md §4): the official protocol,
mIoU, diagnostics."""

from segclip.evaluation.datasets import PRESETS, ClassList, VocDataset, load_classes
from segclip.evaluation.evaluate import EvalResult, evaluate, evaluate_model
from segclip.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou

__all__ = ["PRESETS", "ClassList", "EvalResult", "VocDataset", "confusion_matrix", "evaluate",
           "evaluate_model", "iou_per_class", "load_classes", "mean_iou"]

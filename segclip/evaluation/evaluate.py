"""Zero-shot evaluation of a checkpoint or a bundle on a VOC-layout set
(docs/official-implementation.md §4).

`evaluate(...)` is what `segclip-eval` calls; `evaluate_model(...)` works on a model in memory
(training uses it for validation). mIoU and IoUs are fractions in [0, 1]; NaN IoUs (class absent
from both ground truth and prediction) are `None` in the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segclip.errors import DataError, SegclipError, WriteError
from segclip.evaluation.datasets import ClassList, VocDataset, load_classes, parse_names
from segclip.evaluation.metrics import confusion_matrix, iou_per_class, mean_iou
from segclip.runtime._atomic import atomic_write_bytes
from segclip.runtime.contract import DEFAULT_THRESHOLD, MANIFEST_FILE

HELD_OUT_FILE = "held_out.txt"


@dataclass(frozen=True)
class EvalResult:
    miou: float
    per_class: dict[str, float | None]  # "background" first, then the classes
    threshold: float
    num_images: int
    confusion: np.ndarray = field(repr=False)  # (C, C) rows = ground truth
    diagnostics: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"miou": self.miou, "per_class": self.per_class,
                               "threshold": self.threshold, "num_images": self.num_images}
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out


def _result(names: Sequence[str], confusion: np.ndarray, threshold: float, count: int,
            diagnostics: dict[str, Any] | None = None) -> EvalResult:
    iou = iou_per_class(confusion)
    per_class = {name: (None if math.isnan(v) else float(v))
                 for name, v in zip(("background", *names), iou)}
    return EvalResult(mean_iou(confusion), per_class, threshold, count, confusion, diagnostics)


def evaluate_model(model: Any, dataset: VocDataset, names: Sequence[str], threshold: float,
                   diagnostics: bool = False, held_out: Sequence[str] = (),
                   limit: int | None = None, progress: bool = False) -> EvalResult:
    """Run the protocol of `segclip.evaluation.protocol` with a torch model over `dataset`."""
    from segclip.evaluation.diagnostics import SynthDiagnostics
    from segclip.evaluation.protocol import Protocol, encode_labels, predict

    was_training = model.training
    model.eval()
    protocol = Protocol(window=model.config.image_size, threshold=threshold)
    text = encode_labels(model, names, protocol.template)  # (K, E)
    confusion = np.zeros((len(names) + 1,) * 2, np.int64)
    extra = SynthDiagnostics(names, held_out) if diagnostics else None
    count = min(len(dataset), limit) if limit else len(dataset)
    for index in tqdm(range(count), desc="eval", unit="img", disable=not progress):
        sample = dataset[index]
        prediction = predict(model, sample.image, text, protocol)
        confusion += confusion_matrix(prediction.label_map.numpy(), sample.mask, len(names) + 1)
        if extra is not None:
            extra.update(prediction, sample.mask)
    model.train(was_training)
    return _result(names, confusion, threshold, count,
                   extra.summary(confusion) if extra is not None else None)


def evaluate_bundle(bundle: Path, dataset: VocDataset, names: Sequence[str],
                    threshold: float | None, device: str = "cpu", limit: int | None = None,
                    progress: bool = False, **segmenter_options: Any) -> EvalResult:
    """The same protocol through the torch-free runtime (`segclip.runtime.Segmenter`; a dense
    bundle runs its own, docs/dense.md); a None threshold is the bundle's."""
    try:
        from segclip.runtime import Segmenter  # lazy: torch-free, optional here
    except ImportError as e:
        raise SegclipError(f"cannot evaluate the bundle {bundle}: segclip.runtime.Segmenter is "
                           f"not available in this install ({e}); evaluate the checkpoint "
                           "instead or install the runtime") from e
    segmenter = Segmenter(bundle, device=device, threshold=threshold, **segmenter_options)
    confusion = np.zeros((len(names) + 1,) * 2, np.int64)
    count = min(len(dataset), limit) if limit else len(dataset)
    for index in tqdm(range(count), desc="eval", unit="img", disable=not progress):
        sample = dataset[index]
        label_map = segmenter.segment(sample.image, list(names)).label_map  # (H, W) uint16
        confusion += confusion_matrix(np.asarray(label_map), sample.mask, len(names) + 1)
    return _result(names, confusion, segmenter.threshold, count)


def dense_options(bundle: Path, preset: str) -> dict[str, Any] | None:
    """For a dense bundle, the dense preset of the class preset `preset` (runtime/
    dense_presets.py: threshold = prob_thd, background names, logit scale, area_thd; only the
    bundle's defaults for a plain class file); None for a SegCLIP bundle."""
    from segclip.runtime.bundle import Bundle
    from segclip.runtime.dense_presets import DENSE_PRESETS

    if Bundle.open(bundle).kind != "dense":
        return None
    chosen = DENSE_PRESETS.get(preset)
    if chosen is None:
        return {"threshold": None}
    return {"threshold": chosen.prob_thd, "background": chosen.background,
            "logit_scale": chosen.logit_scale, "area_thd": chosen.area_thd}


def find_held_out(data: Path) -> tuple[str, ...]:
    """`held_out.txt` beside the set or in its parent (the synthetic world's layout), or ()."""
    for folder in (data, data.parent):
        path = folder / HELD_OUT_FILE
        if path.is_file():
            return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return ()


def resolve_classes(data: Path, classes: str | Path | Sequence[str] | None) -> ClassList:
    """The class list: names (class i = the i-th), a preset name or file, else
    `DATA/classes.txt`."""
    if isinstance(classes, (list, tuple)):
        return ClassList(parse_names("\n".join(classes), "--label"), None, "--label")
    if classes is not None:
        return load_classes(classes)
    default = data / "classes.txt"
    if not default.is_file():
        raise DataError(f"no --classes given and {default} does not exist; pass a classes.txt "
                        "or a preset (voc, context, coco-object)")
    return load_classes(default)


def evaluate(path: str | Path, data: str | Path,
             classes: str | Path | Sequence[str] | None = None,
             threshold: float | None = None, out: str | Path | None = None,
             diagnostics: bool = False, split: str = "val", device: str = "cpu",
             limit: int | None = None, progress: bool = False) -> EvalResult:
    """Evaluate a checkpoint file or a bundle directory; write `out` (JSON) if given.

    The threshold is `threshold`, else the class preset's, else the checkpoint's
    `meta["threshold"]` (a bundle's manifest threshold), else 0.80 (VOC's).
    """
    path, data = Path(path), Path(data)
    if out is not None:
        check_out_file(Path(out))
    class_list = resolve_classes(data, classes)
    dataset = VocDataset(data, split)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise DataError(f"--threshold must be in [0, 1], got {threshold}")
    if path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            raise DataError(f"{path} is a directory but not a bundle (no {MANIFEST_FILE})")
        dense = dense_options(path, class_list.source)  # None: a SegCLIP bundle
        preset = class_list.threshold if dense is None else dense.pop("threshold")
        chosen = threshold if threshold is not None else preset
        result = evaluate_bundle(path, dataset, class_list.names, chosen, device, limit, progress,
                                 **(dense or {}))
    else:
        from segclip.checkpoint import model_from_payload, read_checkpoint
        from segclip.devices import torch_device

        target = torch_device(device)
        payload = read_checkpoint(path)
        model = model_from_payload(payload, path).to(target).eval()
        chosen = _pick_threshold(threshold, class_list, payload.get("meta", {}))
        held_out = find_held_out(data) if diagnostics else ()
        held_out = tuple(n for n in held_out if n in class_list.names)
        result = evaluate_model(model, dataset, class_list.names, chosen, diagnostics, held_out,
                                limit, progress)
    if out is not None:
        write_json(result.to_json(), out)
    return result


def _pick_threshold(threshold: float | None, classes: ClassList, meta: dict[str, Any]) -> float:
    if threshold is not None:
        return float(threshold)
    if classes.threshold is not None:
        return classes.threshold
    if isinstance(meta.get("threshold"), (int, float)):
        return float(meta["threshold"])
    return DEFAULT_THRESHOLD


def check_out_file(path: Path) -> None:
    """Refuse an output file path that is a directory or lies under a file."""
    if path.is_dir():
        raise WriteError(f"--out {path} is a directory; pass a file path such as "
                         f"{path / 'eval.json'}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise WriteError(f"--out {path} lies under {blocker}, which is a file, not a folder; "
                         "choose another --out")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename).

    Raises:
        WriteError: `path` is a directory, lies under a file, or cannot be written.
    """
    path = Path(path)
    check_out_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}; choose another --out") from e
    return path

"""`DenseSegmenter`: a dense bundle (`"kind": "dense"`, docs/dense.md) on ONNX Runtime (CPU).

image -> short side `resize_short_side` (336) -> normalise -> `slide_logits` (windows of the
graph's side, stride half of it, count-map average) -> `assign_dense` (synonyms max,
`prob_thd`, background classes), the logits resized bilinearly to the original image first.
The result is a `SegmentResult` like `Segmenter`'s (label map at the original size).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segclip.runtime import contract
from segclip.runtime.dense import assign_dense, class_text, slide_logits, split_names, upsample
from segclip.runtime.errors import BundleError
from segclip.runtime.images import load_image, normalize, resize_short_side
from segclip.runtime.segmenter import SegmentResult, _summary
from segclip.runtime.templates import IMAGENET_TEMPLATES


class DenseSegmenter:
    """Open-vocabulary segmentation with a dense bundle (module docstring)."""

    def __init__(self, bundle: str | os.PathLike, logit_scale: float | None = None,
                 prob_thd: float | None = None,
                 templates: Sequence[str] = IMAGENET_TEMPLATES) -> None:
        import onnxruntime as ort

        from segclip.runtime.tokenizer import Tokenizer

        self.root = Path(bundle)
        path = self.root / contract.MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: cannot read the bundle manifest ({e})") from None
        if manifest.get("kind") != "dense":
            raise BundleError(f"{self.root} is not a dense bundle (kind "
                              f"{manifest.get('kind', 'segclip')!r}); use Segmenter")
        self.manifest = manifest
        self.mode = manifest["mode"]
        model, prep, protocol = manifest["model"], manifest["preprocessing"], manifest["protocol"]
        self.window = int(prep["window"])
        self.stride = int(prep["stride"])
        self.short_side = int(prep["resize_short_side"])
        self.mean, self.std = tuple(prep["mean"]), tuple(prep["std"])
        self.context_length = int(model["context_length"])
        self.logit_scale = float(protocol["logit_scale"] if logit_scale is None else logit_scale)
        self.prob_thd = float(protocol["prob_thd"] if prob_thd is None else prob_thd)
        self.templates = tuple(templates)
        files = manifest["files"]
        providers = ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(str(self.root / files["image"]), providers=providers)
        self._text = ort.InferenceSession(str(self.root / files["text"]), providers=providers)
        self._tokenizer = Tokenizer.from_file(self.root / files["tokenizer"])

    def _embed(self, prompts: list[str]) -> np.ndarray:
        tokens = self._tokenizer(prompts, self.context_length)  # (T, C)
        (emb,) = self._text.run([contract.TEXT_OUTPUT], {contract.TEXT_INPUT: tokens})
        return emb  # (T, E)

    def _encode(self, crops: np.ndarray) -> np.ndarray:
        (emb,) = self._image.run(["patch_emb"], {contract.IMAGE_INPUT: crops.astype(np.float32)})
        return emb  # (B, N, E)

    def segment(self, image, labels: Sequence[str],
                background: Sequence[str] = ()) -> SegmentResult:
        """Label map of `image` over class lines `labels` ('a, b' = synonyms); classes named in
        `background` (stuff names) count as background."""
        start = time.perf_counter()
        labels = tuple(labels)
        unknown = [b for b in background if b not in labels]
        if unknown:
            raise BundleError(f"background names {unknown} are not among the labels")
        names, owner = split_names(labels)
        text = class_text(names, self.templates, self._embed)  # (T, E)
        rgb = load_image(image)  # (H, W, 3) uint8
        height, width = rgb.shape[:2]
        x = normalize(resize_short_side(rgb, self.short_side), self.mean, self.std)
        logits = slide_logits(x, self._encode, text, self.window, self.stride,
                              self.logit_scale)  # (T, h, w)
        if logits.shape[1:] != (height, width):
            logits = upsample(logits, height, width)  # (T, H, W)
        bg = [labels.index(b) for b in background]
        label_map, score = assign_dense(logits, owner, len(labels), self.prob_thd, bg)
        counts, fractions = _summary(label_map, labels)
        scores = {name: float(score[label_map == k + 1].mean()) if counts[name] else 0.0
                  for k, name in enumerate(labels)}
        total = (time.perf_counter() - start) * 1e3
        return SegmentResult(label_map=label_map, labels=labels, counts=counts,
                             fractions=fractions, timings={"total": total},
                             backend="onnxruntime/CPUExecutionProvider",
                             threshold=self.prob_thd, scores=scores)

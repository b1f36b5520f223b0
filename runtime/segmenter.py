"""`Segmenter`: open-vocabulary segmentation of images with a bundle (docs/architecture.md "Python
API").

    seg = Segmenter("bundle/", device="cpu")
    result = seg.segment("cat.jpg", ["cat", "dog"])
    result.label_map  # (H, W) uint16: 0 background, i = labels[i - 1]

Per image (paper §2.5, docs/official-implementation.md §4, docs/architecture.md "Label
assignment"): load
(`images.load_image`),
resize the short side to S and cut S x S windows (`images.preprocess`), run the windows through
the image tower in batches of at most `batch_size` (a TensorRT profile's maximum caps it),
score each window's regions against the label embeddings (`assign.region_scores`,
`assign.region_labels`), and label every pixel at the original resolution
(`scores.labels_and_scores`: one `assign.window_cells` pass gives the label map and the per-label
scores; or the CUDA kernel when the backend keeps the assignment on the GPU).
Label embeddings are computed once per label set (`embeddings.LabelEmbeddings`).

One `Segmenter` may be used from many threads at once: backends are thread-safe (ONNX Runtime
sessions; one TensorRT context and stream per thread), the embedding cache is locked, and
everything else is per call. Legend: n windows, L regions, T labels, D embedding width,
S window side, H x W pixels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segclip.runtime.assign import region_labels, region_scores
from segclip.runtime.backends import create_backend
from segclip.runtime.backends.base import ImageOutputs, concat_outputs
from segclip.runtime.bundle import Bundle
from segclip.runtime.embeddings import LabelEmbeddings
from segclip.runtime.errors import EngineError, LabelFileError
from segclip.runtime.images import DEFAULT_MAX_PIXELS, ImageSource, PreparedImage, load_image
from segclip.runtime.images import preprocess as preprocess_image
from segclip.runtime.labels import LabelSource, load_labels
from segclip.runtime.scores import labels_and_scores, region_label_probability

BACKGROUND = "background"  # name of label-map value 0 in counts, fractions and legends
DEFAULT_BATCH_SIZE = 16  # windows per image-engine call
STAGES = ("preprocess", "image", "text", "assign", "total")


@dataclass(frozen=True)
class SegmentResult:
    """The segmentation of one image."""

    label_map: np.ndarray = field(repr=False)  # (H, W) uint16: 0 background, i = labels[i-1]
    labels: tuple[str, ...]  # the label set, in label-map order
    counts: dict[str, int]  # pixels per label, "background" first, then every label in order
    fractions: dict[str, float]  # counts / (H * W); sums to 1
    timings: dict[str, float]  # milliseconds: preprocess, image, text, assign, total
    backend: str  # "onnxruntime/CPUExecutionProvider", "tensorrt/TensorRT 10.9 (...)", ...
    threshold: float  # background threshold used
    # label -> mean probability over its pixels (0.0 for a label with no pixels); empty where
    # the labelling ran on the GPU (TensorRT path)
    scores: dict[str, float] = field(default_factory=dict)
    # (H, W) float32 max label probability of each pixel's region, with Segmenter(confidence=True)
    confidence: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the label map: the original image size."""
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def to_json(self) -> dict[str, Any]:
        """Labels, sizes, counts, fractions, timings and backend (no pixels)."""
        height, width = self.size
        return {"width": width, "height": height, "labels": list(self.labels),
                "values": {BACKGROUND: 0, **{name: i + 1 for i, name in enumerate(self.labels)}},
                "counts": dict(self.counts), "fractions": dict(self.fractions),
                "threshold": self.threshold,
                "scores": {k: round(v, 6) for k, v in self.scores.items()},
                "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
                "backend": self.backend}


def _summary(label_map: np.ndarray, labels: tuple[str, ...], counts: np.ndarray | None = None,
             ) -> tuple[dict[str, int], dict[str, float]]:
    """Pixels and fractions per name; `counts` (T + 1,): the label map's, when already known."""
    if counts is None:
        counts = np.bincount(label_map.ravel(), minlength=len(labels) + 1)  # (T + 1,)
    total = max(1, label_map.size)
    names = (BACKGROUND, *labels)
    return ({name: int(c) for name, c in zip(names, counts)},
            {name: float(c) / total for name, c in zip(names, counts)})


class Segmenter:
    """Segments images with a bundle's engines on one device (module docstring).

    A bundle of kind "dense" (docs/dense.md) gives a `DenseSegmenter`
    (runtime/dense_segmenter.py): the same API on the dense protocol."""

    def __new__(cls, bundle: str | os.PathLike | Bundle, *args: Any, **kwargs: Any) -> Segmenter:
        if cls is Segmenter and Bundle.open(bundle).kind == "dense":
            from segclip.runtime.dense_segmenter import DenseSegmenter

            return super().__new__(DenseSegmenter)
        return super().__new__(cls)

    def __init__(self, bundle: str | os.PathLike | Bundle, device: str = "auto",
                 threshold: float | None = None, top_k: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None, variant: str | None = None,
                 threads: int | None = None, confidence: bool = False) -> None:
        """Open the bundle and load its engines (all checks happen here, not mid-run).

        Args:
            bundle: bundle directory, its image.onnx / image.fp16.onnx / image.plan, or a Bundle.
            device: "auto", "cpu" or "cuda" (`segclip.runtime.backends.create_backend`).
            threshold: background threshold in [0, 1] (default: the bundle's).
            top_k: labels kept per window by the global similarity (default: the bundle's).
            max_pixels: refuse larger images (checked from the header, before decoding).
            batch_size: windows per image-engine call (default 16, capped by a TensorRT
                profile's maximum; larger than that maximum is an error).
            cache_dir: also cache label embeddings on disk there.
            variant: image graph, one of runtime/variants.py VARIANTS: ONNX Runtime "fp32",
                "fp16", "int8"; OpenVINO "ov-f32", "ov-bf16", "ov-int8"; "auto" (on the CPU
                the fastest that passed parity, by a probe; `backend_info["auto"]` says which).
            threads: intra-op threads of ONNX Runtime / OpenVINO.
            confidence: also return each pixel's max label probability
                (`SegmentResult.confidence`).
        """
        from segclip.runtime.tokenizer import Tokenizer

        self.bundle = Bundle.open(bundle)
        self.threshold = self._check_threshold(
            self.bundle.threshold if threshold is None else threshold)
        self.top_k = self.bundle.top_k if top_k is None else int(top_k)
        if self.top_k < 1:
            raise EngineError(f"top_k must be >= 1, got {top_k}")
        if max_pixels < 1:
            raise EngineError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = int(max_pixels)
        self.confidence = bool(confidence)
        tokenizer = Tokenizer.from_file(self.bundle.tokenizer_path)
        self._backend = create_backend(self.bundle, device, variant=variant, threads=threads)
        limit = self._backend.max_batch
        if batch_size is None:
            batch_size = min(DEFAULT_BATCH_SIZE, limit or DEFAULT_BATCH_SIZE)
        if batch_size < 1 or (limit is not None and batch_size > limit):
            raise EngineError(
                f"batch_size {batch_size} is outside 1..{limit or 'any'} (the image engine's "
                f"batch profile); pass a smaller batch_size or rebuild with segclip-export trt "
                f"{self.bundle.root} --batch 1:{batch_size}:{batch_size}")
        self.batch_size = int(batch_size)
        self._embeddings = LabelEmbeddings(self.bundle, self._backend, tokenizer, cache_dir)
        self.backend = f"{self._backend.name}/{self._backend.provider}"

    @staticmethod
    def _check_threshold(threshold: float) -> float:
        if not 0.0 <= float(threshold) <= 1.0:
            raise EngineError(f"threshold must be in [0, 1], got {threshold}")
        return float(threshold)

    @property
    def backend_info(self) -> dict[str, Any]:
        """What runs where (backend, device, provider, engine files, precision)."""
        return self._backend.info()

    def labels(self, labels: LabelSource) -> tuple[str, ...]:
        """The label set of a labels file or list, validated (0 is always background)."""
        names = load_labels(labels)
        for index, name in enumerate(names):
            if " ".join(name.split()).casefold() == BACKGROUND:
                raise LabelFileError(
                    f"label {index + 1} is {name!r}: 'background' is reserved for value 0 of "
                    f"the label map (pixels whose best score is below the threshold); remove it "
                    f"from the labels")
        return names

    def embed_labels(self, labels: LabelSource) -> np.ndarray:
        """(T, D) float32 L2-normalised embeddings of the label set (cached, read-only)."""
        return self._embeddings.get(self.labels(labels))[0]

    def _encode(self, windows: np.ndarray) -> ImageOutputs:
        """Image tower on (n, 3, S, S) windows, in batches of at most `batch_size`."""
        parts = [self._backend.run_image(windows[start:start + self.batch_size])
                 for start in range(0, windows.shape[0], self.batch_size)]
        return concat_outputs(parts)

    def _labeler(self, text: np.ndarray, threshold: float):
        scale, top_k = self.bundle.logit_scale, self.top_k

        def label(global_: np.ndarray, regions: np.ndarray, with_scores: bool = False):
            scores = region_scores(regions, global_, text, scale, top_k)  # (n, L, T)
            table = region_labels(scores, threshold)  # (n, L) uint16
            return (table, scores) if with_scores else table
        return label

    def _prepare(self, image: ImageSource) -> tuple[np.ndarray, PreparedImage]:
        array = load_image(image, self.max_pixels)  # (H, W, 3) uint8
        bundle = self.bundle
        return array, preprocess_image(array, bundle.image_size, bundle.mean, bundle.std)

    def _finish(self, label_map: np.ndarray, labels: tuple[str, ...], timings: dict[str, float],
                threshold: float, extras: tuple[np.ndarray | None, np.ndarray | None,
                                                np.ndarray | None],
                ) -> SegmentResult:
        """`extras`: (scores (T,), confidence map (H, W), pixels per value (T + 1,)), each
        None when the path did not compute it."""
        means, confidence, pixels = extras
        counts, fractions = _summary(label_map, labels, pixels)
        scores = {} if means is None else {name: float(v) for name, v in zip(labels, means)}
        return SegmentResult(label_map=label_map, labels=labels, counts=counts,
                             fractions=fractions, timings=timings, backend=self.backend,
                             threshold=threshold, scores=scores, confidence=confidence)

    def segment(self, image: ImageSource, labels: LabelSource,
                threshold: float | None = None) -> SegmentResult:
        """Segment one image (path, PIL image or (H, W, 3) uint8 RGB array) into `labels`.

        Args:
            labels: a labels file path or a list of label names (label i is value i).
            threshold: this call's background threshold (default: the Segmenter's).
        """
        return self.segment_batch([image], labels, threshold)[0]

    def segment_batch(self, images: Sequence[ImageSource], labels: LabelSource,
                      threshold: float | None = None) -> list[SegmentResult]:
        """Segment several images with one label set; the windows of all images share image-
        engine batches (on the CPU path). Raises on the first unreadable image."""
        names = self.labels(labels)
        return self.segment_each(images, [names] * len(images), [threshold] * len(images))

    def segment_each(self, images: Sequence[ImageSource], labels: Sequence[LabelSource],
                     thresholds: Sequence[float | None]) -> list[SegmentResult]:
        """Segment several images, each with its own label set and threshold (None: the
        Segmenter's); the windows of all images share image-engine batches (on the CPU path).
        Raises on the first bad label set, threshold or image."""
        start = time.perf_counter()
        if not len(images) == len(labels) == len(thresholds):
            raise EngineError(f"segment_each needs one label set and threshold per image, got "
                              f"{len(images)} images, {len(labels)} label sets, "
                              f"{len(thresholds)} thresholds")
        if not images:
            return []
        label_sets = [self.labels(names) for names in labels]
        thresholds = [self.threshold if t is None else self._check_threshold(t)
                      for t in thresholds]
        labelers, text_ms = [], []
        for names, threshold in zip(label_sets, thresholds):
            text, ms = self._embeddings.get(names)  # computed once per label set
            labelers.append(self._labeler(text, threshold))
            text_ms.append(ms)
        prepared, prep_ms = [], []
        for image in images:
            began = time.perf_counter()
            prepared.append(self._prepare(image)[1])
            prep_ms.append((time.perf_counter() - began) * 1e3)
        if getattr(self._backend, "device_labeling", False):
            maps, stage_ms = self._label_on_device(prepared, labelers)
            extras = [(None, None, None)] * len(maps)
        else:
            maps, stage_ms, extras = self._label_on_host(prepared, labelers, label_sets)
        results = []
        for index, (label_map, (image_ms, assign_ms)) in enumerate(zip(maps, stage_ms)):
            timings = {"preprocess": prep_ms[index], "image": image_ms,
                       "text": text_ms[index], "assign": assign_ms}
            results.append(self._finish(label_map, label_sets[index], timings,
                                        thresholds[index], extras[index]))
        elapsed = (time.perf_counter() - start) * 1e3
        for result in results:  # one image: wall time; several: the image's own stages
            own = sum(result.timings[k] for k in STAGES[:-1])
            result.timings["total"] = elapsed if len(results) == 1 else own
        return results

    def _label_on_host(self, prepared: list[PreparedImage], labelers: Sequence[Any],
                       label_sets: Sequence[tuple[str, ...]]) -> tuple[
                           list[np.ndarray], list[tuple[float, float]], list[tuple[Any, Any]]]:
        began = time.perf_counter()
        counts = [p.windows.shape[0] for p in prepared]
        windows = prepared[0].windows if len(prepared) == 1 else np.concatenate(
            [p.windows for p in prepared])  # (sum n, 3, S, S)
        outputs = self._encode(windows)
        image_ms = (time.perf_counter() - began) * 1e3
        maps, stages, extras, first = [], [], [], 0
        for item, count, labeler, names in zip(prepared, counts, labelers, label_sets):
            began = time.perf_counter()
            part = slice(first, first + count)
            table, scores = labeler(outputs.global_[part], outputs.regions[part],
                                    with_scores=True)  # (n, L), (n, L, T)
            label_map, pixels, means, confidence = labels_and_scores(
                outputs.assign[part], table, region_label_probability(scores, table),
                len(names), item.resized_hw, item.window, item.original_hw,
                scores.max(axis=-1) if self.confidence else None)  # (H, W), (T+1,), (T,), (H, W)
            extras.append((means, confidence, pixels))
            maps.append(label_map)
            stages.append((image_ms * count / windows.shape[0],
                           (time.perf_counter() - began) * 1e3))
            first += count
        return maps, stages, extras

    def _label_on_device(self, prepared: list[PreparedImage], labelers: Sequence[Any],
                         ) -> tuple[list[np.ndarray], list[tuple[float, float]]]:
        maps, stages = [], []
        for item, labeler in zip(prepared, labelers):
            label_map, ms = self._backend.label_windows(item.windows, labeler, item.resized_hw,
                                                        item.window, item.original_hw)
            maps.append(label_map)
            stages.append((ms["image"], ms["assign"]))
        return maps, stages

    @property
    def text_engine_calls(self) -> int:
        """How many label sets the text tower has computed (cache misses)."""
        return self._embeddings.engine_calls

    def close(self) -> None:
        """Release the engines (and GPU memory); the Segmenter is unusable afterwards."""
        self._backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""`DenseSegmenter`: the `Segmenter` of a dense bundle (`"kind": "dense"`, docs/dense.md).

`Segmenter(bundle)` returns one when the bundle is dense, so every front end (segclip-run,
segclip-serve, segclip-eval, Ray, the benchmarks) runs dense bundles unchanged. Per image
(runtime/dense.py): load -> short side `short_side` (336 for 224 windows) -> normalise ->
windows of the graph's side with the bundle's stride -> image graph in batches -> `LogitMaps`
(window average, resize to the original size, optional PAMR, logit scale) -> `assign_dense`
(synonyms, background names, `prob_thd`, `area_thd`), streamed over chunks of names.

Labels: each label line may hold comma-separated synonyms ("car, truck"); `background` names
(stuff classes, e.g. `VOC_BACKGROUND`) compete like classes and their pixels are 0. A name's
embedding is the mean over the 80 ImageNet templates (runtime/templates.py), computed once per
name and kept (least recently used names dropped past `NAME_ENTRIES`); `cache_dir` also keeps
the template embeddings on disk (runtime/embeddings.py).
Legend: n windows, T names, K classes, E embedding width, S window side, H x W pixels.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from segclip.runtime import contract
from segclip.runtime.backends import create_backend
from segclip.runtime.bundle import Bundle
from segclip.runtime.dense import (
    DenseSettings,
    LogitMaps,
    assign_dense,
    chunk_size,
    class_text,
    crops,
    resized_size,
    split_names,
    upsample,
)
from segclip.runtime.embeddings import LabelEmbeddings
from segclip.runtime.errors import BundleError, EngineError, LabelFileError
from segclip.runtime.images import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    load_image,
    normalize,
    resize_to,
)
from segclip.runtime.labels import LabelSource
from segclip.runtime.segmenter import DEFAULT_BATCH_SIZE, STAGES, Segmenter, SegmentResult
from segclip.runtime.templates import IMAGENET_TEMPLATES
from segclip.runtime.variants import AUTO, is_openvino

NAME_ENTRIES = 4096  # template-averaged name embeddings kept in memory


class DenseSegmenter(Segmenter):
    """Segments images with a dense bundle (module docstring); the API of `Segmenter`."""

    def __init__(self, bundle: str | os.PathLike | Bundle, device: str = "auto",
                 threshold: float | None = None, top_k: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None, variant: str | None = None,
                 threads: int | None = None, confidence: bool = False, *,
                 background: Sequence[str] = (), logit_scale: float | None = None,
                 area_thd: float | None = None, pamr: int = 0,
                 templates: Sequence[str] = IMAGENET_TEMPLATES) -> None:
        """Open the bundle and load its graphs (the arguments of `Segmenter`, and):

        Args:
            threshold: `prob_thd`, background below this winning probability (default: the
                bundle's).
            background: stuff names whose pixels are background (value 0).
            logit_scale: multiplier of the cosine similarities (default: the bundle's).
            area_thd: drop classes covering at most this fraction of the labelled pixels.
            pamr: PAMR refinement steps (0: off).
            templates: prompt templates averaged per name.
        """
        from segclip.runtime.tokenizer import Tokenizer

        self.bundle = Bundle.open(bundle)
        facts = self.bundle.dense
        if facts is None:
            raise BundleError(f"{self.bundle.root} is a SegCLIP bundle, not a dense one; open it "
                              f"with Segmenter")
        if top_k is not None:
            raise EngineError("top_k does not apply to dense bundles (every label is scored at "
                              "every pixel); drop it")
        if variant == AUTO or is_openvino(variant):
            raise EngineError(f"variant {variant!r} is not offered for dense bundles; use fp32, "
                              f"fp16 or int8 (ONNX Runtime)")
        if max_pixels < 1:
            raise EngineError(f"max_pixels must be >= 1, got {max_pixels}")
        if pamr < 0:
            raise EngineError(f"PAMR steps must be >= 0, got {pamr}")
        self.threshold = self._check_threshold(facts.prob_thd if threshold is None else threshold)
        area = facts.area_thd if area_thd is None else float(area_thd)
        if not 0.0 <= area < 1.0:
            raise EngineError(f"area_thd must be in [0, 1), got {area_thd}")
        scale = facts.logit_scale if logit_scale is None else float(logit_scale)
        if not 0.0 < scale <= 1000.0:
            raise EngineError(f"logit_scale must be in (0, 1000], got {logit_scale}")
        self.settings = DenseSettings(logit_scale=scale, prob_thd=self.threshold,
                                      area_thd=area, pamr_steps=int(pamr))
        self.background = tuple(n.strip() for n in background if n.strip())
        self.templates = tuple(templates)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise EngineError("every prompt template needs exactly one {} placeholder")
        self.top_k = 1
        self.max_pixels = int(max_pixels)
        self.confidence = bool(confidence)
        tokenizer = Tokenizer.from_file(self.bundle.tokenizer_path)
        self._backend = create_backend(self.bundle, device, variant=variant, threads=threads)
        if not hasattr(self._backend, "run_patches"):
            raise EngineError(f"{self._backend.name} cannot run a dense bundle; use ONNX Runtime "
                              f"(variants fp32, fp16, int8)")
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise EngineError(f"batch_size must be >= 1, got {batch_size}")
        self._embeddings = LabelEmbeddings(self.bundle, self._backend, tokenizer, cache_dir)
        self._names: OrderedDict[str, np.ndarray] = OrderedDict()
        self._names_lock = threading.Lock()
        self.backend = f"{self._backend.name}/{self._backend.provider}"

    # ---- text ------------------------------------------------------------------------------
    def _name_vector(self, name: str) -> np.ndarray:
        """(E,) the template-averaged embedding of one name (cached)."""
        with self._names_lock:
            cached = self._names.get(name)
            if cached is not None:
                self._names.move_to_end(name)
                return cached
            vector = class_text([name], self.templates,
                                lambda prompts: self._embeddings.get(prompts, "{}")[0])[0]
            vector.setflags(write=False)
            self._names[name] = vector
            while len(self._names) > NAME_ENTRIES:
                self._names.popitem(last=False)
            return vector

    def _text(self, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, float]:
        """((T, E) name embeddings, (T,) owners, milliseconds) of a label set + background."""
        start = time.perf_counter()
        try:
            names, owner = split_names(labels, self.background)
        except ValueError as e:
            raise LabelFileError(str(e)) from None
        keys = [" ".join(n.split()).casefold() for n in names]
        twice = sorted({n for n, key in zip(names, keys) if keys.count(key) > 1})
        if twice:
            raise LabelFileError(f"the names {twice} appear more than once among the labels' "
                                 f"synonyms and the background names; give each name once")
        text = np.stack([self._name_vector(n) for n in names])  # (T, E)
        return text, owner, (time.perf_counter() - start) * 1e3

    def embed_labels(self, labels: LabelSource) -> np.ndarray:
        """(T, E) float32 template-averaged embeddings of every name of the label set (synonyms
        split), then of the background names."""
        return self._text(self.labels(labels))[0]

    # ---- images ----------------------------------------------------------------------------
    def _prepare(self, image: ImageSource) -> dict[str, Any]:
        began = time.perf_counter()
        rgb = load_image(image, self.max_pixels)  # (H, W, 3) uint8
        facts, bundle = self.bundle.dense, self.bundle
        height, width = rgb.shape[:2]
        size = resized_size(height, width, facts.short_side)
        x = normalize(resize_to(rgb, *size), bundle.mean, bundle.std)  # (3, h, w)
        windows, origins = crops(x, facts.window, facts.stride)  # (n, 3, S, S)
        guide = upsample(x, height, width) if self.settings.pamr_steps else None
        return {"windows": windows, "origins": origins, "resized": size,
                "original": (height, width), "guide": guide,
                "ms": (time.perf_counter() - began) * 1e3}

    def _patches(self, windows: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) -> (n, g*g, E) in image-graph batches of at most `batch_size`."""
        parts = [self._backend.run_patches(windows[i:i + self.batch_size])
                 for i in range(0, windows.shape[0], self.batch_size)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def segment_each(self, images: Sequence[ImageSource], labels: Sequence[LabelSource],
                     thresholds: Sequence[float | None]) -> list[SegmentResult]:
        """Segment several images, each with its own label set and threshold (`prob_thd`;
        None: the Segmenter's); the windows of all images share image-graph batches."""
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
        texts = [self._text(names) for names in label_sets]
        prepared = [self._prepare(image) for image in images]
        began = time.perf_counter()
        counts = [p["windows"].shape[0] for p in prepared]
        patches = self._patches(np.concatenate([p["windows"] for p in prepared]))
        image_ms = (time.perf_counter() - began) * 1e3
        results, first = [], 0
        for item, count, names, (text, owner, text_ms), threshold in zip(
                prepared, counts, label_sets, texts, thresholds):
            began = time.perf_counter()
            settings = DenseSettings(self.settings.logit_scale, threshold,
                                     self.settings.area_thd, self.settings.pamr_steps,
                                     self.settings.pamr_dilations)
            maps = LogitMaps(patches[first:first + count], item["origins"], text,
                             item["resized"], item["original"], self.bundle.dense.window,
                             settings, item["guide"])
            label_map, prob = assign_dense(maps, owner, len(names), threshold,
                                           settings.area_thd,
                                           chunk_size(item["original"][0] * item["original"][1]))
            means = np.bincount(label_map.ravel(), weights=prob.ravel(),
                                minlength=len(names) + 1)  # (K + 1,)
            pixels = np.bincount(label_map.ravel(), minlength=len(names) + 1)
            means = np.where(pixels > 0, means / np.maximum(pixels, 1), 0.0)[1:]
            timings = {"preprocess": item["ms"], "image": image_ms * count / sum(counts),
                       "text": text_ms, "assign": (time.perf_counter() - began) * 1e3}
            results.append(self._finish(label_map, names, timings, threshold,
                                        (means, prob if self.confidence else None, pixels)))
            first += count
        elapsed = (time.perf_counter() - start) * 1e3
        for result in results:
            own = sum(result.timings[k] for k in STAGES[:-1])
            result.timings["total"] = elapsed if len(results) == 1 else own
        return results

    @property
    def mode(self) -> str:
        """The bundle's dense mode (naclip, sclip, clearclip, maskclip, scclip)."""
        return self.bundle.dense.mode

    @property
    def backend_info(self) -> dict[str, Any]:
        return {**self._backend.info(), "kind": contract.DENSE_KIND, "mode": self.mode,
                "pamr": self.settings.pamr_steps, "background_names": len(self.background)}

"""Label embeddings, computed once per label set (paper §2.5 "Inference"; docs/runtime-practice.md
feature 1: the label set changes at run time without re-export).

labels -> prompts (the bundle's template) -> tokens (`tokenizer.json`, context C) -> text tower
-> (T, D) L2-normalised embeddings. Results are kept in memory, keyed by the label tuple and
template (least recently used sets are dropped past `MEMORY_ENTRIES`), and optionally on disk as
`.npy` files under `cache_dir/<bundle key>/<labels key>.npy`, written atomically; the bundle key
hashes `segclip.json` and the text engine's file, so a re-exported bundle never reads stale
embeddings. A prompt longer than the context is truncated (open_clip keeps `<end_of_text>`) and
a `LabelTruncatedWarning` names the label. All methods are thread-safe: one lock guards the
cache and the text engine call, so concurrent first requests for a label set compute it once.
Legend: T labels, C context length, D embedding width.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segclip.runtime._atomic import atomic_open
from segclip.runtime.backends.base import Backend
from segclip.runtime.bundle import Bundle
from segclip.runtime.labels import make_prompts
from segclip.runtime.tokenizer import Tokenizer

MEMORY_ENTRIES = 64  # label sets kept in memory


class LabelTruncatedWarning(UserWarning):
    """A label's prompt needed more tokens than the text context holds and was cut."""


class LabelEmbeddings:
    """(T, D) text embeddings of label sets through one backend's text tower, cached."""

    def __init__(self, bundle: Bundle, backend: Backend, tokenizer: Tokenizer,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.bundle, self.backend, self.tokenizer = bundle, backend, tokenizer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        text_engine = str(backend.info().get("text", ""))
        self.bundle_key = hashlib.sha256(
            f"{bundle.manifest_sha256}\n{text_engine}".encode()).hexdigest()[:16]
        self._memory: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.engine_calls = 0  # text tower runs so far (each computes one label set)

    def get(self, labels: Sequence[str], template: str | None = None,
            ) -> tuple[np.ndarray, float]:
        """((T, D) float32 embeddings, milliseconds spent computing them; 0.0 when cached).

        The returned array is shared and read-only.
        """
        template = self.bundle.template if template is None else template
        key = (template, tuple(labels))
        with self._lock:
            cached = self._memory.get(key)
            if cached is not None:
                self._memory.move_to_end(key)
                return cached, 0.0
            start = time.perf_counter()
            embeddings = self._load_disk(key)
            if embeddings is None:
                embeddings = self._compute(key[1], template)
                self._store_disk(key, embeddings)
            embeddings.setflags(write=False)
            self._memory[key] = embeddings
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
            return embeddings, (time.perf_counter() - start) * 1e3

    def _compute(self, labels: tuple[str, ...], template: str) -> np.ndarray:
        prompts = make_prompts(labels, template)
        context = self.bundle.context_length
        batch = self.tokenizer.encode(prompts, context)  # tokens (T, C) int64
        for index in np.flatnonzero(batch.truncated):
            warnings.warn(
                f"label {labels[index]!r} needs {int(batch.lengths[index])} tokens in the prompt "
                f"{prompts[index]!r}, more than the text context of {context}; it was truncated "
                f"to its first {context - 2} tokens", LabelTruncatedWarning, stacklevel=4)
        self.engine_calls += 1
        text = self.backend.run_text(batch.tokens)  # (T, D)
        return np.ascontiguousarray(text, dtype=np.float32)

    def _disk_path(self, key: tuple[str, tuple[str, ...]]) -> Path | None:
        if self.cache_dir is None:
            return None
        payload = json.dumps({"template": key[0], "labels": list(key[1]),
                              "context": self.bundle.context_length}, ensure_ascii=False)
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
        return self.cache_dir / self.bundle_key / f"{digest}.npy"

    def _load_disk(self, key: tuple[str, tuple[str, ...]]) -> np.ndarray | None:
        path = self._disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            warnings.warn(f"ignoring unreadable embedding cache file {path} ({e}); recomputing",
                          RuntimeWarning, stacklevel=4)
            return None
        expected = (len(key[1]), self.bundle.embed_dim)
        if array.shape != expected or array.dtype != np.float32 or not np.isfinite(array).all():
            warnings.warn(f"ignoring embedding cache file {path}: shape {array.shape} "
                          f"{array.dtype}, expected {expected} float32; recomputing",
                          RuntimeWarning, stacklevel=4)
            return None
        return np.ascontiguousarray(array)

    def _store_disk(self, key: tuple[str, tuple[str, ...]], embeddings: np.ndarray) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as handle:
                np.save(handle, embeddings, allow_pickle=False)
        except OSError as e:  # the cache only saves time; the result is unaffected
            warnings.warn(f"cannot write the embedding cache {path} ({e}); continuing without "
                          f"it", RuntimeWarning, stacklevel=4)

"""Response bodies of `POST /v1/segment` (docs/serve.md "API").

`label_png` is the file `segclip-run` writes for the same label map, byte for byte (the same
function, `visualize.label_png`). Masks are COCO RLE
(pycocotools, column-major run lengths, `counts` as the compressed string), one per label in
label order, empty masks included. The overlay is `visualize.overlay_image` as a JPEG.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from segclip.runtime.segmenter import SegmentResult
from segclip.runtime.visualize import label_png, overlay_image

OVERLAY_QUALITY = 90  # = segclip-run's overlay JPEG quality


def rle_masks(label_map: np.ndarray, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """[{"label", "rle": {"size": [H, W], "counts": str}}] for labels 1..T (COCO RLE)."""
    from pycocotools import mask as coco_mask

    out = []
    for value, label in enumerate(labels, start=1):
        binary = np.asfortranarray((label_map == value).astype(np.uint8))  # (H, W) column-major
        rle = coco_mask.encode(binary)
        out.append({"label": label, "rle": {"size": [int(s) for s in rle["size"]],
                                            "counts": rle["counts"].decode("ascii")}})
    return out


def overlay_jpeg(image: np.ndarray, label_map: np.ndarray, labels: tuple[str, ...]) -> bytes:
    buffer = io.BytesIO()
    overlay_image(image, label_map, labels).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def segment_body(result: SegmentResult, image: np.ndarray, outputs: tuple[str, ...],
                 ) -> tuple[dict[str, Any], float]:
    """(the JSON body without timings, milliseconds spent encoding it)."""
    began = time.perf_counter()
    height, width = result.size
    body: dict[str, Any] = {"width": width, "height": height, "labels": list(result.labels),
                            "counts": dict(result.counts), "fractions": dict(result.fractions),
                            "threshold": result.threshold, "backend": result.backend}
    if "label_map" in outputs:
        body["label_map"] = {"encoding": "png",
                             "data": _b64(label_png(result.label_map, len(result.labels)))}
    if "masks" in outputs:
        body["masks"] = rle_masks(result.label_map, result.labels)
    if "scores" in outputs:
        scores = result.scores  # per-label mean probability
        body["scores"] = ({str(k): float(v) for k, v in scores.items()}
                          if isinstance(scores, Mapping) else
                          {label: float(v) for label, v in zip(result.labels, scores)})
    if "overlay" in outputs:
        body["overlay"] = {"encoding": "jpeg",
                           "data": _b64(overlay_jpeg(image, result.label_map, result.labels))}
    encode_ms = (time.perf_counter() - began) * 1e3
    return body, encode_ms

"""Parsing and validation of `POST /v1/segment` and `POST /v1/label-sets` (docs/serve.md "API").

Every client mistake becomes a `Problem`: 400 malformed (bad JSON, bad base64, missing field),
413 body over the limit (Content-Length, then the streamed byte count) or image over
`max_pixels` (read from the header before decoding, so decompression bombs are refused), 415 an
unsupported content type or undecodable image, 422 bad labels or threshold or outputs.
Labels follow `segclip.runtime.labels` (duplicates, blanks) plus the reserved "background".
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from starlette.requests import Request

from segclip.runtime.errors import ImageError, LabelFileError
from segclip.runtime.images import load_image
from segclip.runtime.labels import parse_labels
from segclip.runtime.serve.problems import Problem
from segclip.runtime.serve.settings import OUTPUTS, ServeSettings

BACKGROUND = "background"  # = segclip.runtime.segmenter.BACKGROUND, value 0 of a label map


@dataclass(frozen=True)
class SegmentJob:
    """One validated segment request: what an engine needs."""

    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8 RGB
    labels: tuple[str, ...]
    threshold: float | None  # None: the bundle's


@dataclass(frozen=True)
class SegmentRequest:
    """A parsed segment request before decoding: the raw image and the options."""

    image_bytes: bytes = field(repr=False)
    labels: tuple[str, ...] | None  # None when label_set is given
    label_set: str | None
    threshold: float | None
    outputs: tuple[str, ...]


async def read_body(request: Request, settings: ServeSettings) -> bytes:
    """The request body, refused with 413 past `max_body_mb` (declared or streamed)."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Problem(400, f"Content-Length {declared!r} is not an integer") from None
        if size > limit:
            raise Problem(413, f"request body of {size:,} bytes is over the limit of "
                               f"{limit:,} bytes (--max-body-mb {settings.max_body_mb:g})")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Problem(413, f"request body is over the limit of {limit:,} bytes "
                               f"(--max-body-mb {settings.max_body_mb:g})")
        chunks.append(chunk)
    return b"".join(chunks)


def validate_labels(raw: Any, settings: ServeSettings, where: str = "labels",
                    lines: bool = False) -> tuple[str, ...]:
    """Validated labels from a JSON list (or, with `lines`, text with one label per line)."""
    try:
        if lines:
            labels = parse_labels(str(raw).split("\n"), source=where, file_rules=True)
        elif isinstance(raw, list):
            labels = parse_labels(raw, source=where, file_rules=False)
        else:
            raise Problem(422, f"{where} must be a JSON list of strings, got "
                               f"{type(raw).__name__}")
    except LabelFileError as e:
        raise Problem(422, str(e)) from None
    if len(labels) > settings.max_labels:
        raise Problem(422, f"{len(labels)} labels is over the limit of {settings.max_labels}")
    for index, label in enumerate(labels):
        if len(label) > settings.max_label_chars:
            raise Problem(422, f"{where}[{index}] has {len(label)} characters, over the limit of "
                               f"{settings.max_label_chars}; shorten it")
        if " ".join(label.split()).casefold() == BACKGROUND:
            raise Problem(422, f"{where}[{index}] is {label!r}: 'background' is reserved for "
                               f"value 0 of the label map; remove it")
    return labels


def _threshold(raw: Any) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise Problem(422, f"threshold must be a number in 0..1, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise Problem(422, f"threshold must be a number in 0..1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise Problem(422, f"threshold must be in 0..1, got {value:g}")
    return value


def _outputs(raw: Any, text: bool) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ("label_map",)
    if text:
        raw = json.loads(raw) if str(raw).lstrip().startswith("[") else str(raw).split(",")
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise Problem(422, f"outputs must be a list of names from {list(OUTPUTS)}, got {raw!r}")
    names = tuple(dict.fromkeys(o.strip() for o in raw if o.strip()))
    unknown = [o for o in names if o not in OUTPUTS]
    if unknown or not names:
        raise Problem(422, f"unknown outputs {unknown or raw!r}; choose from {list(OUTPUTS)}")
    return names


def _label_fields(labels: Any, label_set: Any, settings: ServeSettings, text: bool,
                  ) -> tuple[tuple[str, ...] | None, str | None]:
    if (labels is None) == (label_set is None):
        raise Problem(400, "give either 'labels' or 'label_set' (one of them, not both)")
    if label_set is not None:
        if not isinstance(label_set, str) or not label_set:
            raise Problem(400, f"label_set must be an id string, got {label_set!r}")
        return None, label_set
    if text:
        stripped = str(labels).lstrip()
        if stripped.startswith("["):
            try:
                return validate_labels(json.loads(stripped), settings), None
            except json.JSONDecodeError as e:
                raise Problem(400, f"labels look like JSON but do not parse: {e}") from None
        return validate_labels(labels, settings, lines=True), None
    return validate_labels(labels, settings), None


async def parse_segment(request: Request, settings: ServeSettings) -> SegmentRequest:
    """A `SegmentRequest` from a multipart or JSON body (image still encoded)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", "multipart/form-data"):
        raise Problem(415, f"content type {kind or 'none'!r} is not supported; send "
                           f"multipart/form-data or application/json")
    body = await read_body(request, settings)
    if kind == "application/json":
        return _parse_json(body, settings)
    return await _parse_multipart(request, body, settings)


def _parse_json(body: bytes, settings: ServeSettings) -> SegmentRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Problem(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Problem(400, "the JSON body must be an object with 'image' and 'labels'")
    unknown = set(data) - {"image", "labels", "label_set", "threshold", "outputs"}
    if unknown:
        raise Problem(400, f"unknown fields {sorted(unknown)}")
    if not isinstance(data.get("image"), str) or not data["image"]:
        raise Problem(400, "field 'image' (the image file as a base64 string) is missing")
    try:
        image = base64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise Problem(400, f"field 'image' is not valid base64: {e}") from None
    labels, label_set = _label_fields(data.get("labels"), data.get("label_set"), settings, False)
    return SegmentRequest(image, labels, label_set, _threshold(data.get("threshold")),
                          _outputs(data.get("outputs"), text=False))


async def _parse_multipart(request: Request, body: bytes,
                           settings: ServeSettings) -> SegmentRequest:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:  # python-multipart / starlette parse errors have no common base
        raise Problem(400, f"the multipart body does not parse: {e}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise Problem(400, "multipart field 'image' (an image file) is missing")
        image = await upload.read()
        fields = {k: form.get(k) for k in ("labels", "label_set", "threshold", "outputs")}
    finally:
        await form.close()
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise Problem(400, f"multipart field {name!r} must be text, not a file")
    try:
        outputs = _outputs(fields["outputs"], text=True)
    except json.JSONDecodeError as e:
        raise Problem(400, f"outputs look like JSON but do not parse: {e}") from None
    labels, label_set = _label_fields(fields["labels"], fields["label_set"], settings, True)
    return SegmentRequest(image, labels, label_set, _threshold(fields["threshold"]), outputs)


def header_pixels(data: bytes) -> int:
    """Width x height from the image's header (nothing decoded); 0 if the header does not read
    (`decode_image` then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0


def decode_image(data: bytes, max_pixels: int) -> tuple[np.ndarray, float]:
    """((H, W, 3) uint8 RGB, milliseconds): 413 over `max_pixels`, 415 if not an image."""
    began = time.perf_counter()
    if not data:
        raise Problem(400, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                if image.width * image.height > max_pixels:
                    raise Problem(413, f"image of {image.width}x{image.height} = "
                                       f"{image.width * image.height:,} pixels is over the limit "
                                       f"of {max_pixels:,} (--max-pixels)")
                array = load_image(image, max_pixels)
    except Image.DecompressionBombError as e:
        raise Problem(413, f"image is over the decompression-bomb limit: {e}") from None
    except ImageError as e:
        raise Problem(415, f"the image cannot be decoded: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise Problem(415, f"the image is not a PNG, JPEG or other decodable image ({e})"
                      ) from None
    return array, (time.perf_counter() - began) * 1e3

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
import functools
import io
import json
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from segclip.runtime.errors import ImageError, LabelFileError
from segclip.runtime.images import load_image
from segclip.runtime.labels import parse_labels
from segclip.runtime.serve.forms import parse_form, text_field
from segclip.runtime.serve.problems import Problem
from segclip.runtime.serve.settings import OUTPUTS, ServeSettings

BACKGROUND = "background"  # = segclip.runtime.segmenter.BACKGROUND, value 0 of a label map
LABEL_TEXTS = 256  # distinct label texts whose validation is kept (each up to 16 K characters)
LABEL_TEXT_CHARS = 16384


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


async def read_body(declared: str | None, stream: AsyncIterator[bytes],
                    settings: ServeSettings) -> bytes:
    """The request body from its chunks, refused with 413 past `max_body_mb` (`declared`: the
    Content-Length header, checked first; then the streamed byte count)."""
    limit = settings.max_body_bytes
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Problem(400, f"Content-Length {declared!r} is not an integer") from None
        if size > limit:
            raise Problem(413, f"request body of {size:,} bytes is over the limit of "
                               f"{limit:,} bytes (--max-body-mb {settings.max_body_mb:g})")
    chunks, total = [], 0
    async for chunk in stream:
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
        labels = str(labels)
        if len(labels) <= LABEL_TEXT_CHARS:  # clients resend the same text with every image
            return _cached_text_labels(labels, settings), None
        return _text_labels(labels, settings), None
    return validate_labels(labels, settings), None


def _text_labels(text: str, settings: ServeSettings) -> tuple[str, ...]:
    """Labels of a text field: a JSON list, or one per line."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return validate_labels(json.loads(stripped), settings)
        except json.JSONDecodeError as e:
            raise Problem(400, f"labels look like JSON but do not parse: {e}") from None
    return validate_labels(text, settings, lines=True)


# the same, validated once per distinct text (a refusal is raised again, never cached)
_cached_text_labels = functools.lru_cache(maxsize=LABEL_TEXTS)(_text_labels)


def body_kind(content_type: str) -> str:
    """"multipart/form-data" or "application/json" (the Content-Type without parameters);
    anything else is a 415 problem (checked before the body is read)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise Problem(415, f"content type {kind or 'none'!r} is not supported; send "
                           f"multipart/form-data or application/json")
    return kind


def parse_segment(content_type: str, body: bytes, settings: ServeSettings) -> SegmentRequest:
    """A `SegmentRequest` from a multipart or JSON body (image still encoded)."""
    if body_kind(content_type) == "multipart/form-data":
        return _parse_multipart(content_type, body, settings)
    return _parse_json(body, settings)


def json_body(body: bytes) -> Any:
    """The decoded JSON of a request body; 400 if it is not JSON (or not UTF-8)."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Problem(400, f"the body is not valid JSON: {e}") from None


def _parse_json(body: bytes, settings: ServeSettings) -> SegmentRequest:
    data = json_body(body)
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


def _parse_multipart(content_type: str, body: bytes, settings: ServeSettings) -> SegmentRequest:
    parts = parse_form(content_type, body)
    upload = parts.get("image")
    if upload is None or not upload.is_file:
        raise Problem(400, "multipart field 'image' (an image file) is missing")
    fields = {k: text_field(parts, k) for k in ("labels", "label_set", "threshold", "outputs")}
    try:
        outputs = _outputs(fields["outputs"], text=True)
    except json.JSONDecodeError as e:
        raise Problem(400, f"outputs look like JSON but do not parse: {e}") from None
    labels, label_set = _label_fields(fields["labels"], fields["label_set"], settings, True)
    return SegmentRequest(upload.data, labels, label_set, _threshold(fields["threshold"]),
                          outputs)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read: 400 if empty, 413 over `max_pixels` (decompression
    bombs included), 415 if not an image."""
    if not data:
        raise Problem(400, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Problem(413, f"image is over the decompression-bomb limit: {e}") from None
    except Image.UnidentifiedImageError:  # its message names a Python object, not the image
        raise Problem(415, "the image is not a PNG, JPEG or other decodable image (its format "
                           "is not recognised)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Problem(415, f"the image is not a PNG, JPEG or other decodable image ({e})"
                      ) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise Problem(413, f"image of {image.width}x{image.height} = "
                           f"{image.width * image.height:,} pixels is over the limit of "
                           f"{max_pixels:,} (--max-pixels)")
    return image


def decode_image(data: bytes | Image.Image, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the encoded image, or of one `open_image` gave (closed after):
    413 over `max_pixels`, 415 if it does not decode."""
    image = data if isinstance(data, Image.Image) else open_image(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return load_image(image, max_pixels)
    except Image.DecompressionBombError as e:
        raise Problem(413, f"image is over the decompression-bomb limit: {e}") from None
    except ImageError as e:
        raise Problem(415, f"the image cannot be decoded: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Problem(415, f"the image is not a PNG, JPEG or other decodable image ({e})"
                      ) from None
    finally:
        image.close()

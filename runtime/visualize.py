"""Result files of `segclip-run` (docs/architecture.md "Command contracts"): label-map PNG and
overlay JPEG.

- `palette(n)`: the PASCAL VOC colour map (bit-interleaved, index 0 black), defined and distinct
  for every index below 2**24, so colours are stable across runs and label sets.
- `write_label_png`: value i = i-th label, 0 = background. A palette ("P") PNG when the label set
  has at most 255 labels (opens in colour, reads back as indices), otherwise a 16-bit greyscale
  PNG. The format depends on the number of labels, not on the values present. `label_png` gives
  the same bytes in memory (the service's label map); runtime/png.py writes them.
- `write_overlay_jpeg`: the image with labelled pixels tinted by their colour (background left
  untouched) and a legend panel on the right naming the labels present, by pixel count.
All files are written atomically (temp file in the same directory, then `os.replace`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segclip.runtime._atomic import atomic_write_bytes
from segclip.runtime.errors import OutputError
from segclip.runtime.png import label_png_bytes

MAX_LEGEND_ROWS = 40
BACKGROUND_NAME = "background"


def palette(count: int) -> np.ndarray:
    """(count, 3) uint8 colours: the PASCAL VOC colour map, index 0 = black."""
    if not 0 <= count <= 1 << 24:
        raise ValueError(f"palette size must be in [0, 2**24], got {count}")
    index = np.arange(count, dtype=np.int64)
    colours = np.zeros((count, 3), dtype=np.int64)
    for bit in range(8):  # three bits of the index per round, most significant colour bit first
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def _check_label_map(label_map: np.ndarray, num_labels: int) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must be (H, W) integers, got {label_map.shape} "
                         f"{label_map.dtype}")
    signed = label_map.dtype.kind == "i"  # unsigned maps (the Segmenter's) have no minimum to check
    if label_map.size and ((signed and label_map.min() < 0) or label_map.max() > num_labels):
        raise ValueError(f"label_map values must be in [0, {num_labels}], got "
                         f"[{label_map.min()}, {label_map.max()}]")
    return label_map


def _write(path: str | os.PathLike, data: bytes) -> Path:
    """`data` written atomically at `path`; an `OutputError` naming the path if it cannot be."""
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}; check that the directory exists and is "
                          f"writable") from e


def _save(path: str | os.PathLike, image: Image.Image, **options) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return _write(path, buffer.getvalue())


@cache
def _png_palette() -> bytes:
    """The 256-entry palette of label-map PNGs, RGB triples (computed once)."""
    return palette(256).tobytes()


def label_png(label_map: np.ndarray, num_labels: int) -> bytes:
    """The label-map PNG (runtime/png.py): indexed colour with the VOC palette up to 255
    labels, else 16-bit greyscale."""
    label_map = _check_label_map(label_map, num_labels)
    return label_png_bytes(label_map, _png_palette() if num_labels <= 255 else None)


def write_label_png(path: str | os.PathLike, label_map: np.ndarray, num_labels: int) -> Path:
    """Write the (H, W) label map (0 = background, i = i-th of `num_labels` labels) as PNG."""
    return _write(path, label_png(label_map, num_labels))


def write_confidence_png(path: str | os.PathLike, confidence: np.ndarray) -> Path:
    """Write an (H, W) probability map in [0, 1] as an 8-bit greyscale PNG (255 = 1.0)."""
    levels = np.rint(np.clip(confidence, 0.0, 1.0) * 255.0).astype(np.uint8)  # (H, W)
    return _save(path, Image.fromarray(levels, mode="L"), format="PNG", optimize=False)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _legend_rows(label_map: np.ndarray, labels: Sequence[str]) -> list[tuple[int, str]]:
    counts = np.bincount(label_map.ravel(), minlength=len(labels) + 1)  # (T + 1,)
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    names = [BACKGROUND_NAME, *labels]
    total = label_map.size
    rows = [(i, f"{names[i]} {100.0 * counts[i] / total:.1f}%") for i in present]
    if len(rows) > MAX_LEGEND_ROWS:
        rest = len(rows) - (MAX_LEGEND_ROWS - 1)
        rows = rows[:MAX_LEGEND_ROWS - 1] + [(-1, f"... and {rest} more")]
    return rows


def _tint(image: np.ndarray, label_map: np.ndarray, colours: np.ndarray,
          alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: labelled pixels blended with their colour, in row chunks."""
    out = np.array(image, dtype=np.uint8, copy=True)
    step = max(1, (1 << 20) // max(1, label_map.shape[1]))
    for start in range(0, label_map.shape[0], step):
        labels = label_map[start:start + step]  # (r, W)
        pixels = out[start:start + step]  # (r, W, 3), a view
        tinted = (1.0 - alpha) * pixels + alpha * colours[labels].astype(np.float32)  # (r, W, 3)
        mask = labels > 0
        pixels[mask] = np.rint(tinted[mask]).astype(np.uint8)
    return out


def overlay_image(image: np.ndarray, label_map: np.ndarray, labels: Sequence[str],
                  alpha: float = 0.5) -> Image.Image:
    """RGB image (H, W + legend width) with labelled pixels tinted and a legend panel.

    Args:
        image: (H, W, 3) uint8 RGB, the image the label map belongs to.
        label_map: (H, W) integer labels, 0 = background.
        labels: names of labels 1..T.
        alpha: weight of the label colour in labelled pixels.
    """
    label_map = _check_label_map(label_map, len(labels))
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label_map.shape} differ in size")
    colours = palette(len(labels) + 1)
    blended = _tint(image, label_map, colours, alpha)
    rows = _legend_rows(label_map, labels)
    font = _font(max(12, min(32, min(label_map.shape) // 30)))
    line = int(font.getbbox("Ag")[3]) + 6
    width = max(int(font.getlength(text)) for _, text in rows) + line + 12
    height, image_width = label_map.shape
    canvas = Image.new("RGB", (image_width + width, max(height, line * len(rows) + 8)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (index, text) in enumerate(rows):
        top = 4 + row * line
        if index >= 0:
            box = (image_width + 4, top + 2, image_width + line - 2, top + line - 4)
            draw.rectangle(box, fill=tuple(int(c) for c in colours[index]), outline="black")
        draw.text((image_width + line + 4, top), text, fill="black", font=font)
    return canvas


def write_overlay_jpeg(path: str | os.PathLike, image: np.ndarray, label_map: np.ndarray,
                       labels: Sequence[str], alpha: float = 0.5, quality: int = 90) -> Path:
    """Write `overlay_image(image, label_map, labels, alpha)` as a JPEG."""
    return _save(path, overlay_image(image, label_map, labels, alpha), format="JPEG",
                 quality=quality)

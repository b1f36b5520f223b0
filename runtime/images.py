"""Image loading and preprocessing of the inference protocol (docs/official-implementation.md §4,
paper §3.1).

`load_image` turns a path, PIL image or array into an (H, W, 3) uint8 RGB array: any PIL mode,
EXIF orientation applied, first frame of an animation, alpha discarded (the colour under it is
kept, as `cv2.imread` does). The pixel limit is checked from the header, before decoding.
`preprocess` resizes the short side to S with cv2-style bilinear sampling (`INTER_LINEAR`:
half-pixel centres, edge clamping, no antialiasing; the official pipeline resizes with
`mmcv.imresize`, i.e. cv2), normalises with the CLIP mean/std and cuts the S x S windows of
`segclip.runtime.windows`. It computes in float32 and rounds to uint8, so it may differ from
cv2's fixed-point arithmetic by one grey level. Legend: H x W original, h x w resized, n windows,
S window side.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from segclip.runtime._interp import blend, linear_taps
from segclip.runtime.contract import CLIP_MEAN, CLIP_STD
from segclip.runtime.errors import ImageError
from segclip.runtime.windows import MAX_WINDOWS, resized_size, window_boxes

DEFAULT_MAX_PIXELS = 100_000_000  # refuse larger images (decompression bombs, memory)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # scaled 0..65535 -> 0..255

ImageSource = str | os.PathLike | Image.Image | np.ndarray


def _check_pixels(height: int, width: int, max_pixels: int, source: str) -> None:
    if height < 1 or width < 1:
        raise ImageError(f"image {source} is empty ({height}x{width} pixels); pass a real image")
    if height * width > max_pixels:
        raise ImageError(
            f"image {source} has {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it first or raise the limit "
            f"(--max-pixels, or max_pixels= in Python)")


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image of any mode."""
    if image.mode in _SIXTEEN_BIT_MODES:  # PIL's convert() would clip 16-bit values at 255
        values = np.asarray(image, dtype=np.float64)
        grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _from_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(
            f"an image array must be HxWx3 uint8 RGB (HxW, HxWx1 and HxWx4 are accepted too), "
            f"got shape {array.shape} dtype {array.dtype}; convert it with "
            f"np.asarray(img, dtype=np.uint8)")
    _check_pixels(array.shape[0], array.shape[1], max_pixels, f"array {array.shape}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _from_pil(image: Image.Image, max_pixels: int, source: str) -> np.ndarray:
    _check_pixels(image.height, image.width, max_pixels, source)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if image.getexif().get(ExifTags.Base.Orientation, 1) not in (None, 1):
                image = ImageOps.exif_transpose(image)  # a transposed copy; the caller's stays
            return _to_rgb_array(image)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError) as e:
        raise ImageError(f"image {source} is truncated or corrupt ({e}); re-save or replace "
                         f"the file") from e


def _open_path(path: Path, max_pixels: int) -> np.ndarray:
    if not path.exists():
        raise ImageError(f"image file {path} does not exist; check the path")
    if not path.is_file():
        raise ImageError(f"image path {path} is not a file; pass an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {path} is empty (0 bytes); replace it with a real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                return _from_pil(image, max_pixels, str(path))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {path} is over Pillow's decompression-bomb limit ({e}); "
                         f"downscale it first") from e
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ImageError(f"cannot read {path} as an image ({e}); pass a PNG, JPEG or other "
                         f"image file Pillow can open") from e


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load an image as (H, W, 3) uint8 RGB (module docstring: modes, EXIF, animation, alpha).

    Args:
        source: a file path, a PIL image, or an (H, W, 3) uint8 RGB array.
        max_pixels: refuse images with more pixels (checked before decoding a file).

    Raises:
        ImageError: missing, empty, truncated or non-image file, bad array, too many pixels.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, f"<PIL {source.mode} {source.width}x{source.height}>")
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), max_pixels)
    raise ImageError(f"cannot load an image from a {type(source).__name__}; pass a path, a PIL "
                     f"image or an HxWx3 uint8 array")


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8, bilinear (cv2 INTER_LINEAR style)."""
    if (height, width) == image.shape[:2]:
        return image
    rows = blend(image, linear_taps(height, image.shape[0]), axis=0)  # (height, W, 3) float32
    resized = blend(rows, linear_taps(width, image.shape[1]), axis=1)  # (height, width, 3)
    resized += 0.5
    np.floor(resized, out=resized)
    return np.clip(resized, 0, 255, out=resized).astype(np.uint8)


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with min(h, w) = short_side (cv2 INTER_LINEAR style)."""
    return resize_to(image, *resized_size(image.shape[0], image.shape[1], short_side))


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: (v - 255 mean) / (255 std) for every grey level v of each channel."""
    scale = np.asarray(std, dtype=np.float32) * 255.0
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    levels = np.arange(256, dtype=np.float32)
    table = (levels[None, :] - shift[:, None]) / scale[:, None]  # (3, 256)
    table.setflags(write=False)
    return table


def normalize(image: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (3, h, w) float32 (x / 255 - mean) / std.

    Looked up per channel in a 256-entry table computed with the same float32 operations, so
    the values are bit-identical to computing them per pixel, at a fraction of the passes."""
    table = _normalize_table(tuple(map(float, mean)), tuple(map(float, std)))
    chw = np.empty((3, *image.shape[:2]), dtype=np.float32)  # (3, h, w)
    for channel in range(3):
        np.take(table[channel], image[:, :, channel], out=chw[channel])
    return chw


def crop_windows(image: np.ndarray, boxes: Sequence[tuple[int, int]], window: int) -> np.ndarray:
    """(3, h, w) float32 -> (n, 3, S, S) float32, one crop per (y0, x0) box, contiguous."""
    crops = np.empty((len(boxes), image.shape[0], window, window), dtype=image.dtype)
    for index, (y0, x0) in enumerate(boxes):
        crops[index] = image[:, y0:y0 + window, x0:x0 + window]
    return crops


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the image engine, and what is needed to map results back."""

    windows: np.ndarray  # (n, 3, S, S) float32, CLIP-normalised, `boxes` order
    boxes: tuple[tuple[int, int], ...]  # (y0, x0) of each window in the resized image
    resized_hw: tuple[int, int]  # (h, w) after the short-side resize
    original_hw: tuple[int, int]  # (H, W) of the loaded image (after EXIF orientation)
    window: int  # S


def preprocess(image: np.ndarray, window: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, max_windows: int = MAX_WINDOWS) -> PreparedImage:
    """Short-side resize to S, normalise, and cut the slide windows of an (H, W, 3) uint8 image."""
    height, width = image.shape[:2]
    resized_hw = resized_size(height, width, window)
    boxes = tuple(window_boxes(*resized_hw, window))
    if len(boxes) > max_windows:
        raise ImageError(
            f"a {width}x{height} image needs {len(boxes)} windows of {window}x{window} after "
            f"resizing its short side to {window}, over the limit of {max_windows}; crop it to a "
            f"less elongated aspect ratio")
    resized = normalize(resize_short_side(image, window), mean, std)  # (3, h, w)
    return PreparedImage(windows=crop_windows(resized, boxes, window), boxes=boxes,
                         resized_hw=resized_hw, original_hw=(height, width), window=window)

"""Felzenszwalb superpixels and superpixel patch labels (paper §2.2 superpixel loss;
docs/official-implementation.md §3).

Segmentation: scikit-image `felzenszwalb` with the reference parameters scale=224, sigma=0.9,
min_size=224, which the official code applies to images stored at short side 224. Scaling rule
for another short side s, with r = s / 224: `scale` and `min_size` are areas in pixels (the
merge threshold is scale / |C| for a component of |C| pixels), so both scale by r²; `sigma` is a
length (Gaussian pre-smoothing) and scales by r. At s = 224 this is the reference exactly; at
s = 64 it is scale≈18.3, sigma≈0.257, min_size=18. Images with a short side above
`max_short_side` (224, as the reference stored them) are first bicubic-resized to it.

Cache: one compressed `ROOT/superpixels/KEY.npz` (array `segments`, (H', W')) per image, computed
once, written atomically (temp file + `os.replace`), skipped when present (resumable), with
`ROOT/superpixels/params.json` recording the parameters.

Patch labels (official `get_felzenszwalb_from_cache`): crop the map to the augmentation box
(floor the start, ceil the end; the whole map when the box is under 2 px), resize to S×S with
torch's 'nearest' rule, cut into p×p patches and take the arithmetic mean of the integer
segment ids cast to int (truncation; not a majority vote) → int64 (h*w,), row-major.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

from segclip.data.sources import ImageRef, PairSource, read_image, read_source
from segclip.errors import ConfigError, DataError

REFERENCE_SIDE = 224
PARAMS_FILE = "params.json"


@dataclass(frozen=True)
class FelzenszwalbParams:
    scale: float = 224.0  # merge threshold constant k (an area, in pixels)
    sigma: float = 0.9  # Gaussian pre-smoothing width (a length, in pixels)
    min_size: int = 224  # smallest component, in pixels

    @classmethod
    def for_side(cls, short_side: int) -> FelzenszwalbParams:
        """The reference parameters scaled to an image of this short side (module docstring)."""
        if short_side < 1:
            raise ConfigError(f"short_side must be >= 1, got {short_side}")
        r = short_side / REFERENCE_SIDE
        return cls(scale=224.0 * r * r, sigma=0.9 * r, min_size=max(1, round(224 * r * r)))


def segment(image: Image.Image, max_short_side: int | None = REFERENCE_SIDE) -> np.ndarray:
    """Felzenszwalb segments of an RGB image: (H', W') int32 ids 0..n-1.

    (H', W') is the image size, or the size after resizing the short side to `max_short_side`.
    """
    image = image.convert("RGB")
    short = min(image.size)
    if max_short_side is not None and short > max_short_side:
        w, h = image.size
        factor = max_short_side / short
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        image = image.resize(size, Image.BICUBIC)
        short = min(image.size)
    params = FelzenszwalbParams.for_side(short)
    pixels = np.asarray(image)  # (H', W', 3) uint8
    return felzenszwalb(pixels, scale=params.scale, sigma=params.sigma,
                        min_size=params.min_size).astype(np.int32)


def _edge(value: float) -> float:
    """Snap float noise (e.g. 3/10*10) so floor/ceil of an exact pixel edge stay exact."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < 1e-6 else value


def crop_segments(
    segments: np.ndarray, box: tuple[float, float, float, float] | None
) -> np.ndarray:
    """Crop a (H, W) map to normalised (x0, y0, x1, y1): floor start, ceil end; whole if < 2 px."""
    if box is None:
        return segments
    height, width = segments.shape
    x0, y0, x1, y1 = box
    left, right = math.floor(_edge(x0 * width)), math.ceil(_edge(x1 * width))
    top, bottom = math.floor(_edge(y0 * height)), math.ceil(_edge(y1 * height))
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, width), min(bottom, height)
    if bottom - top < 2 or right - left < 2:
        return segments
    return segments[top:bottom, left:right]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index under torch's 'nearest' resize: (out_size,) int64.

    torch computes floor(i * scale) in float32 with scale = float32(in) / float32(out).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def patch_labels(
    segments: np.ndarray,
    box: tuple[float, float, float, float] | None,
    size: int,
    patch_size: int,
) -> np.ndarray:
    """Superpixel label of each patch of the S×S crop (module docstring): (h*w,) int64."""
    if size % patch_size:
        raise ConfigError(f"size {size} must be a multiple of patch_size {patch_size}")
    crop = crop_segments(segments, box)  # (H'', W'')
    rows = nearest_indices(crop.shape[0], size)  # (S,)
    cols = nearest_indices(crop.shape[1], size)  # (S,)
    resized = crop[rows[:, None], cols[None, :]].astype(np.int64)  # (S, S)
    grid = size // patch_size
    blocks = resized.reshape(grid, patch_size, grid, patch_size)  # (h, p, w, p)
    means = blocks.sum(axis=(1, 3)) / float(patch_size * patch_size)  # (h, w)
    return means.astype(np.int64).reshape(-1)  # (h*w,)


def cache_file(source: PairSource, ref: ImageRef) -> Path:
    """Where the superpixels of `ref` are cached."""
    return source.superpixel_dir / f"{ref.key}.npz"


def save_segments(path: Path, segments: np.ndarray) -> None:
    """Write one compressed map atomically (temp file in the same folder, then `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if segments.max(initial=0) < 2**16 else np.int32
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            np.savez_compressed(file, segments=segments.astype(dtype))
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def load_segments(path: Path) -> np.ndarray:
    """A cached map as (H', W') int64; a missing or corrupt file raises `DataError` naming it."""
    try:
        with np.load(path) as archive:
            return archive["segments"].astype(np.int64)
    except FileNotFoundError as e:
        raise DataError(f"superpixels {path} not found; run `segclip-data superpixels DATA`") from e
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"superpixel cache {path} is corrupt ({e}); delete it and rerun "
                        "`segclip-data superpixels DATA`") from e


@dataclass(frozen=True)
class CacheReport:
    folder: Path  # the superpixel folder
    computed: int  # maps written by this run
    skipped: int  # maps already present


def _compute_one(job: tuple[ImageRef, Path, int | None]) -> None:
    ref, path, max_short_side = job
    save_segments(path, segment(read_image(ref), max_short_side))


def _check_params(folder: Path, max_short_side: int | None) -> None:
    record = {"method": "skimage.segmentation.felzenszwalb", "reference_side": REFERENCE_SIDE,
              "reference": asdict(FelzenszwalbParams()), "max_short_side": max_short_side,
              "rule": "scale, min_size x (s/224)^2; sigma x s/224; s = short side as segmented"}
    file = folder / PARAMS_FILE
    if file.is_file():
        try:
            existing = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{file} is unreadable ({e}); delete it and rerun") from e
        if existing != record:
            raise DataError(f"{folder} holds superpixels computed with other parameters "
                            f"({file}); delete the folder to recompute")
        return
    folder.mkdir(parents=True, exist_ok=True)
    temp = file.with_name(f".{PARAMS_FILE}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temp, file)


def build_cache(
    data: str | Path | PairSource,
    image_root: str | Path | None = None,
    workers: int = 1,
    max_short_side: int | None = REFERENCE_SIDE,
    progress: bool = True,
) -> CacheReport:
    """Compute the superpixels of every image of a source that has none cached yet."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    source = data if isinstance(data, PairSource) else read_source(data, image_root)
    _check_params(source.superpixel_dir, max_short_side)
    images = source.images()
    jobs = [(ref, cache_file(source, ref), max_short_side) for ref in images]
    jobs = [job for job in jobs if not job[1].is_file()]
    skipped = len(images) - len(jobs)
    with tqdm(total=len(images), initial=skipped, desc="superpixels", unit="img",
              disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                _compute_one(job)
                bar.update(1)
        else:
            with Pool(workers) as pool:
                for _ in pool.imap_unordered(_compute_one, jobs, chunksize=16):
                    bar.update(1)
    return CacheReport(folder=source.superpixel_dir, computed=len(jobs), skipped=skipped)

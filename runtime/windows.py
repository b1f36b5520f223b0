"""Slide-window geometry of the official inference protocol (docs/official-implementation.md §4,
docs/architecture.md).

The image is resized so that its short side is S (keep ratio), then covered with S x S windows at
stride S; the last window along each axis is shifted back to end at the border, so it overlaps
its neighbour. (mmseg `slide` mode with crop = stride = S; unlike mmseg's `img_scale=(2048, S)`
there is no cap on the long side.)
"""

from __future__ import annotations

import math

MAX_WINDOWS = 1024  # refuse images so elongated that they need more windows than this


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after the keep-ratio resize that makes the short side `short_side`.

    The long side is rounded half up, as mmcv `rescale_size` does.
    """
    if height < 1 or width < 1 or short_side < 1:
        raise ValueError(f"sizes must be >= 1, got {height}x{width}, short side {short_side}")
    scale = short_side / min(height, width)
    if height <= width:
        return short_side, max(short_side, int(width * scale + 0.5))
    return max(short_side, int(height * scale + 0.5)), short_side


def window_starts(size: int, window: int) -> list[int]:
    """Start offsets of the windows along an axis of `size` >= `window` samples."""
    if size < window or window < 1:
        raise ValueError(f"axis of {size} samples cannot hold a window of {window}")
    count = math.ceil(size / window)  # (size - 1) // stride + 1 with stride == window
    return [i * window for i in range(count - 1)] + [size - window]


def window_grid(height: int, width: int, window: int) -> tuple[int, int]:
    """(rows, cols) of windows covering a resized image of `height` x `width`."""
    return math.ceil(height / window), math.ceil(width / window)


def window_boxes(height: int, width: int, window: int) -> list[tuple[int, int]]:
    """(y0, x0) of every window over a resized image, row-major (all rows of y0 = 0 first)."""
    return [(y0, x0) for y0 in window_starts(height, window)
            for x0 in window_starts(width, window)]

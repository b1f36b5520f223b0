"""segclip.runtime.windows: short-side resize size and slide-window geometry (mmseg slide)."""

from __future__ import annotations

import pytest

from segclip.runtime.windows import resized_size, window_boxes, window_grid, window_starts


def mmseg_boxes(height, width, crop, stride):
    """mmseg `slide_inference` window loop, transcribed."""
    grids_h = max(height - crop + stride - 1, 0) // stride + 1
    grids_w = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for h_idx in range(grids_h):
        for w_idx in range(grids_w):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0)))
    return boxes


@pytest.mark.parametrize("height, width", [(224, 224), (224, 225), (224, 448), (224, 449),
                                           (300, 224), (224, 2000), (1000, 224)])
def test_boxes_equal_mmseg_slide(height, width):
    boxes = window_boxes(height, width, 224)
    assert boxes == mmseg_boxes(height, width, 224, 224)
    assert len(boxes) == window_grid(height, width, 224)[0] * window_grid(height, width, 224)[1]


@pytest.mark.parametrize("height, width, expected", [
    (480, 640, (224, 299)), (640, 480, (299, 224)), (224, 224, (224, 224)),
    (100, 100, (224, 224)), (1, 3, (224, 672)), (333, 500, (224, 336)), (500, 333, (336, 224)),
])
def test_resized_size_short_side_and_mmcv_rounding(height, width, expected):
    assert resized_size(height, width, 224) == expected


def test_window_starts_last_shifted_back():
    assert window_starts(224, 224) == [0]
    assert window_starts(300, 224) == [0, 76]
    assert window_starts(448, 224) == [0, 224]
    assert window_starts(449, 224) == [0, 224, 225]


def test_errors():
    with pytest.raises(ValueError, match="cannot hold a window of 224"):
        window_starts(100, 224)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        resized_size(0, 5, 224)

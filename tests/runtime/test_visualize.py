"""segclip.runtime.visualize: palette, label-map PNG, overlay JPEG, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segclip.runtime.errors import OutputError
from segclip.runtime.visualize import (
    MAX_LEGEND_ROWS,
    _legend_rows,
    label_png,
    overlay_image,
    palette,
    write_label_png,
    write_overlay_jpeg,
)


def test_palette_is_voc_and_distinct():
    colours = palette(300)
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    assert colours[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in palette(4096)}) == 4096
    np.testing.assert_array_equal(palette(10), palette(300)[:10])  # prefix-stable


def _label_map(num_labels, shape=(7, 11), seed=0):
    return np.random.default_rng(seed).integers(0, num_labels + 1, size=shape).astype(np.uint16)


@pytest.mark.parametrize("num_labels, mode", [(1, "P"), (255, "P"), (256, "I;16"),
                                              (1000, "I;16")])
def test_label_png_roundtrip(tmp_path, num_labels, mode):
    label_map = _label_map(num_labels)
    label_map[0, 0] = num_labels
    path = write_label_png(tmp_path / "out.png", label_map, num_labels)
    with Image.open(path) as image:
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image).astype(np.uint16), label_map)
        if mode == "P":
            assert image.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temp file left


def test_label_png_rejects_out_of_range_values(tmp_path):
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\], got \[0, 3\]"):
        label_png(np.array([[0, 3]], np.uint16), 2)


def test_write_to_missing_directory_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write .*missing"):
        write_label_png(tmp_path / "missing" / "out.png", np.zeros((2, 2), np.uint16), 1)


def test_overlay_tints_labelled_pixels_only():
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    label_map = np.zeros((40, 60), dtype=np.uint16)
    label_map[:, 30:] = 1
    canvas = np.asarray(overlay_image(image, label_map, ["cat", "dog"], alpha=0.5))
    assert canvas.shape[0] >= 40 and canvas.shape[1] > 60  # legend panel on the right
    assert tuple(canvas[5, 5]) == (100, 100, 100)  # background untouched
    assert tuple(canvas[5, 45]) == (114, 50, 50)  # (100 + 128) / 2, 100 / 2, 100 / 2
    assert (canvas[:, 60:] != 255).any()  # something drawn in the legend


def test_overlay_legend_is_capped_and_tall_legends_extend_the_canvas():
    labels = [f"label {i}" for i in range(100)]
    label_map = np.arange(101, dtype=np.uint16).reshape(1, 101).repeat(2, axis=0)
    image = np.zeros((2, 101, 3), np.uint8)
    rows = _legend_rows(label_map, labels)
    assert len(rows) == MAX_LEGEND_ROWS and rows[-1] == (-1, "... and 62 more")
    assert rows[0][1].startswith("background ")
    canvas = overlay_image(image, label_map, labels)
    assert canvas.height > 2


def test_overlay_jpeg_is_written(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(30, 20, 3), dtype=np.uint8)
    label_map = _label_map(3, shape=(30, 20))
    path = write_overlay_jpeg(tmp_path / "o.jpg", image, label_map, ["a", "b", "c"])
    with Image.open(path) as written:
        assert written.format == "JPEG" and written.height >= 30


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint16), ["a"])

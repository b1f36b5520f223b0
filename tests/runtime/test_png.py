"""runtime/png.py: label-map PNGs that Pillow (an independent decoder) reads back exactly, with
valid chunk CRCs, through ISA-L's deflate and through the standard library's zlib."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from segclip.runtime import png
from segclip.runtime.png import label_png_bytes
from segclip.runtime.visualize import label_png, palette


def _maps(high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(high)
    blocky = np.kron(rng.integers(0, high + 1, (12, 16)), np.ones((32, 32), np.int64))
    return [np.array([[high]]), rng.integers(0, high + 1, (7, 11)), blocky[:375, :500],
            rng.integers(0, high + 1, (3, 1000))]


def _decoded(data: bytes) -> Image.Image:
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_indexed_png_reads_back(deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if deflate == "zlib":
        monkeypatch.setattr(png, "_deflate", zlib)
    else:
        pytest.importorskip("isal")
        assert png._deflate.__name__.startswith("isal")
    colours = palette(256).tobytes()
    for values in _maps(255):
        image = _decoded(label_png_bytes(values, colours))
        assert image.mode == "P" and image.size == values.shape[::-1]
        np.testing.assert_array_equal(np.asarray(image), values)
        assert bytes(image.getpalette()) == colours


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_16_bit_png_reads_back(deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if deflate == "zlib":
        monkeypatch.setattr(png, "_deflate", zlib)
    for values in _maps(65535):
        image = _decoded(label_png_bytes(values, None))
        assert image.mode in ("I;16", "I;16B", "I") and image.size == values.shape[::-1]
        np.testing.assert_array_equal(np.asarray(image).astype(np.int64), values)


def test_label_png_matches_pillows_own_encoding() -> None:
    """The same pixels and palette as Pillow's PNG writer gives for the same label map."""
    for num_labels, values in ((20, _maps(20)[2]), (300, _maps(300)[1])):
        ours = _decoded(label_png(values.astype(np.uint16), num_labels))
        if num_labels <= 255:
            reference = Image.fromarray(values.astype(np.uint8), mode="P")
            reference.putpalette(palette(256).tobytes())
        else:
            reference = Image.fromarray(values.astype(np.uint16))
        buffer = io.BytesIO()
        reference.save(buffer, format="PNG")
        theirs = _decoded(buffer.getvalue())
        assert ours.mode == theirs.mode
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
        assert ours.getpalette() == theirs.getpalette()


def test_bad_palette_and_empty_map_are_refused() -> None:
    with pytest.raises(ValueError, match="RGB triples"):
        label_png_bytes(np.zeros((2, 2), np.uint8), b"\x00\x00")
    with pytest.raises(ValueError, match="at least one pixel"):
        label_png_bytes(np.zeros((0, 2), np.uint8), None)

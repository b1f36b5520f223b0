"""segclip.runtime.images: loading (modes, EXIF, animation, limits, bad files), preprocessing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from segclip.runtime.contract import CLIP_MEAN, CLIP_STD
from segclip.runtime.errors import ImageError
from segclip.runtime.images import (
    crop_windows,
    load_image,
    normalize,
    preprocess,
    resize_short_side,
)


def _rgb(height=6, width=9, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path, width, height):
    """A PNG whose header claims `width` x `height` but that holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                     + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))
    return path


def test_png_path_roundtrip(tmp_path):
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (6, 9, 3)
    np.testing.assert_array_equal(loaded, pixels)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), pixels)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "F"])
def test_any_mode_becomes_rgb_like_pillow(tmp_path, mode):
    image = Image.fromarray(_rgb()).convert(mode)
    expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(load_image(image), expected)


def test_alpha_is_dropped_and_colour_kept(tmp_path):
    rgba = np.dstack([_rgb(), np.zeros((6, 9), np.uint8)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    np.testing.assert_array_equal(load_image(tmp_path / "t.png"), rgba[..., :3])


def test_palette_with_transparency(tmp_path):
    image = Image.fromarray(_rgb()).convert("P")
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (6, 9, 3)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 255, 4])
    assert (loaded[..., 0] == loaded[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left corner of the stored image
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image.save(tmp_path / "rot.png", exif=exif)
    loaded = load_image(tmp_path / "rot.png")
    assert loaded.shape == (6, 4, 3)
    assert tuple(loaded[0, -1]) == (255, 0, 0)  # top-left moved to top-right


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_and_leaves_the_callers_image(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))  # the reference
    with Image.open(tmp_path / "o.png") as opened:
        loaded = load_image(opened)
        assert opened.size == (6, 4) and opened.getexif().get(0x0112) == orientation
    np.testing.assert_array_equal(loaded, expected)


def test_animation_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (5, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=10)
    loaded = load_image(tmp_path / "anim.gif")
    assert loaded.shape == (4, 5, 3) and tuple(loaded[0, 0]) == (255, 0, 0)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = _png_header_only(tmp_path / "big.png", 12000, 9000)  # 108 MP, no pixel data at all
    with pytest.raises(ImageError, match=r"12000x9000 = 108,000,000 pixels, over the limit of "
                                         r"100,000,000"):
        load_image(path)
    with pytest.raises(ImageError, match="over the limit of 50"):
        load_image(Image.new("RGB", (10, 10)), max_pixels=50)


def test_decompression_bomb_is_an_image_error(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageError, match="bomb.png"):
        load_image(path)


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match=r"cannot read .*text\.jpg as an image"):
        load_image(tmp_path / "text.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(_rgb(64, 64)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)


def test_arrays():
    pixels = _rgb()
    np.testing.assert_array_equal(load_image(pixels), pixels)
    np.testing.assert_array_equal(load_image(pixels[..., 0]), np.repeat(pixels[..., :1], 3, 2))
    rgba = np.dstack([pixels, np.full((6, 9), 7, np.uint8)])
    np.testing.assert_array_equal(load_image(rgba), pixels)
    assert load_image(pixels[:, ::-1]).flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 4, 3), np.float32), "dtype float32"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    (np.zeros((0, 4, 3), np.uint8), "is empty"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_unknown_source_type():
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(3)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (100, 150), (225, 224), (37, 1000)])
def test_resize_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    pixels = _rgb(*size, seed=size[0])
    ours = resize_short_side(pixels, 224)
    assert min(ours.shape[:2]) == 224
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    expected = torch.nn.functional.interpolate(tensor, size=ours.shape[:2], mode="bilinear",
                                               align_corners=False, antialias=False)[0]
    expected = expected.permute(1, 2, 0).numpy()
    # rounded to the nearest grey level; torch computes coordinates in float32 (~3e-5 px off)
    assert np.abs(ours - expected).max() <= 0.5 + 0.02


def test_normalize():
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = normalize(pixels)
    assert out.shape == (3, 1, 1) and out.dtype == np.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), CLIP_MEAN, CLIP_STD)]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("mean, std", [(CLIP_MEAN, CLIP_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                       ((0.1, 0.7, 0.3), (0.2, 0.9, 0.05))])
def test_normalize_is_bit_identical_to_the_formula(mean, std):
    """The lookup table holds exactly what float32 (x - 255 mean) / (255 std) gives per pixel."""
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([levels, levels[::-1], np.roll(levels, 7)], -1)[None]  # (1, 256, 3)
    scale = np.asarray(std, dtype=np.float32) * 255.0
    shift = np.asarray(mean, dtype=np.float32) * 255.0
    chw = pixels.transpose(2, 0, 1).astype(np.float32)  # (3, 1, 256)
    literal = (chw - shift[:, None, None]) / scale[:, None, None]
    np.testing.assert_array_equal(normalize(pixels, mean, std), literal)  # (3, 1, 256)


def test_preprocess_windows():
    pixels = _rgb(300, 500, seed=3)
    prepared = preprocess(pixels, 224)
    assert prepared.resized_hw == (224, 373) and prepared.original_hw == (300, 500)
    assert prepared.boxes == ((0, 0), (0, 149))
    assert prepared.windows.shape == (2, 3, 224, 224) and prepared.windows.dtype == np.float32
    full = normalize(resize_short_side(pixels, 224))
    np.testing.assert_array_equal(prepared.windows[1], full[:, :, 149:373])
    np.testing.assert_array_equal(crop_windows(full, [(0, 0)], 224)[0], full[:, :, :224])


def test_preprocess_refuses_extreme_aspect_ratio():
    with pytest.raises(ImageError, match=r"needs 5 windows .* over the limit of 4"):
        preprocess(np.zeros((10, 50, 3), np.uint8), 16, max_windows=4)

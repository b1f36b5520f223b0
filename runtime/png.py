"""Label-map PNG files (docs/architecture.md "Command contracts").

`label_png_bytes(values, palette)` writes the PNG of an (H, W) map of small integers: 8-bit
indexed colour with the given palette (values up to 255), or 16-bit greyscale. The file is the
four chunks a minimal PNG needs (IHDR, PLTE for indexed colour, one IDAT, IEND; PNG
specification §5, §11), every row with filter type 0, and the image data compressed by ISA-L's
deflate (`isal`), which on label maps is ~10× faster than zlib at level 1 and its output
smaller (a label map is long runs of one value: filtering gains nothing there). Without `isal`
the standard library's zlib compresses instead; any PNG reader decodes both alike.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:  # ISA-L's deflate, a drop-in for zlib.compress
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - isal is a dependency; kept for odd platforms
    _deflate = zlib  # type: ignore[assignment]
DEFLATE_LEVEL = 1  # of ISA-L's 0..3 (zlib's 1 in the fallback)

SIGNATURE = b"\x89PNG\r\n\x1a\n"
INDEXED, GREY = 3, 0  # PNG colour types


def _chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data, CRC-32 of type and data (PNG §5.3)."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def label_png_bytes(values: np.ndarray, palette: bytes | None) -> bytes:
    """The PNG of `values` (H, W): with `palette` (RGB triples, up to 256) an 8-bit indexed
    image of values up to 255; without, a 16-bit greyscale image of values up to 65535."""
    height, width = values.shape
    if not height or not width:
        raise ValueError(f"a PNG needs at least one pixel, got {width}x{height}")
    if palette is not None:
        if len(palette) % 3 or not 3 <= len(palette) <= 768:
            raise ValueError(f"a PNG palette holds 1..256 RGB triples, got {len(palette)} bytes")
        depth, colour = 8, INDEXED
        rows = np.empty((height, 1 + width), np.uint8)  # filter byte + row
        rows[:, 1:] = values  # (H, W) cast to 8 bits as it is copied
    else:
        depth, colour = 16, GREY
        rows = np.empty((height, 1 + 2 * width), np.uint8)  # filter byte + row
        rows[:, 1:] = values.astype(">u2").view(np.uint8).reshape(height, -1)  # big-endian
    rows[:, 0] = 0  # filter type 0 (None) on every row
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_chunk(b"PLTE", palette))
    chunks.append(_chunk(b"IDAT", _deflate.compress(rows, DEFLATE_LEVEL)))  # no copy to bytes
    chunks.append(_chunk(b"IEND", b""))
    return SIGNATURE + b"".join(chunks)

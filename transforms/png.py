"""A short path through Pillow for plain PNGs: 8-bit grayscale or RGB, not interlaced, with
nothing but IHDR, IDAT and IEND chunks (what Pillow, OpenCV and most dataset tools write).

``Image.open(...).load()`` costs ~30 us of Python per image (format probing, the chunk
parser's objects, the generic tile loader) around ~4 us of inflating: for 28x28 digits that
Python is most of the job, and it holds the GIL, so decode threads cannot share it out. Here
the chunks are read with ``struct`` and the IDAT data goes to the same C decoder Pillow's
loader uses (``zip_decoder``: inflate and the PNG row filters), so the pixels are Pillow's.

Anything else (another colour type or depth, interlacing, palettes, ancillary chunks, a bad
checksum, data that does not inflate to a whole image) returns None and the caller decodes
the image the general way, which also gives a broken image its reason: this path accepts
only images Pillow's loader accepts with the same pixels, and never explains a failure.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pyarrow as pa
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sIIBBBBBI")  # length, type, width, height, depth, colour, ..., crc
_CHUNK = struct.Struct(">I4s")
_COLOUR = {"L": 0, "RGB": 2}  # PNG colour types that decode straight to the mode
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


# images decoded into one Pillow image at a time (stacked rows): well under Pillow's 16 MiB
# block, since the Arrow export needs the image in one block
_GROUP_BYTES = 1 << 20


def plain_pngs(blobs, lo: int, hi: int, mode: str, hw: tuple[int, int]):
    """Decode the plain PNGs of ``mode`` and size ``hw`` (H, W) among ``blobs[lo:hi]``.

    Yields (start, pixels, ok) per group of consecutive rows: ``pixels`` uint8 [rows, H, W, C]
    (a view of Pillow's buffer), ``ok`` which rows decoded here; the others (not plain, or
    broken) are left to the caller. A group's images are decoded into one tall Pillow image,
    each into its own band of rows (the decoder's extents), so a group costs one image and
    one Arrow export rather than one per 28x28 image (~2 us each)."""
    h, w = hw
    channels = 3 if mode == "RGB" else 1
    group = max(1, _GROUP_BYTES // (4 * h * w))  # Pillow stores RGB as 4 bytes a pixel
    for start in range(lo, hi, group):
        stop = min(hi, start + group)
        ok = np.zeros(stop - start, bool)
        im = None
        for i in range(start, stop):
            data = _image_data(blobs[i], mode, hw)
            if data is None:
                continue
            if im is None:
                im = Image.core.new(mode, (w, h * (stop - start)))
            top = h * (i - start)
            decoder = Image.core.zip_decoder(mode, mode)
            try:
                decoder.setimage(im, (0, top, w, top + h))
                n, err = decoder.decode(data)
            finally:
                decoder.cleanup()
            # else not a whole image (Pillow raises "truncated") or a zlib error: its band is
            # left as it is and the caller decodes the image the general way
            ok[i - start] = n < 0 and err >= 0
        if im is None:
            continue
        # a view of Pillow's buffer through the Arrow C data interface (see images._pixels)
        arr = pa.Array._import_from_c_capsule(im.__arrow_c_schema__(), im.__arrow_c_array__())
        if pa.types.is_fixed_size_list(arr.type):  # RGB is stored as RGBX
            pixels = np.asarray(arr.values).reshape(-1, h, w, 4)[..., :channels]
        else:
            pixels = np.asarray(arr).reshape(-1, h, w, 1)
        yield start, pixels, ok


def _image_data(blob, mode: str, hw: tuple[int, int]) -> bytes | None:
    """The IDAT data of a plain PNG of ``mode`` and size ``hw``, else None."""
    if blob is None or blob[:8] != _SIGNATURE or len(blob) < 45:
        return None
    length, cid, w, h, depth, colour, comp, flt, interlace, crc = _IHDR.unpack_from(blob, 8)
    if (cid != b"IHDR" or length != 13 or (h, w) != hw or depth != 8
            or colour != _COLOUR.get(mode) or comp or flt or interlace
            or zlib.crc32(memoryview(blob)[12:29]) != crc):
        return None
    # Pillow checks the checksums of the chunks before IDAT, not of IDAT itself: the same here
    pos, parts = 33, []
    while pos + 8 <= len(blob):
        length, cid = _CHUNK.unpack_from(blob, pos)
        if cid != b"IDAT":
            break
        if pos + 12 + length > len(blob):
            return None
        parts.append(blob[pos + 8:pos + 8 + length])
        pos += 12 + length
    if not parts or blob[pos:] != _IEND:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def png_size(blob) -> tuple[int, int] | None:
    """(H, W) from a PNG's IHDR when it is well formed (its checksum and a valid depth and
    colour type), else None (ask Pillow): the launch reads the size of thousands of sampled
    images, and ``Image.open`` costs ~15 us of Python for a header."""
    if blob is None or blob[:8] != _SIGNATURE or len(blob) < 45:
        return None
    length, cid, w, h, depth, colour, comp, flt, interlace, crc = _IHDR.unpack_from(blob, 8)
    if (cid != b"IHDR" or length != 13 or depth not in _DEPTHS.get(colour, ()) or comp or flt
            or interlace > 1 or not w or not h or zlib.crc32(memoryview(blob)[12:29]) != crc):
        return None
    return h, w

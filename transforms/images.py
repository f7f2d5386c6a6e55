"""Encoded images (PNG, JPEG, ...) in a binary column -> a float32 batch [B, C, H, W].

The same contract as ``features.feature_matrix``: a matrix for the whole batch and a reason
for every row that cannot be used (null, does not decode, a size that does not fit), whose
slot is left at zero, so a batch is always scored whole and bad rows go to the dead letter.

Decoding is Pillow's, on a thread pool: Pillow releases the GIL while it decodes, so the
workers run in parallel. Each worker takes a contiguous slice of the batch (not one task per
image: for small images the cost of a task is as large as the decode) and writes the
model's float32 [C, H, W] slot of each image right after decoding it (scaling to [0, 1],
normalising per channel and moving channels first in one numpy pass per channel, while the
pixels are still in cache; numpy releases the GIL in its loops). Pixels come out of Pillow
through the Arrow C data interface, a view of Pillow's own buffer (``np.asarray(image)``
copies through an encoder, which costs as much as decoding a small PNG). Plain PNGs skip
``Image.open`` altogether (transforms/png.py): for small ones its Python is most of the cost.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import re
import threading

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from titans.transforms.columns import one_array
from titans.transforms.png import plain_pngs, png_size

_CHANNELS = {"RGB": 3, "L": 1}
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOLS_LOCK:  # one pool per size per process, reused by every batch
        if threads not in _POOLS:
            _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, "titans-images")
        return _POOLS[threads]


def decode_images(column, mode: str = "RGB", size: tuple[int, int] | None = None,
                  mean=None, std=None, threads: int | None = None, draft: bool = False,
                  expect: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoded images -> (float32 [B, C, H, W], reasons or None).

    ``mode`` "RGB" (C=3) or "L" (C=1); every image is converted to it. ``size`` (H, W)
    resizes every image (bilinear); without it the images of a batch must share one size
    (the most common one; others get a reason). Pixels are scaled to [0, 1], then
    ``(x - mean[c]) / std[c]`` per channel when ``mean``/``std`` are given. ``draft``
    lets JPEG decode at a reduced scale before resizing (faster for large photos, slightly
    different pixels). ``expect`` (H, W), without ``size``: the size the images most likely
    share (the launch's), decoded straight into the batch; the batch's most common size
    still decides, as without it. Reasons: an object array with a string for each bad row
    and None for good ones, or None when every row is fine.
    """
    if mode not in _CHANNELS:
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    channels = _CHANNELS[mode]
    scale, offset = _normalisation(channels, mean, std)
    blobs = _blobs(column)
    n = len(blobs)
    threads = threads or default_threads()
    reasons = np.full(n, None, dtype=object)
    if size is not None:
        h, w = int(size[0]), int(size[1])
        out = np.empty((n, channels, h, w), np.float32)
        _run(threads, n, lambda lo, hi: _decode_into(blobs, lo, hi, mode, (w, h), draft, scale,
                                                    offset, out, reasons))
    elif expect is not None:
        out = _decode_expected(blobs, mode, expect, threads, scale, offset, reasons)
    else:
        out = _decode_same_size(blobs, mode, threads, scale, offset, reasons)
    bad = np.array([r is not None for r in reasons], bool) if n else np.zeros(0, bool)
    if bad.any():
        out[bad] = 0.0
        return out, reasons
    return out, None


def image_sizes(column) -> list[tuple[int, int] | None]:
    """(H, W) of each encoded image from its header alone (Pillow opens lazily: no pixel is
    decoded), None for a null or unreadable one: what the launch needs to fix the input
    shape, at a small fraction of a decode."""
    sizes: list = []
    for blob in _blobs(column):
        hw = png_size(blob)
        if hw is not None:
            sizes.append(hw)
            continue
        try:
            w, h = Image.open(io.BytesIO(blob)).size
            sizes.append((h, w))
        except Exception:  # noqa: BLE001 - a null or unreadable image: its decode says why
            sizes.append(None)
    return sizes


def _blobs(column) -> list:
    column = one_array(column)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"an image column holds encoded bytes (binary), not {column.type}")
    return column.to_pylist()  # bytes objects: Pillow reads them without another copy


def _normalisation(channels: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel so that x_float = x_uint8 * scale + offset."""
    mean = np.zeros(channels) if mean is None else np.broadcast_to(np.asarray(mean, float), channels)
    std = np.ones(channels) if std is None else np.broadcast_to(np.asarray(std, float), channels)
    if (std <= 0).any():
        raise ValueError(f"std must be positive, got {std.tolist()}")
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _run(threads: int, n: int, fn, min_rows: int = 1) -> None:
    """fn(lo, hi) over contiguous slices of [0, n), on the pool (inline when small)."""
    parts = max(1, min(threads, n // max(1, min_rows)))
    if parts == 1:
        if n:
            fn(0, n)
        return
    bounds = np.linspace(0, n, parts + 1).astype(int)
    futures = [_pool(threads).submit(fn, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()


def _open(blob, mode: str, wh: tuple[int, int] | None, draft: bool) -> Image.Image:
    im = Image.open(io.BytesIO(blob))
    if draft and wh is not None and im.format == "JPEG":
        im.draft(mode, wh)
    if im.mode != mode:
        im = im.convert(mode)  # also decodes
    else:
        im.load()
    if wh is not None and im.size != wh:
        im = im.resize(wh, Image.Resampling.BILINEAR)
    return im


def _pixels(im: Image.Image) -> np.ndarray:
    """[H, W, C] uint8 view of a decoded "L" or "RGB" image.

    Through the Arrow C data interface (Pillow >= 11.2) it is a view of Pillow's own
    buffer: ``np.asarray(im)`` goes through ``tobytes()``, an encoder pass and a copy,
    which on a 28x28 PNG cost as much as decoding it.
    """
    w, h = im.size
    try:
        arr = pa.array(im)
    except Exception:  # noqa: BLE001 - an older Pillow, or an image in several blocks
        return np.asarray(im).reshape(h, w, -1)
    if pa.types.is_fixed_size_list(arr.type):  # RGB is stored as RGBX: 4 bytes a pixel
        return np.asarray(arr.values).reshape(h, w, arr.type.list_size)[:, :, :3]
    return np.asarray(arr).reshape(h, w, 1)


def _decode_into(blobs, lo, hi, mode, wh, draft, scale, offset, out, reasons, odd=None):
    """Decode rows [lo, hi) into ``out``; with ``odd`` (a dict, and ``wh`` None) the pixels
    of an image whose size is not ``out``'s go there instead.

    Plain PNGs of ``out``'s size take ``png.plain_pngs``'s short path first, a group of
    rows at a time, normalised together (per image, the numpy calls cost as much as a 28x28
    decode); every other image, and any the short path declines, goes through ``_open``."""
    done = np.zeros(hi - lo, bool)
    for start, pixels, ok in plain_pngs(blobs, lo, hi, mode, out.shape[2:]):
        done[start - lo:start - lo + len(ok)] = ok
        if ok.all():
            _normalise_many(pixels, scale, offset, out[start:start + len(ok)])
        else:
            for j in np.flatnonzero(ok):
                _normalise(pixels[j], scale, offset, out[start + j])
    if done.all():
        return
    for i in (lo + np.flatnonzero(~done)).tolist():
        blob = blobs[i]
        if blob is None:
            reasons[i] = "null image"
            continue
        try:
            pixels = _pixels(_open(blob, mode, wh, draft))
            if odd is not None and pixels.shape[:2] != out.shape[2:]:
                odd[i] = pixels
                continue
            _normalise(pixels, scale, offset, out[i])
        except Exception as e:  # noqa: BLE001 - any undecodable image is a row's problem
            reasons[i] = _why(e)


def _decode_expected(blobs, mode, hw, threads, scale, offset, reasons) -> np.ndarray:
    """Without a target size, when the size is known beforehand: one pass straight into the
    batch (no array per image, no second pass), as with a size. Images of another size are
    set aside and get a reason, unless one such size is the batch's most common: then the
    batch is decoded again the general way (``_decode_same_size``)."""
    n = len(blobs)
    out = np.empty((n, len(scale), int(hw[0]), int(hw[1])), np.float32)
    odd: dict = {}
    _run(threads, n, lambda lo, hi: _decode_into(blobs, lo, hi, mode, None, False, scale,
                                                offset, out, reasons, odd))
    if not odd:
        return out
    sizes = collections.Counter(a.shape[:2] for a in odd.values())
    fitting = n - len(odd) - sum(r is not None for r in reasons)
    if sizes.most_common(1)[0][1] > fitting:
        reasons[:] = None
        return _decode_same_size(blobs, mode, threads, scale, offset, reasons)
    h, w = out.shape[2:]
    for i, a in odd.items():
        reasons[i] = (f"image is {a.shape[0]}x{a.shape[1]}, the batch's images are {h}x{w} "
                      f"(pass a size to resize them)")
    return out


def _decode_same_size(blobs, mode, threads, scale, offset, reasons) -> np.ndarray:
    """Without a target size: decode each image on its own, then keep the common size."""
    n = len(blobs)
    arrays: list = [None] * n

    def work(lo, hi):
        for i in range(lo, hi):
            if blobs[i] is None:
                reasons[i] = "null image"
                continue
            try:
                arrays[i] = _pixels(_open(blobs[i], mode, None, False))
            except Exception as e:  # noqa: BLE001
                reasons[i] = _why(e)

    _run(threads, n, work)
    shapes = [a.shape[:2] for a in arrays if a is not None]
    if not shapes:
        return np.zeros((n, len(scale), 0, 0), np.float32)
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    h, w = (int(v) for v in values[np.argmax(counts)])
    out = np.empty((n, len(scale), h, w), np.float32)
    for i, a in enumerate(arrays):
        if a is not None and a.shape[:2] != (h, w):
            reasons[i] = (f"image is {a.shape[0]}x{a.shape[1]}, the batch's images are {h}x{w} "
                          f"(pass a size to resize them)")
            arrays[i] = None

    def normalise(lo, hi):
        for i in range(lo, hi):
            if arrays[i] is not None:
                _normalise(arrays[i], scale, offset, out[i])

    _run(threads, n, normalise)
    return out


def _normalise(pixels: np.ndarray, scale, offset, out: np.ndarray) -> None:
    """[H, W, C'] uint8 -> out [C, H, W] float32 = pixels * scale + offset, per channel.

    One image at a time, right after its decode, while its pixels are still in cache."""
    for c in range(out.shape[0]):
        np.multiply(pixels[:, :, c], scale[c], out=out[c], casting="unsafe")
        if offset[c]:
            np.add(out[c], offset[c], out=out[c])


def _normalise_many(pixels: np.ndarray, scale, offset, out: np.ndarray) -> None:
    """[N, H, W, C'] uint8 -> out [N, C, H, W] float32, as ``_normalise`` does one image."""
    for c in range(out.shape[1]):
        np.multiply(pixels[..., c], scale[c], out=out[:, c], casting="unsafe")
        if offset[c]:
            np.add(out[:, c], offset[c], out=out[:, c])


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _why(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can read (PNG, JPEG, ...)"
    text = _ADDRESS.sub("", str(e).splitlines()[0] if str(e) else "")
    return f"image does not decode: {type(e).__name__}: {text}"

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from titans.transforms.images import decode_images


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(seed, h=6, w=5):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_pixels_exactly_scaled_and_normalised_channels_first():
    images = [_rgb(0), _rgb(1)]
    col = pa.array([_encode(a, "PNG") for a in images], pa.binary())
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    x, reasons = decode_images(col, size=None, mean=mean, std=std, threads=2)
    assert reasons is None and x.shape == (2, 3, 6, 5) and x.dtype == np.float32
    expected = (np.stack(images).transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) \
        / np.array(std)[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


def test_modes_and_resizing_follow_pillow():
    rgba = np.dstack([_rgb(2, 8, 8), np.full((8, 8), 255, np.uint8)])
    gray = np.random.default_rng(3).integers(0, 256, (10, 12), dtype=np.uint8)
    col = pa.chunked_array([[_encode(rgba, "PNG")], [_encode(gray, "PNG"), _encode(_rgb(4, 16, 16), "JPEG")]])
    x, reasons = decode_images(col, mode="L", size=(4, 4))
    assert reasons is None and x.shape == (3, 1, 4, 4)
    ref = Image.open(io.BytesIO(_encode(gray, "PNG"))).convert("L").resize((4, 4), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(x[1, 0], np.asarray(ref) / 255.0, atol=1e-6)
    rgb, _ = decode_images(col, mode="RGB", size=(4, 4))
    assert rgb.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(rgb[1, 0], rgb[1, 2])  # a gray image has three equal channels


def test_undecodable_null_and_odd_sized_images_get_reasons():
    good = _encode(_rgb(5), "PNG")
    truncated = good[: len(good) // 2]
    col = pa.array([good, b"not an image", None, truncated, _encode(_rgb(6, 7, 5), "PNG"), good],
                   pa.binary())
    x, reasons = decode_images(col, threads=3)
    assert reasons[0] is None and reasons[5] is None
    assert reasons[1] == "not an image Pillow can read (PNG, JPEG, ...)"
    assert reasons[2] == "null image"
    assert reasons[3].startswith("image does not decode: ")
    assert reasons[4] == "image is 7x5, the batch's images are 6x5 (pass a size to resize them)"
    assert not x[1:5].any() and x[0].any()
    np.testing.assert_array_equal(x[0], x[5])
    # with a size, the odd one is resized instead
    _, reasons = decode_images(col, size=(6, 5))
    assert reasons[4] is None and reasons[1] is not None


def test_argument_errors():
    with pytest.raises(ValueError, match="binary"):
        decode_images(pa.array(["x"]))
    with pytest.raises(ValueError, match="mode"):
        decode_images(pa.array([b""]), mode="CMYK")
    x, reasons = decode_images(pa.array([], pa.binary()), size=(3, 3))
    assert x.shape == (0, 3, 3, 3) and reasons is None

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
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


# ---------------------------------------------------------------- launch shape, batch bytes

def test_the_launch_shape_comes_from_the_headers_without_decoding():
    from titans.transforms.features import ImageSpec, resolve_image_spec
    from titans.transforms.images import image_sizes

    good = _encode(_rgb(7, 6, 5), "PNG")
    truncated = good[: len(good) // 2]  # its header is whole: its size is known, not its pixels
    col = pa.array([good, None, b"junk", truncated, _encode(_rgb(8, 9, 4), "PNG")], pa.binary())
    assert image_sizes(col) == [(6, 5), None, None, (6, 5), (9, 4)]
    table = pa.table({"image": col})
    spec = resolve_image_spec(table.schema, ImageSpec("image", mode="L"), table)
    assert spec.shape == (1, 6, 5)
    with pytest.raises(ValueError, match="none of the 2 sampled images"):
        bad = pa.table({"image": pa.array([b"junk", None], pa.binary())})
        resolve_image_spec(bad.schema, ImageSpec("image"), bad)


def test_a_batch_of_images_is_capped_by_bytes_not_rows():
    from titans.transforms.features import IMAGE_BATCH_BYTES, FeatureSpec, ImageSpec

    photo = ImageSpec("image", shape=(3, 224, 224))
    assert photo.batch_rows(65536) == IMAGE_BATCH_BYTES // (3 * 224 * 224 * 4) == 445
    assert ImageSpec("image", shape=(1, 28, 28)).batch_rows(65536) == 65536  # 205 MB fits
    assert ImageSpec("image", shape=(3, 4096, 4096)).batch_rows(65536) == 1  # never 0
    assert photo.batch_rows(100) == 100
    assert FeatureSpec(("f",), 64).batch_rows(65536) == 65536


class BatchSizeNet(torch.nn.Module):
    """Logits [log B, 0] for a batch of B: each row's confidence B / (B + 1) says the size of
    the batch it was scored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return torch.cat([torch.log(torch.ones(n, 1) * float(n)), torch.zeros(n, 1)], 1) \
            + x.mean() * 0


def test_the_models_see_batches_capped_by_bytes(tmp_path, monkeypatch):
    from conftest import RUNNER, read_labels
    from titans.models.loading import ModelRef
    from titans.pipeline.job import run_cascade
    from titans.pipeline.plan import RunConfig, plan_run
    from titans.transforms import features
    from titans.transforms.features import ImageSpec
    from titans.transforms.io.models import save_torchscript

    rows, cap_rows = 300, 40
    monkeypatch.setattr(features, "IMAGE_BATCH_BYTES", 3 * 32 * 32 * 4 * cap_rows)
    images = [_encode(_rgb(i, 32, 32), "PNG") for i in range(rows)]
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.table({"id": np.arange(rows), "image": pa.array(images, pa.binary())}),
                   tmp_path / "data" / "a.parquet")
    model = str(tmp_path / "m.pt")
    save_torchscript(BatchSizeNet(), model)
    config = RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                       student=ModelRef(model), teacher=ModelRef(model), deferral_rate=0.5,
                       image=ImageSpec("image"))  # default batch sizes: 65,536 and 16,384
    report = run_cascade(plan_run(config), RUNNER)
    assert report["conservation_ok"] and report["rows_in"] == rows and not report["rows_dead_letter"]
    assert report["image_batch_rows"] == report["image_teacher_batch_rows"] == cap_rows
    conf = read_labels(tmp_path / "out").column("confidence").to_numpy()
    seen = np.rint(conf / (1 - conf)).astype(int)  # the batch sizes the models saw
    assert seen.max() == cap_rows and seen.min() >= 1


PEAK_RUN = """
import json, sys
from titans.transforms import features
features.IMAGE_BATCH_BYTES = 8 << 20  # 170 images of 128x128 RGB a batch
from titans.pipeline.cli.main import main
main(sys.argv[1:])
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"peak_mb": peak / 1024}))
"""


def test_peak_memory_stays_flat_in_the_number_of_images(tmp_path):
    # 600 vs 2,400 images of 128x128 RGB in one row group: 190 MB more floats decoded at once
    # without the cap; with it, the same batches of 170 images whatever the rows
    from titans.transforms.io.models import save_torchscript

    model = str(tmp_path / "m.pt")
    save_torchscript(BatchSizeNet(), model)
    jpegs = [_encode(_rgb(i, 128, 128), "JPEG", quality=80) for i in range(8)]
    peaks = []
    for rows in (600, 2400):
        data = tmp_path / f"d{rows}.parquet"
        pq.write_table(pa.table({"id": np.arange(rows),
                                 "image": pa.array([jpegs[i % 8] for i in range(rows)])}), data)
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RUN, "run", "--input", str(data), "--output",
             str(tmp_path / f"out{rows}"), "--student", model, "--teacher", model,
             "--image-column", "image", "--deferral-rate", "0.5", "--runner", "FnApiRunner"],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])
    assert peaks[1] - peaks[0] < 80, peaks


def test_an_expected_size_gives_what_the_general_path_gives():
    good = [_encode(_rgb(i), "PNG") for i in range(4)]  # 6x5
    other = [_encode(_rgb(10 + i, 7, 5), "PNG") for i in range(3)]  # 7x5
    for blobs in (good[:3] + other[:1] + [None, b"junk"],  # the expected size is the common one
                  good[:1] + other + [b"junk"]):  # it is not: the batch's most common decides
        col = pa.array(blobs, pa.binary())
        want, want_reasons = decode_images(col, mode="L", threads=2)
        got, got_reasons = decode_images(col, mode="L", threads=2, expect=(6, 5))
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert list(got_reasons) == list(want_reasons)


class SizeOrFail(torch.nn.Module):
    """BatchSizeNet's logits, but raises on a batch holding a white image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).mean(1) > 0.99).any()):
            raise ValueError("a white image")
        n = x.shape[0]
        return torch.cat([torch.log(torch.ones(n, 1) * float(n)), torch.zeros(n, 1)], 1)


def test_a_batch_is_decoded_in_slices_and_every_row_keeps_its_own_error(tmp_path, monkeypatch):
    from titans.models.deferral import make_rule
    from titans.models.loading import ModelRef
    from titans.transforms import features
    from titans.transforms.dead_letter import VALIDATE
    from titans.transforms.features import ImageSpec
    from titans.transforms.inference import ArrowModelHandler
    from titans.transforms.io.models import save_torchscript
    from titans.transforms.labels import ERROR, ERROR_STAGE, LabelColumns, StudentLabels

    monkeypatch.setattr(features, "IMAGE_SLICE_BYTES", 4 * 8 * 8 * 4)  # 4 images a slice
    gray = [np.full((8, 8), 10 * i, np.uint8) for i in range(13)]
    gray[9][:] = 255  # the model raises on it
    blobs = [_encode(g, "PNG") for g in gray]
    blobs[6] = b"junk"
    tables = [pa.table({"id": np.arange(lo, hi), "image": pa.array(blobs[lo:hi], pa.binary())})
              for lo, hi in ((0, 5), (5, 13))]  # two tables merged into one batch of 13
    model = str(tmp_path / "m.pt")
    save_torchscript(SizeOrFail(), model)
    handler = ArrowModelHandler(ModelRef(model), ImageSpec("image", mode="L", shape=(1, 8, 8)),
                                StudentLabels(make_rule("margin"), LabelColumns()),
                                batch_size=64, name="student")
    out = handler.run_inference(tables, handler.load_model())
    assert [t.num_rows for t in out] == [5, 8]
    done = pa.concat_tables(out)
    errors, stages = done.column(ERROR).to_pylist(), done.column(ERROR_STAGE).to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [6, 9]
    assert stages[6] == VALIDATE and errors[6].startswith("not an image")
    assert stages[9] == "student" and "a white image" in errors[9]
    conf = np.array(done.column("confidence").to_pylist(), dtype=float)
    seen = np.rint(conf / (1 - conf))  # the rows the model saw at once: slices of 4, or fewer
    good = [i for i in range(13) if i not in (6, 9)]
    assert seen[good].max() == 4 and seen[[0, 1, 2, 3]].tolist() == [4, 4, 4, 4]


def test_plain_pngs_take_the_short_path_with_pillows_pixels_and_reasons(monkeypatch):
    """Plain 8-bit L/RGB PNGs skip Image.open (transforms/png.py); the pixels and the reasons
    are what the general path gives, and anything unusual or broken goes that way."""
    from titans.transforms import images, png

    rgb, g = _rgb(3, 7, 9), _rgb(4, 7, 9)[:, :, 0]
    good = _encode(rgb, "PNG")
    blobs = [good, _encode(g, "PNG"), _encode(rgb, "PNG", optimize=True), good[:-12],
             good[:60], good[:20] + b"x" + good[21:], good[:50] + bytes([good[50] ^ 1]) + good[51:],
             _encode(rgb[:3], "PNG"), None, b"junk", _encode(rgb, "PNG", dpi=(72, 72)),
             _encode(np.dstack([rgb, g]), "PNG"), good + b"trailing", _encode(rgb, "JPEG")]
    (start, pixels, ok), = png.plain_pngs([None, good, good], 0, 3, "RGB", (7, 9))
    assert start == 0 and ok.tolist() == [False, True, True] and np.array_equal(pixels[2], rgb)
    assert not list(png.plain_pngs([good], 0, 1, "L", (7, 9)))  # a conversion: not plain
    col = pa.array(blobs, pa.binary())
    for mode in ("RGB", "L"):
        for kw in ({"expect": (7, 9)}, {"size": (7, 9)}):
            fast = decode_images(col, mode, threads=2, **kw)
            monkeypatch.setattr(images, "plain_pngs", lambda *a: iter(()))
            slow = decode_images(col, mode, threads=2, **kw)
            monkeypatch.undo()
            assert np.array_equal(fast[0], slow[0]) and list(fast[1]) == list(slow[1])
            assert fast[1][0] is None and fast[1][8] == "null image" and fast[1][4] is not None
            monkeypatch.setattr(png, "_GROUP_BYTES", 600)  # groups of 2 rows: bands and ends
            grouped = decode_images(col, mode, threads=2, **kw)
            monkeypatch.undo()
            assert np.array_equal(grouped[0], slow[0]) and list(grouped[1]) == list(slow[1])
    sizes = images.image_sizes(col)
    monkeypatch.setattr(images, "png_size", lambda blob: None)
    assert sizes == images.image_sizes(col) and sizes[0] == (7, 9) and sizes[7] == (3, 9)

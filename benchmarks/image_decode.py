"""Image decoding: ``transforms.images.decode_images`` against a bare Pillow loop.

    python benchmarks/image_decode.py [--rows 4096] [--repeats 5] [--threads N] [--batch 256]

Two workloads, each a batch of encoded images in one Arrow binary column:
- 28x28 grayscale PNGs (MNIST-sized), decoded as mode "L";
- 224x224 RGB JPEGs (quality 90), decoded as mode "RGB", normalised with ImageNet's mean/std.
Baselines, measured in the same run, interleaved, median of --repeats:
- bare: ``Image.open(BytesIO(b)).load()`` for every image on one thread (decode only, no
  conversion to an array, no normalisation);
- ours on one thread, and ours on the thread pool (decode, convert, scale, normalise,
  channels first: a model-ready float32 batch).
Prints rows/s and the ratios ours / bare (target: one thread >= 0.8).

torchvision.io.decode_image / decode_jpeg are not compared: the torchvision built for
torch 2.13.0 on PyPI (0.28.0) is a CUDA build whose compiled ops do not load next to
torch 2.13.0+cpu ("operator torchvision::nms does not exist"), and 0.29 needs torch >= 2.14.
The whole cascade against a Pillow loop is benchmarks/image_cascade.py.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from titans.transforms.images import decode_images, default_threads

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def make_images(rows: int, kind: str, seed: int = 0) -> pa.Array:
    rng = np.random.default_rng(seed)
    blobs = []
    for i in range(rows):
        if kind == "png28":
            # smooth-ish digits-like content compresses like real scans, not like noise
            base = rng.integers(0, 256, (7, 7), dtype=np.uint8)
            img = Image.fromarray(base).resize((28, 28), Image.Resampling.BILINEAR)
            fmt, kw = "PNG", {}
        else:
            base = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((224, 224), Image.Resampling.BICUBIC)
            fmt, kw = "JPEG", {"quality": 90}
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        blobs.append(buf.getvalue())
    return pa.array(blobs, pa.binary())


def bare(column: pa.Array) -> None:
    for blob in column.to_pylist():
        Image.open(io.BytesIO(blob)).load()


def measure(rows: int, repeats: int, threads: int, batch: int) -> dict:
    results = {}
    for kind, mode, norm in (("png28", "L", {}), ("jpeg224", "RGB", IMAGENET)):
        column = make_images(rows, kind)
        runs = {"bare": [], "ours_1": [], f"ours_{threads}": []}
        for _ in range(repeats):  # interleaved, so load on the machine hits all alike
            for name in runs:
                t0 = time.perf_counter()
                if name == "bare":
                    bare(column)
                else:  # in model-sized batches, as a pipeline calls it
                    for lo in range(0, rows, batch):
                        x, reasons = decode_images(column.slice(lo, batch), mode=mode,
                                                   threads=int(name.split("_")[1]), **norm)
                        assert reasons is None
                runs[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in runs.items()}
        results[kind] = {k: rows / v for k, v in med.items()}
        results[kind]["spread"] = {k: [round(rows / t) for t in v] for k, v in runs.items()}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    results = measure(args.rows, args.repeats, args.threads, args.batch)
    for kind, r in results.items():
        print(f"{kind}: bare Pillow loop {r['bare']:,.0f} rows/s | ours 1 thread "
              f"{r['ours_1']:,.0f} rows/s ({r['ours_1'] / r['bare']:.2f}x) | ours "
              f"{args.threads} threads {r[f'ours_{args.threads}']:,.0f} rows/s "
              f"({r[f'ours_{args.threads}'] / r['bare']:.2f}x)")
        print(f"  runs (rows/s): {r['spread']}")


if __name__ == "__main__":
    main()

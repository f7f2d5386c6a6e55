"""Throughput of `titans run` on TFRecord and on encoded images (issue 8), whole processes.

    python benchmarks/formats_throughput.py [--rows 1000000] [--image-rows 60000,6000]
                                            [--repeat 5] [--only tfrecord|images|all]

TFRecord group: --rows rows x 64 float32 + an int64 id, the same rows in every format,
throughput.py's models (student MLP 64-32-10, teacher 64-256-256-10), margin rule at
deferral rate 0.2, Parquet labels out.
  (1) titans run on one Parquet file (pyarrow's default 1M-row groups, as throughput.py);
  (2) titans run on 4 uncompressed TFRecord files of tf.train.Example; (3) on the same 4
      files GZIP-compressed (.tfrecord.gz);
  (4) a hand-written loop over the files of (2), and (4g) of (3): throughput.py's
      hand-written cascade after the fastest per-record reader we found, with no titans
      code: whole files in memory (gzip.decompress), lengths walked with struct, both CRCs
      checked with google-crc32c, each record parsed by protobuf's C parser (upb) through a
      descriptor in which Features.feature is map<string, bytes>, the 64 floats taken
      straight from the canonical FloatList bytes (other encodings: a full Feature parse).
      Full Example messages were ~2x slower; a repeated-entry descriptor, or one parse of
      all records wrapped in a container message, no faster. One process, as titans' here.
Images group: Parquet files of an `image` binary column + id (image_decode.py's synthetic
content), 28x28 grayscale PNGs and 224x224 RGB JPEGs (quality 90), M and 2M rows each.
  (5) titans run --image-column image --image-mode L|RGB --image-size H,W (JPEGs also
      normalised with ImageNet's mean/std); models kept small so that decoding dominates:
      MLP 784-32-10 / 784-256-256-10 on 28x28, a stride-4 conv + average pool + linear
      student and a two-conv teacher on 224x224;
  (6) a bare Pillow loop: Image.open(BytesIO(b)).convert(mode), np.asarray, one thread.
titans' start-up (Beam and torch imports, launch checks) is ~4 s, the bare loop's ~0.2 s,
so at these sizes the whole-process ratio largely measures start-up; the marginal rate
(2M - M) / (t(2M) - t(M)) takes it out on both sides. titans' launch sample is set to
--image-sample-rows: the default 100,000 used to be every row here, each decoded twice (the
image sample is now 10,000 rows by default, decoded once). titans decodes on its thread
pool (min(8, CPUs) threads), the bare loop on one.

Each run is a fresh process timed by throughput.py's timed(); sides are interleaved
(1, 2, 3, 4, 4g, 1, 2, ...) so a drifting load on this noisy machine hits all alike, and
medians count. Outputs are checked: every row in titans' report.json and none
dead-lettered; every row in the hand loop's Parquet and the bare loop's count. Data and
models are written once and cached in --workdir.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (make_data, make_models, timed: the same as its benchmark)

DIM, RATE, SHARDS, BATCH = throughput.DIM, throughput.RATE, 4, 65536
IMAGES = {  # kind -> mode, size, extra titans flags
    "png28": ("L", (28, 28), []),
    # batches a user would pick (titans also caps a decoded batch at 256 MiB by itself)
    "jpeg224": ("RGB", (224, 224), ["--image-mean", "0.485,0.456,0.406", "--image-std",
                                    "0.229,0.224,0.225", "--batch-size", "256",
                                    "--teacher-batch-size", "256"]),
}
TITANS = [sys.executable, "-m", "titans.pipeline.cli.main", "--log-level", "WARNING", "run"]


# ---------------------------------------------------------------------------- data, models

def make_tabular(workdir: str, rows: int) -> tuple[str, str, str]:
    """(Parquet file, TFRecord directory, GZIP TFRecord directory), the same rows."""
    import gzip

    import pyarrow.parquet as pq

    from titans.transforms.io.example_codec import encode_examples_array
    from titans.transforms.io.tfrecord import frame_records

    parquet = os.path.join(workdir, f"data-{rows}.parquet")  # shared with throughput.py
    throughput.make_data(parquet, rows)
    dirs = [os.path.join(workdir, f"tfrecord-{rows}"), os.path.join(workdir, f"tfrecord-gz-{rows}")]
    if not all(os.path.isdir(d) for d in dirs):
        table = pq.read_table(parquet)
        for d in dirs:
            os.makedirs(d + ".tmp", exist_ok=True)
        for i in range(SHARDS):  # several files, as jobs write them (and so titans splits)
            lo, hi = rows * i // SHARDS, rows * (i + 1) // SHARDS
            data = bytes(frame_records(encode_examples_array(table.slice(lo, hi - lo))))
            name = f"part-{i:05d}-of-{SHARDS:05d}.tfrecord"
            with open(os.path.join(dirs[0] + ".tmp", name), "wb") as f:
                f.write(data)
            with open(os.path.join(dirs[1] + ".tmp", name + ".gz"), "wb") as f:
                f.write(gzip.compress(data, compresslevel=6))  # zlib's default, as TF's writer
        for d in dirs:
            os.rename(d + ".tmp", d)
    return parquet, dirs[0], dirs[1]


def make_images(workdir: str, kind: str, rows: int) -> tuple[str, str]:
    """Parquet files of the first `rows` and `2 * rows` images (one row group each)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from image_decode import make_images as encode  # the colleague's digits-like content

    paths = tuple(os.path.join(workdir, f"images-{kind}-{n}.parquet") for n in (rows, 2 * rows))
    if not all(os.path.exists(p) for p in paths):
        table = pa.table({"id": np.arange(2 * rows), "image": encode(2 * rows, kind)})
        for path, n in zip(paths, (rows, 2 * rows)):
            pq.write_table(table.slice(0, n), path + ".tmp")
            os.rename(path + ".tmp", path)
    return paths


def make_image_models(workdir: str, kind: str) -> tuple[str, str]:
    import torch
    from torch import nn

    from titans.models.architectures import MLP
    from titans.transforms.io.models import save_torchscript

    paths = tuple(os.path.join(workdir, f"{kind}-{role}.pt") for role in ("student", "teacher"))
    if all(os.path.exists(p) for p in paths):
        return paths
    torch.manual_seed(0)
    if kind == "png28":  # MLP flattens [B, 1, 28, 28]
        student, teacher = MLP(28 * 28, 10, (32,)), MLP(28 * 28, 10, (256, 256))
    else:  # a few MFLOPs per image, far below a 224x224 JPEG decode
        def pool():
            return nn.AdaptiveAvgPool2d(1), nn.Flatten()
        student = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), *pool(), nn.Linear(8, 10))
        teacher = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(),
                                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                *pool(), nn.Linear(32, 10))
    save_torchscript(student, paths[0])
    save_torchscript(teacher, paths[1])
    return paths


# ---------------------------------------------------------------------------- hand-written sides
# These run in their own process (see main) and import nothing from titans.

def _raw_example_class():
    """tf.train.Example with Features.feature as map<string, bytes> (the same wire format):
    upb parses the envelope without building a message per feature. Plus Feature itself."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="hand/example.proto", package="hand", syntax="proto3")
    for name, number, kind in (("FloatList", 1, F.TYPE_FLOAT), ("Int64List", 1, F.TYPE_INT64)):
        fd.message_type.add(name=name).field.add(name="value", number=number, type=kind,
                                                 label=F.LABEL_REPEATED).options.packed = True
    feature = fd.message_type.add(name="Feature")  # bytes_list (1) is not needed here
    feature.field.add(name="float_list", number=2, type=F.TYPE_MESSAGE, type_name=".hand.FloatList")
    feature.field.add(name="int64_list", number=3, type=F.TYPE_MESSAGE, type_name=".hand.Int64List")
    features = fd.message_type.add(name="Features")
    features.field.add(name="feature", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                       type_name=".hand.Features.Entry")
    entry = features.nested_type.add(name="Entry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, type=F.TYPE_BYTES)
    fd.message_type.add(name="Example").field.add(name="features", number=1, type=F.TYPE_MESSAGE,
                                                  type_name=".hand.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"hand.{n}"))  # noqa: E731
    return get("Example"), get("Feature")


def read_tfrecords(paths: list[str]):
    """(ids int64 [n], features float32 [n, 64]) of every record, CRCs checked."""
    import gzip

    import google_crc32c
    import numpy as np

    Example, Feature = _raw_example_class()
    parse, parse_feature, crc = Example.FromString, Feature.FromString, google_crc32c.value
    header, trailer = struct.Struct("<QI").unpack_from, struct.Struct("<I").unpack_from
    # Feature{float_list{value: 64 packed floats}}: tag, len 259, tag, len 256, then the floats
    canonical, size = b"\x12\x83\x02\x0a\x80\x02", 6 + 4 * DIM

    def mask(c):
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    id_parts, x_parts = [], []
    for path in paths:
        with open(path, "rb") as f:
            data = gzip.decompress(f.read()) if path.endswith(".gz") else f.read()
        floats, ids, pos = [], [], 0
        while pos < len(data):
            length, length_crc = header(data, pos)
            record = data[pos + 12:pos + 12 + length]
            if mask(crc(data[pos:pos + 8])) != length_crc or \
                    mask(crc(record)) != trailer(data, pos + 12 + length)[0]:
                raise ValueError(f"{path}: bad CRC at byte {pos}")
            feature = parse(record).features.feature
            raw = feature["features"]
            if len(raw) == size and raw.startswith(canonical):
                floats.append(raw[6:])
            else:
                values = parse_feature(raw).float_list.value
                if len(values) != DIM:
                    raise ValueError(f"{path}: record at byte {pos} has {len(values)} features")
                floats.append(np.asarray(values, np.float32).tobytes())
            ids.append(parse_feature(feature["id"]).int64_list.value[0])
            pos += 16 + length
        x_parts.append(np.frombuffer(b"".join(floats), np.float32).reshape(-1, DIM))
        id_parts.append(np.array(ids, np.int64))
    return np.concatenate(id_parts), np.concatenate(x_parts)


def hand_tfrecord(directory: str, student: str, teacher: str, out: str) -> None:
    """(4): read the TFRecords, then throughput.handwritten's cascade, Parquet out."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    ids, x = read_tfrecords(sorted(glob.glob(os.path.join(directory, "*.tfrecord*"))))
    s, t = torch.jit.load(student), torch.jit.load(teacher)
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        probs = [torch.softmax(s(xb), -1) for xb in xt.split(BATCH)]
        conf, label = torch.cat(probs).max(-1)
        top2 = torch.cat(probs).topk(2, -1).values
        score = 1 - (top2[:, 0] - top2[:, 1])
        hard = score > np.quantile(score.numpy(), 1 - RATE)  # exact, over every row
        if hard.any():
            pt = torch.cat([torch.softmax(t(xh), -1) for xh in xt[hard].split(16384)])
            conf[hard], label[hard] = pt.max(-1)
    table = pa.table({"id": ids, "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
                      "label": label.numpy(), "confidence": conf.numpy(),
                      "deferral_score": score.numpy(),
                      "source": np.where(hard.numpy(), "teacher", "student")})
    pq.write_table(table, out, compression="snappy", row_group_size=BATCH)


def bare_decode(path: str, mode: str) -> None:
    """(6): the issue's baseline, one thread, decode only (no resize, no float conversion)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    n = 0
    for blob in pq.read_table(path, columns=["image"]).column("image").to_pylist():
        np.asarray(Image.open(io.BytesIO(blob)).convert(mode))
        n += 1
    print(json.dumps({"rows": n}))


# ---------------------------------------------------------------------------- timed sides

def run_titans(rows: int, data: str, out: str, models: tuple[str, str], extra: list[str]) -> float:
    seconds, _, _ = throughput.timed(TITANS + [
        "--input", data, "--output", out, "--student", models[0], "--teacher", models[1],
        "--deferral-rate", str(RATE), "--overwrite", "--runner", "DirectRunner"] + extra)
    report = json.load(open(os.path.join(out, "report.json")))
    if report["rows_in"] != rows or report["rows_dead_letter"]:
        raise SystemExit(f"titans on {data}: {report['rows_in']} rows in, "
                         f"{report['rows_dead_letter']} dead-lettered; expected {rows} and 0")
    return seconds


def run_hand(rows: int, directory: str, models: tuple[str, str], out: str) -> float:
    import pyarrow.parquet as pq

    seconds, _, _ = throughput.timed([sys.executable, __file__, "hand", directory, *models, out])
    if pq.ParquetFile(out).metadata.num_rows != rows:
        raise SystemExit(f"hand-written loop on {directory}: wrong row count in {out}")
    return seconds


def run_bare(rows: int, path: str, mode: str) -> float:
    seconds, _, stdout = throughput.timed([sys.executable, __file__, "bare", path, mode])
    if json.loads(stdout.strip().splitlines()[-2])["rows"] != rows:
        raise SystemExit(f"bare decode of {path}: wrong row count")
    return seconds


def interleave(sides: dict, repeat: int) -> dict[str, list[float]]:
    """Each side once per round, in order, `repeat` rounds: {name: seconds per run}."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeat):
        for name, (rows, fn) in sides.items():
            runs[name].append(fn())
            print(f"  round {r + 1}/{repeat} {name}: {runs[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return runs


def show(name: str, rows: int, seconds: list[float]) -> float:
    med = statistics.median(seconds)
    print(f"{name:38s} {rows:>9,} rows  median {med:7.2f} s  min {min(seconds):7.2f}  "
          f"max {max(seconds):7.2f}  ->{rows / med:>10,.0f} rows/s "
          f"({rows / max(seconds):,.0f}-{rows / min(seconds):,.0f})")
    return med


def ratio(what: str, value: float | None, target: float) -> None:
    if value is None:
        print(f"{what:62s}   n/a (the larger size was not slower)  (target >= {target})")
    else:
        print(f"{what:62s} {value:5.2f}  (target >= {target}: {'met' if value >= target else 'not met'})")


# ---------------------------------------------------------------------------- main

def tfrecord_group(args, w) -> None:
    n = args.rows
    parquet, tfr, gz = make_tabular(args.workdir, n)
    models = throughput.make_models(args.workdir)
    def cascade(data, out, fmt):
        return n, lambda: run_titans(n, data, w(out), models, ["--format", fmt])

    def hand(directory, out):
        return n, lambda: run_hand(n, directory, models, w(out))

    sides = {"(1) titans run, Parquet": cascade(parquet, "fmt-out-parquet", "parquet"),
             "(2) titans run, TFRecord": cascade(tfr, "fmt-out-tfrecord", "tfrecord"),
             "(3) titans run, TFRecord GZIP": cascade(gz, "fmt-out-tfrecord-gz", "tfrecord"),
             "(4) hand-written loop, TFRecord": hand(tfr, "fmt-out-hand.parquet"),
             "(4g) hand-written loop, TFRecord GZIP": hand(gz, "fmt-out-hand-gz.parquet")}
    runs = interleave(sides, args.repeat)
    print(f"\nTFRecord: {n:,} rows x {DIM} float32 + int64 id; Parquet 1 file, TFRecord {SHARDS} files "
          f"({sum(os.path.getsize(p) for p in glob.glob(tfr + '/*')) / 2**20:,.0f} MiB, GZIP "
          f"{sum(os.path.getsize(p) for p in glob.glob(gz + '/*')) / 2**20:,.0f} MiB); "
          f"whole processes, {args.repeat} interleaved runs each")
    med = {name: show(name, n, runs[name]) for name in sides}
    p, t, g, h, hg = (med[k] for k in sides)
    ratio("TFRecord cascade / Parquet cascade, rows/s (2)/(1)", p / t, 0.5)
    ratio("TFRecord GZIP cascade / Parquet cascade, rows/s (3)/(1)", p / g, 0.5)
    ratio("TFRecord cascade / hand-written TFRecord loop (2)/(4)", h / t, 0.9)
    ratio("TFRecord GZIP cascade / hand-written GZIP loop (3)/(4g)", hg / g, 0.9)


def images_group(args, w) -> None:
    sides, sizes = {}, dict(zip(IMAGES, args.image_rows))
    for kind, (mode, (h, wd), extra) in IMAGES.items():
        m = sizes[kind]
        paths = make_images(args.workdir, kind, m)
        models = make_image_models(args.workdir, kind)
        flags = ["--image-column", "image", "--image-mode", mode, "--image-size", f"{h},{wd}",
                 "--sample-rows", str(args.image_sample_rows)] + extra
        for rows, path in zip((m, 2 * m), paths):
            out = w(f"fmt-out-{kind}-{rows}")
            sides[f"(5) {kind} titans run, {rows:,}"] = (
                rows, lambda rows=rows, path=path, out=out, models=models, flags=flags:
                run_titans(rows, path, out, models, flags))
            sides[f"(6) {kind} bare Pillow, {rows:,}"] = (
                rows, lambda rows=rows, path=path, mode=mode: run_bare(rows, path, mode))
    runs = interleave(sides, args.repeat)
    print(f"\nImages: Parquet `image` column; decode+cascade (titans, {min(8, os.cpu_count() or 1)} "
          f"decode threads, launch sample {args.image_sample_rows:,} rows) vs a bare one-thread Pillow "
          f"decode; whole processes, {args.repeat} interleaved runs each")
    med = {name: show(name, rows, runs[name]) for name, (rows, _) in sides.items()}
    for kind in IMAGES:
        m = sizes[kind]
        c1, c2 = med[f"(5) {kind} titans run, {m:,}"], med[f"(5) {kind} titans run, {2 * m:,}"]
        b1, b2 = med[f"(6) {kind} bare Pillow, {m:,}"], med[f"(6) {kind} bare Pillow, {2 * m:,}"]
        marginal = {k: m / (t2 - t1) if t2 > t1 else None for k, t1, t2 in (("c", c1, c2), ("b", b1, b2))}
        ratio(f"{kind}: decode+cascade / bare decode, whole process at {m:,}", b1 / c1, 0.8)
        both = None not in marginal.values()
        print(f"{kind}: marginal rows/s (start-up excluded): " + ", ".join(
            f"{who} {'n/a' if marginal[k] is None else f'{marginal[k]:,.0f}'}"
            for k, who in (("c", "titans"), ("b", "bare Pillow"))))
        ratio(f"{kind}: decode+cascade / bare decode, marginal {m:,}->{2 * m:,}",
              marginal["c"] / marginal["b"] if both else None, 0.8)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "hand":
        return hand_tfrecord(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        return bare_decode(*sys.argv[2:4])

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000,
                    help="rows of the TFRecord group (Parquet, TFRecord, GZIP); default %(default)s")
    ap.add_argument("--image-rows", default="60000,6000",
                    help="M for the 28x28 PNGs and the 224x224 JPEGs (one number: both); each "
                         "side also runs at 2M rows for the marginal rate; default %(default)s")
    ap.add_argument("--image-sample-rows", type=int, default=1000,
                    help="titans' --sample-rows on images (see above); default %(default)s")
    ap.add_argument("--repeat", type=int, default=5,
                    help="interleaved runs of every side; medians count; default %(default)s")
    ap.add_argument("--workdir", default="benchmarks/out",
                    help="data, models (cached) and outputs; default %(default)s")
    ap.add_argument("--only", choices=("tfrecord", "images", "all"), default="all",
                    help="run one group only; default %(default)s")
    args = ap.parse_args()
    rows = [int(r) for r in args.image_rows.split(",")]
    args.image_rows = rows * 2 if len(rows) == 1 else rows

    os.makedirs(args.workdir, exist_ok=True)
    w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
    import PIL
    import torch
    from google.protobuf.internal import api_implementation
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}, Pillow "
          f"{PIL.__version__}, protobuf backend {api_implementation.Type()}; sizes: --rows "
          f"{args.rows:,}, --image-rows {args.image_rows[0]:,} (png28) {args.image_rows[1]:,} "
          f"(jpeg224) and twice that, --repeat {args.repeat}", flush=True)
    if args.only in ("tfrecord", "all"):
        tfrecord_group(args, w)
    if args.only in ("images", "all"):
        images_group(args, w)


if __name__ == "__main__":
    main()

"""Reading TFRecord tf.Example input: titans' reader against a hand-written loop and Parquet.

    python benchmarks/tfrecord_read.py [--rows 1000000] [--repeats 3] [--beam]

Data: --rows rows of ``id`` (int64) and ``features`` (64 float32), written once as a
TFRecord file of tf.train.Example (and, with --beam, as Parquet with 1M-row groups, as
benchmarks/throughput.py writes it), in a temp directory.

In one process, interleaved, median of --repeats:
- hand: the fastest plain loop we know: the whole file in memory, lengths walked with
  struct, both CRCs with google-crc32c, each record parsed by protobuf's C backend (upb)
  into preallocated numpy arrays, one Arrow table at the end;
- framing: titans' reader (``tfrecord_io.iter_unit``) without parsing;
- titans: ``iter_unit`` + ``example_codec.parse_with_rejects``, batches of 65,536.
With --beam, two Beam pipelines (FnApiRunner) that only read and count rows:
``ReadParquetBatches`` and ``ReadTFRecordBatches``, whole pipelines, same batch size. The
extra seconds TFRecord costs over Parquet, added to a cascade's time, bound its slowdown.
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titans.transforms.io import example_codec
from titans.transforms.io import tfrecord as tfrecord_io

DIM = 64


def make_data(directory: str, rows: int, parquet: bool) -> tuple[str, str]:
    tfr, par = os.path.join(directory, "data.tfrecord"), os.path.join(directory, "data.parquet")
    rng = np.random.default_rng(0)
    writer = None
    with open(tfr, "wb") as f:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            x = rng.normal(size=n * DIM).astype(np.float32)
            table = pa.table({"id": pa.array(np.arange(start, start + n)),
                              "features": pa.FixedSizeListArray.from_arrays(pa.array(x), DIM)})
            f.write(tfrecord_io.frame_records(example_codec.encode_examples_array(table)))
            if parquet:
                writer = writer or pq.ParquetWriter(par, table.schema)
                writer.write_table(table, row_group_size=1_000_000)
    if writer:
        writer.close()
    return tfr, par


SCHEMA = pa.schema([pa.field("features", pa.list_(pa.float32(), DIM), nullable=False),
                    pa.field("id", pa.int64(), nullable=False)])


def hand(path: str, rows: int) -> int:
    data = open(path, "rb").read()
    out = np.empty((rows, DIM), np.float32)
    ids = np.empty(rows, np.int64)
    header = struct.Struct("<QI").unpack_from
    crc_at = struct.Struct("<I").unpack_from
    crc, parse = google_crc32c.value, example_codec.Example.FromString

    def mask(c):
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    pos, i, end = 0, 0, len(data)
    while pos < end:
        length, length_crc = header(data, pos)
        if mask(crc(data[pos:pos + 8])) != length_crc:
            raise ValueError("bad length CRC")
        record = data[pos + 12:pos + 12 + length]
        if mask(crc(record)) != crc_at(data, pos + 12 + length)[0]:
            raise ValueError("bad data CRC")
        feature = parse(record).features.feature
        out[i] = feature["features"].float_list.value
        ids[i] = feature["id"].int64_list.value[0]
        i += 1
        pos += 16 + length
    pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), DIM),
              "id": ids})
    return i


def framing(path: str, rows: int) -> int:
    return sum(len(b.records) for b in tfrecord_io.iter_unit(tfrecord_io.Unit(path, 0, None, False), 65536))


def titans(path: str, rows: int) -> int:
    n = 0
    for batch in tfrecord_io.iter_unit(tfrecord_io.Unit(path, 0, None, False), 65536):
        table, bad, _ = example_codec.parse_with_rejects(batch.records, SCHEMA)
        n += table.num_rows
    return n


def beam_count(read) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"])) as p:
        _ = ((p | read).tables | beam.Map(lambda t: t.num_rows) | beam.CombineGlobally(sum))
    return time.perf_counter() - t0


def _read_parquet(path: str):
    from titans.transforms.io import parquet as parquet_io

    if hasattr(parquet_io, "ParquetInput"):  # launch-time file list and schema
        return parquet_io.ReadParquetBatches(parquet_io.ParquetInput.from_files([path]), 65536)
    return parquet_io.ReadParquetBatches(path, 65536, pq.read_schema(path))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tfr, par = make_data(tmp, args.rows, args.beam)
        runs: dict[str, list[float]] = {"hand": [], "framing": [], "titans": []}
        if args.beam:
            runs.update({"beam_parquet": [], "beam_tfrecord": []})
        for _ in range(args.repeats):
            for name in runs:
                if name == "beam_parquet":
                    runs[name].append(beam_count(_read_parquet(par)))
                elif name == "beam_tfrecord":
                    runs[name].append(beam_count(tfrecord_io.ReadTFRecordBatches(tfr, 65536, SCHEMA)))
                else:
                    t0 = time.perf_counter()
                    assert globals()[name](tfr, args.rows) == args.rows
                    runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for name, t in med.items():
        print(f"{name:14s} {t:6.2f} s  {args.rows / t:>11,.0f} rows/s  {t / args.rows * 1e6:5.2f} us/row"
              f"  runs {[round(x, 2) for x in runs[name]]}")
    print(f"titans / hand = {med['hand'] / med['titans']:.2f}x the hand loop's rows/s")
    if args.beam:
        extra = med["beam_tfrecord"] - med["beam_parquet"]
        print(f"TFRecord read costs {extra:+.2f} s over Parquet for {args.rows:,} rows "
              f"({extra / args.rows * 1e6:+.2f} us/row)")


if __name__ == "__main__":
    main()

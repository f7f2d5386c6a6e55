"""Read and write TFRecord files of tf.train.Example as bounded Arrow tables, on any Beam
filesystem (local, gs://, ...), uncompressed or GZIP.

How the work spreads over workers. Files are matched (or taken from a launch-time list,
which the job graph carries compressed: ``read_groups.FileList``), cut into units, and the units are reshuffled so that workers share them, as Parquet's
(file, row group) units are. An uncompressed file larger than ``split_bytes`` (64 MiB by
default) becomes one unit per byte range; the reader of a range resynchronises on the first
record boundary in it (``tfrecord_framing``), so every byte is read by exactly one range and
one huge file spreads over as many workers as it has ranges. A GZIP file cannot be entered
in the middle: it is one unit, read from its start by one worker. Many small files are many
units. For inputs that are a few large GZIP files, ``spread_records=True`` reshuffles the
records themselves (in batches, as Arrow tables) before they are parsed, so parsing and
everything after it still spreads; it costs a shuffle of the raw records (on local
runners, holding them all in memory), so it is off by default (``needs_record_spread``
says when to turn it on). The tables of one bundle are merged into full batches
(``read_groups.Rebatch``), so many small files do not reach the models as many small tables.

Every byte is accounted for. Framing and its damage (CRCs that fail, lengths that lie or
are over ``max_record_bytes``, truncated files and GZIP streams) are
``tfrecord_framing``'s: damaged spans go to the dead letter with the path and the byte
range, and reading goes on after them. Records that do not parse as tf.train.Example, or
do not fit the schema, go to the dead letter with their reason (see ``example_codec``),
with ``path`` and ``offset``.
"""
from __future__ import annotations

import logging
import math
import random

import apache_beam as beam
import google_crc32c
import numpy as np
import pyarrow as pa
from apache_beam.io import fileio, filesystem

from titans.transforms import arrow_coder  # noqa: F401  registers the pa.Table coder
from titans.transforms.dead_letter import READ, DeadLetter
from titans.transforms.io import storage
from titans.transforms.io.example_codec import encode_examples_array, kind_of, parse_with_rejects
from titans.transforms.overlap import BackgroundWriter
from titans.transforms.io.parquet import input_pattern
from titans.transforms.io.read_groups import FileList, Rebatch
from titans.transforms.io.tfrecord_framing import (
    MAX_RECORD_BYTES, RecordBatch, Unit, crc32c_rows, iter_unit, mask, masked_crc32c)
from titans.transforms.io.writes import Destination, WriteTables

_LOG = logging.getLogger("titans")
if getattr(google_crc32c, "implementation", "c") != "c":
    _LOG.warning("google-crc32c has no C extension on this machine: TFRecord CRCs will be "
                 "checked in pure Python, ~100x slower; reinstall google-crc32c from a wheel")

AUTO, GZIP, UNCOMPRESSED = "auto", "gzip", "uncompressed"
SPLIT_BYTES = 64 << 20
_SAMPLE_CHUNK = 1 << 20  # bytes read at a time when sampling records at launch


# ---------------------------------------------------------------------------- framing

def write_table(table: pa.Table, path: str) -> None:
    """``table`` as one TFRecord file of tf.train.Example (every column a feature), outside a
    pipeline (the demo's data, tests); arguments in pyarrow.parquet.write_table's order."""
    from titans.transforms.io.storage import write_bytes

    write_bytes(path, bytes(frame_records(encode_examples_array(table))))


def frame_records(payloads: pa.Array) -> memoryview:
    """Serialized records (a binary array) -> the bytes of a TFRecord file holding them."""
    payloads = payloads.cast(pa.large_binary()) if payloads.type != pa.large_binary() else payloads
    n = len(payloads)
    if not n:
        return memoryview(b"")
    offsets = np.frombuffer(payloads.buffers()[1], np.int64, n + 1, payloads.offset * 8)
    lengths = np.diff(offsets).astype("<u8")
    length_bytes = lengths.view(np.uint8).reshape(n, 8)
    header = np.empty((n, 12), np.uint8)
    header[:, :8] = length_bytes
    header[:, 8:] = mask(crc32c_rows(length_bytes)).astype("<u4").view(np.uint8).reshape(n, 4)
    data = payloads.buffers()[2].to_pybytes() if payloads.buffers()[2] is not None else b""
    bounds = offsets.tolist()
    value = google_crc32c.value
    crcs = np.array([value(data[s:e]) for s, e in zip(bounds[:-1], bounds[1:])], np.uint64)
    trailer = mask(crcs).astype("<u4").view(np.uint8)
    framed = pa.compute.binary_join_element_wise(
        _fixed_width(header.reshape(-1), 12, n), payloads, _fixed_width(trailer, 4, n),
        pa.scalar(b"", pa.large_binary()))
    out_offsets = np.frombuffer(framed.buffers()[1], np.int64, n + 1, framed.offset * 8)
    return memoryview(framed.buffers()[2])[out_offsets[0]:out_offsets[-1]]


def _fixed_width(flat: np.ndarray, width: int, n: int) -> pa.Array:
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [
        None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(flat))])


# ---------------------------------------------------------------------------- files

def tfrecord_pattern(path: str) -> str:
    """A directory (local or URL) means every ``*.tfr*`` file directly inside it:
    ``.tfrecord``, ``.tfrecords``, ``.tfr``, each also gzipped (``.gz``)."""
    return input_pattern(path, "*.tfr*")


def is_gzip(path: str, compression: str = AUTO) -> bool:
    """Whether to read ``path`` as GZIP: by ``compression``, else by name, else by content
    (the GZIP magic, unless the first bytes are a valid TFRecord length)."""
    compression = _compression(compression)
    if compression != AUTO:
        return compression == GZIP
    if path.endswith(".gz") or path.endswith(".gzip"):
        return True
    fs = storage.filesystems()
    with fs.open(path, compression_type=filesystem.CompressionTypes.UNCOMPRESSED) as f:
        head = f.read(12)
    if head[:2] != b"\x1f\x8b":
        return False
    return len(head) < 12 or masked_crc32c(head[:8]) != int.from_bytes(head[8:12], "little")


def _compression(value) -> str:
    v = str(value).lower()
    if v in (AUTO, GZIP, UNCOMPRESSED):
        return v
    raise ValueError(f"compression must be 'auto', 'gzip' or 'uncompressed', not {value!r}")


def needs_record_spread(files_and_sizes: list[tuple[str, int]], split_bytes: int = SPLIT_BYTES,
                        compression: str = AUTO) -> bool:
    """True when a GZIP file is larger than a split unit: one worker would read it all, so
    reshuffling its records (``spread_records=True``) is worth its shuffle."""
    return any(size > split_bytes and is_gzip(path, compression) for path, size in files_and_sizes)


def split_file(path: str, size: int, split_bytes: int = SPLIT_BYTES,
               compression: str = AUTO) -> list[Unit]:
    if is_gzip(path, compression):
        return [Unit(path, 0, None, True)]
    if not split_bytes or size <= split_bytes:
        return [Unit(path, 0, None, False)]
    pieces = math.ceil(size / split_bytes)
    bounds = [round(i * size / pieces) for i in range(pieces + 1)]
    return [Unit(path, s, e if e < size else None, False) for s, e in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------- reading

def sample_records(files: list[str], n: int, seed: int = 0, compression: str = AUTO,
                   max_record_bytes: int | None = MAX_RECORD_BYTES) -> list[bytes]:
    """About ``n`` records for launch-time schema inference: the first records of up to 8
    randomly chosen files (seeded), so it stays cheap on huge datasets. Damaged records (and
    records over ``max_record_bytes``) are left out."""
    rng = random.Random(seed)
    chosen = rng.sample(list(files), min(len(files), 8))
    per_file = max(1, -(-n // max(1, len(chosen))))
    out: list[bytes] = []
    for path in chosen:
        unit = Unit(path, 0, None, is_gzip(path, compression))
        framer = iter_unit(unit, per_file, _SAMPLE_CHUNK, max_record_bytes)
        try:
            for item in framer:
                if isinstance(item, RecordBatch):
                    out.extend(item.records)
                    break
        finally:
            framer.close()
    return out[:n]


class _SplitIntoUnits(beam.DoFn):
    """A file -> its read units; with ``file_keys`` (paths -> {path: content key}), first its
    content key on the ``keys`` output, taken before any of it is read."""
    KEYS = "keys"

    def __init__(self, split_bytes: int, compression: str, file_keys=None):
        self._split_bytes = split_bytes
        self._compression = compression
        self._file_keys = file_keys

    def process(self, file):
        if isinstance(file, str):  # a path from a launch-time list: ask for its size
            if self._file_keys is not None:
                for key in self._file_keys([file]).items():
                    yield beam.pvalue.TaggedOutput(self.KEYS, key)
            file = storage.filesystems().get_filesystem(file).metadata(file)  # that name only
        if file.size_in_bytes > 0:
            yield from split_file(file.path, file.size_in_bytes, self._split_bytes,
                                  self._compression)


class _ReadUnit(beam.DoFn):
    """One unit -> tables of at most ``batch_size`` rows (or raw record tables, to spread).

    Damage and records that do not fit ``schema`` go to ``dead_letter``."""
    DEAD_LETTER = "dead_letter"

    def __init__(self, batch_size: int, schema: pa.Schema | None, max_record_bytes: int,
                 skip: dict | None = None):
        self._batch_size = batch_size
        self._schema = schema
        self._max_record_bytes = max_record_bytes
        self._skip = dict(skip or {})

    def process(self, unit: Unit):
        skip = self._skip.get(unit.path)
        for item in iter_unit(unit, self._batch_size, max_record_bytes=self._max_record_bytes):
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, item)
                continue
            if skip:
                item = without_records(item, skip)
                if not item.records:
                    continue
            if self._schema is None:
                yield records_table(item)
            else:
                yield from _parsed(item.records, item.offsets,
                                   pa.array([item.path] * len(item.records)), self._schema)


def without_records(batch: RecordBatch, ranges) -> RecordBatch:
    """``batch`` without the records whose byte offset is in one of ``ranges`` (sorted
    ((first, end), ...) of offsets: `titans label` leaves out the records it sampled)."""
    offsets = np.asarray(batch.offsets, np.int64)
    starts = np.fromiter((a for a, _ in ranges), np.int64, len(ranges))
    ends = np.fromiter((b for _, b in ranges), np.int64, len(ranges))
    i = np.searchsorted(starts, offsets, side="right") - 1
    inside = (i >= 0) & (offsets < ends[np.maximum(i, 0)])
    if not inside.any():
        return batch
    keep = np.flatnonzero(~inside)
    return RecordBatch([batch.records[k] for k in keep], offsets[keep], batch.path)


def records_table(batch: RecordBatch) -> pa.Table:
    n = len(batch.records)
    return pa.table({"record": pa.array(batch.records, pa.binary()),
                     "path": pa.array([batch.path] * n, pa.string()),
                     "offset": pa.array(batch.offsets, pa.int64())})


def _parsed(records, offsets, paths, schema):
    table, bad, reasons = parse_with_rejects(records, schema)
    if table.num_rows:
        yield table
    if bad.size:
        rows = pa.table({"record": pa.array([records[i] for i in bad], pa.binary()),
                         "path": paths.take(pa.array(bad)),
                         "offset": pa.array(np.asarray(offsets)[bad], pa.int64())})
        yield beam.pvalue.TaggedOutput(_ReadUnit.DEAD_LETTER, DeadLetter(rows, reasons, READ))


class _ParseRecords(beam.DoFn):
    """Raw record tables (record, path, offset) -> parsed tables; misfits to dead_letter."""

    def __init__(self, schema: pa.Schema):
        self._schema = schema

    def process(self, raw: pa.Table):
        records = raw.column("record").to_pylist()
        yield from _parsed(records, raw.column("offset").to_numpy(),
                           raw.column("path").combine_chunks(), self._schema)


class ReadResult(tuple):
    """``tables``, ``dead_letter`` and ``keys``, as ReadParquetBatches' outputs are named."""

    def __new__(cls, tables, dead_letter, keys):
        return super().__new__(cls, (tables, dead_letter, keys))

    tables = property(lambda self: self[0])
    dead_letter = property(lambda self: self[1])
    keys = property(lambda self: self[2])


class ReadTFRecordBatches(beam.PTransform):
    """TFRecord files matching ``pattern`` (a glob, a file, or a directory: its ``*.tfr*``
    files; or a list of paths, as listed at launch) -> PCollection of pa.Table, each of at most
    ``batch_size`` rows conforming to ``schema``.

    Outputs ``tables`` and ``dead_letter`` (DeadLetter, stage "read": damaged files, records
    that do not parse or do not fit the schema, with ``record``, ``path``, ``offset``).
    ``compression``: "auto" (by name, then by content), "gzip" or "uncompressed".
    ``max_record_bytes``: a record whose header declares more is dead-lettered unread, with
    the bytes up to the next valid record (None: tfrecord_framing.MAX_RECORD_BYTES).
    """

    def __init__(self, pattern, batch_size: int, schema: pa.Schema, compression: str = AUTO,
                 split_bytes: int = SPLIT_BYTES, spread_records: bool = False,
                 max_record_bytes: int | None = MAX_RECORD_BYTES, skip: dict | None = None,
                 file_keys=None):
        super().__init__()
        self._file_keys = file_keys  # paths -> {path: content key}, for the manifest
        self._skip = dict(skip or {})  # {path: ((first, end), ...)} of records' byte offsets
        for field in schema:
            kind_of(field.type)
        # a pattern is matched when the pipeline runs; a list of paths is taken as listed
        self._pattern = tfrecord_pattern(pattern) if isinstance(pattern, str) else list(pattern)
        self._batch_size = batch_size
        self._schema = schema
        self._compression = _compression(compression)
        self._split_bytes = split_bytes
        self._spread = spread_records
        cap = MAX_RECORD_BYTES if max_record_bytes is None else int(max_record_bytes)
        if cap < 1:
            raise ValueError(f"max_record_bytes must be positive, got {max_record_bytes}")
        self._max_record_bytes = cap

    def expand(self, pbegin):
        if isinstance(self._pattern, str):
            files = pbegin | "MatchFiles" >> fileio.MatchFiles(self._pattern)
        else:  # the launch's list, compact in the graph, expanded on the workers
            listed = FileList(self._pattern)
            files = (pbegin | "Shards" >> beam.Create(list(range(listed.shards)))
                     | "Files" >> beam.FlatMap(listed.shard))
        split = files | "SplitIntoUnits" >> beam.ParDo(_SplitIntoUnits(
            self._split_bytes, self._compression, self._file_keys)).with_outputs(
            _SplitIntoUnits.KEYS, main="units")
        units = split.units | "Spread" >> beam.Reshuffle()
        if not self._spread:
            read = units | "ReadUnits" >> beam.ParDo(_ReadUnit(self._batch_size, self._schema,
                                                           self._max_record_bytes, self._skip)) \
                .with_output_types(pa.Table, dead_letter=DeadLetter) \
                .with_outputs(_ReadUnit.DEAD_LETTER, main="tables")
            # small files are small units: their tables merged into full batches per bundle
            tables = read.tables | "Rebatch" >> beam.ParDo(Rebatch(self._batch_size)) \
                .with_output_types(pa.Table)
            return ReadResult(tables, read.dead_letter, split[_SplitIntoUnits.KEYS])
        raw = units | "FrameUnits" >> beam.ParDo(_ReadUnit(self._batch_size, None,
                                                               self._max_record_bytes, self._skip)) \
            .with_output_types(pa.Table, dead_letter=DeadLetter) \
            .with_outputs(_ReadUnit.DEAD_LETTER, main="records")
        parsed = (raw.records
                  | "SpreadRecords" >> beam.Reshuffle()
                  | "Parse" >> beam.ParDo(_ParseRecords(self._schema))
                  .with_output_types(pa.Table, dead_letter=DeadLetter)
                  .with_outputs(_ReadUnit.DEAD_LETTER, main="tables"))
        dead = (raw.dead_letter, parsed.dead_letter) | "DeadLetters" >> beam.Flatten()
        return ReadResult(parsed.tables, dead, split[_SplitIntoUnits.KEYS])


# ---------------------------------------------------------------------------- writing

class TFRecordFormat:
    """Tables -> one TFRecord file of tf.train.Example, a feature per column of ``schema``;
    encoding and framing run on a background thread."""
    suffix = ".tfrecord"

    def __init__(self, schema: pa.Schema):
        for field in schema:
            kind_of(field.type)  # say it at construction, not on a worker
        self.schema = schema

    def open(self, handle):
        schema = self.schema

        def write(table: pa.Table):
            table = table.select(schema.names)
            if not table.schema.equals(schema, check_metadata=False):
                table = table.cast(schema)
            handle.write(frame_records(encode_examples_array(table)))

        background = BackgroundWriter(write)

        def close():
            background.close()
            handle.close()
        return background.put, close


def WriteTFRecordBatches(directory: str, schema: pa.Schema, prefix: str = "part",
                         finalize: bool = False) -> WriteTables:
    """Tables -> ``directory/PREFIX-SSSSS-of-NNNNN.tfrecord`` (see transforms/writes.py)."""
    return WriteTables(Destination(directory, prefix, TFRecordFormat(schema)), finalize)

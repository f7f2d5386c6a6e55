"""Read and write TFRecord files of tf.train.Example as bounded Arrow tables, on any Beam
filesystem (local, gs://, ...), uncompressed or GZIP.

How the work spreads over workers. Files are matched (or taken from a launch-time list),
cut into units, and the units are reshuffled so that workers share them, as Parquet's
(file, row group) units are. An uncompressed file larger than ``split_bytes`` (64 MiB by
default) becomes one unit per byte range. The reader of a range seeks to its first byte
and resynchronises: it takes the first position where a record boundary checks out, that
is 8 bytes of length followed by their masked CRC32C, and, after that record, the end of
the file or another such length (two CRCs: a false match on random bytes has odds of
about 2^-64; candidates are found with numpy over windows that double from 4 KiB). A
range owns the records that start in it and reads past its end to finish the last one;
where the next range's first boundary would not check out (a damaged or cut record
there), this range reads on and reports the damage, so every byte is read by exactly one
range and one huge file spreads over as many workers as it has ranges. A GZIP file
cannot be entered in the middle: it is one unit, read from its start by one worker. Many
small files are many units. For inputs that are a few large GZIP files,
``spread_records=True`` reshuffles the records themselves (in batches, as Arrow tables)
before they are parsed, so parsing and everything after it still spreads; it costs a
shuffle of the raw records (on local runners, holding them all in memory), so it is off
by default (``needs_record_spread`` says when to turn it on).

Every byte is accounted for. A record whose data fails its CRC goes to the dead letter
and reading goes on with the next one (the length was intact). A length that fails its
CRC, a truncated file or a GZIP stream that breaks off is reported with the path and the
byte offset (and the record's index when the unit starts at byte 0); the records before
it are kept, and an uncompressed file is read on from the next valid record found after
the damage. Records that do not parse as tf.train.Example, or do not fit the schema, go
to the dead letter with their reason (see ``example_codec``), with ``path`` and ``offset``.

Framing is TFRecord's (8-byte length, masked CRC32C of the length, data, masked CRC32C of
the data), the format of Beam's ``apache_beam.io.tfrecordio._TFRecordUtil``; the tests
check that each side reads what the other writes. Beam's ``read_record`` is not used in
the loop: it costs ~1.6 us per record (two reads, a format string, two copies), more
than parsing the record; here lengths are walked in one pass over a large read, the
length CRCs are checked for the whole batch at once with numpy, and the data CRCs with
google-crc32c's C implementation directly (Beam would pick python-snappy first when it
is installed, whose CRC is much slower).
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import random
import struct
import zlib

import apache_beam as beam
import google_crc32c
import numpy as np
import pyarrow as pa
from apache_beam.io import fileio, filesystem
from apache_beam.io.filesystems import FileSystems

from titans.transforms import arrow_coder  # noqa: F401  registers the pa.Table coder
from titans.transforms.dead_letter import READ, DeadLetter
from titans.transforms.example_codec import encode_examples_array, kind_of, parse_with_rejects
from titans.transforms.overlap import BackgroundWriter, read_ahead
from titans.transforms.parquet_io import input_pattern
from titans.transforms.timing import FIRST_READ, stamp
from titans.transforms.writes import Destination, WriteTables

_LOG = logging.getLogger("titans")
if getattr(google_crc32c, "implementation", "c") != "c":
    _LOG.warning("google-crc32c has no C extension on this machine: TFRecord CRCs will be "
                 "checked in pure Python, ~100x slower; reinstall google-crc32c from a wheel")

AUTO, GZIP, UNCOMPRESSED = "auto", "gzip", "uncompressed"
SPLIT_BYTES = 64 << 20
_CHUNK = 4 << 20  # bytes read at a time
_KEEP = 64 << 10  # bytes of a damaged region kept in the dead letter
_MAX_RESYNC_RECORD = 1 << 30  # a longer "length" found while resynchronising is taken as noise
_HEADER = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")
_DEAD_COLUMNS = ("record", "path", "offset")


# ---------------------------------------------------------------------------- CRCs

def _crc_table() -> np.ndarray:
    table = np.zeros(256, np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table[i] = c
    return table


_CRC_TABLE = _crc_table()


def _crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """CRC32C of every row of a [n, k] uint8 array (k small): k table steps over all rows."""
    crc = np.full(rows.shape[0], 0xFFFFFFFF, np.uint64)
    for k in range(rows.shape[1]):
        crc = _CRC_TABLE[(crc ^ rows[:, k]) & 0xFF] ^ (crc >> np.uint64(8))
    return crc ^ np.uint64(0xFFFFFFFF)


def _mask(crc):
    """TFRecord's masked CRC (works on ints and on uint64 arrays)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    return _mask(google_crc32c.value(data))


def write_table(table: pa.Table, path: str) -> None:
    """``table`` as one TFRecord file of tf.train.Example (every column a feature), outside a
    pipeline (the demo's data, tests); arguments in pyarrow.parquet.write_table's order."""
    from titans.models.storage import write_bytes

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
    header[:, 8:] = _mask(_crc32c_rows(length_bytes)).astype("<u4").view(np.uint8).reshape(n, 4)
    data = payloads.buffers()[2].to_pybytes() if payloads.buffers()[2] is not None else b""
    bounds = offsets.tolist()
    value = google_crc32c.value
    crcs = np.array([value(data[s:e]) for s, e in zip(bounds[:-1], bounds[1:])], np.uint64)
    trailer = _mask(crcs).astype("<u4").view(np.uint8)
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
    with FileSystems.open(path, compression_type=filesystem.CompressionTypes.UNCOMPRESSED) as f:
        head = f.read(12)
    if head[:2] != b"\x1f\x8b":
        return False
    return len(head) < 12 or masked_crc32c(head[:8]) != _HEADER.unpack(head)[1]


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


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of a file one worker reads: records starting in [start, end) (end None: to
    the end of the file)."""
    path: str
    start: int
    end: int | None
    gzip: bool


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

@dataclasses.dataclass
class RecordBatch:
    """Records framed from one unit: payloads and the byte offset of each record."""
    records: list
    offsets: np.ndarray
    path: str


class _Source:
    """A unit's bytes, read in large chunks (on a background thread), kept as one buffer."""

    def __init__(self, unit: Unit, chunk: int):
        self.unit = unit
        self.error: str | None = None  # why the stream ended early (GZIP), if it did
        raw = FileSystems.open(unit.path, compression_type=filesystem.CompressionTypes.UNCOMPRESSED)
        self._raw = raw
        if unit.gzip:
            self._handle = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            self._handle = raw
            if unit.start:
                raw.seek(unit.start)
        self._chunks = read_ahead(self._read_chunks(chunk))
        self.data = b""
        self.base = unit.start  # file offset of data[0]
        self.eof = False

    def _read_chunks(self, chunk: int):
        if not self.unit.gzip:  # an I/O error fails the bundle, which Beam retries
            yield from iter(lambda: self._handle.read(chunk), b"")
            return
        while True:
            try:
                # read1: what was decompressed before an error is returned, not lost
                piece = self._handle.read1(chunk)
            except (EOFError, OSError, zlib.error) as e:  # a GZIP stream that breaks off
                yield e
                return
            if not piece:
                return
            yield piece

    def more(self, pos: int, need: int) -> int:
        """Drop data before ``pos``, read until ``need`` bytes follow it (or the end).
        Returns the new index of ``pos`` (0)."""
        self.data = self.data[pos:]
        self.base += pos
        pieces = [self.data]
        have = len(self.data)
        while have < need and not self.eof:
            piece = next(self._chunks, None)
            if piece is None or isinstance(piece, BaseException):
                self.eof = True
                if piece is not None:
                    self.error = f"{type(piece).__name__}: {piece}"
                break
            pieces.append(piece)
            have += len(piece)
        self.data = b"".join(pieces) if len(pieces) > 1 else pieces[0]
        return 0

    def close(self):
        self._chunks.close()
        self._handle.close()
        if self._handle is not self._raw:
            self._raw.close()


class _Framer:
    """Yields RecordBatch (at most ``batch_size`` records) and DeadLetter (damage) for a unit."""

    def __init__(self, unit: Unit, batch_size: int, chunk: int = _CHUNK):
        self.unit = unit
        self.batch_size = batch_size
        self.chunk = chunk
        self.index: int | None = 0  # records framed so far in the unit; None after damage

    def _where(self, offset: int, index: int | None = None) -> str:
        index = self.index if index is None else index
        if self.unit.start == 0 and index is not None:
            return f"record #{index} (byte {offset})"
        return f"the record at byte {offset}"

    def _dead(self, data: bytes, offset: int, reason: str) -> DeadLetter:
        rows = pa.table({"record": pa.array([bytes(data[:_KEEP])], pa.binary()),
                         "path": pa.array([self.unit.path], pa.string()),
                         "offset": pa.array([offset], pa.int64())})
        return DeadLetter(rows, reason, READ)

    def __iter__(self):
        src = _Source(self.unit, self.chunk)
        try:
            yield from self._frames(src)
        finally:
            src.close()

    def _frames(self, src: _Source):
        path, end = self.unit.path, self.unit.end
        pos = src.more(0, self.chunk)
        if self.unit.start:
            # the bytes before the first boundary belong to the record the range before reads
            pos, _ = self._resync(src, pos, pos, limit=end)
            if pos is None:
                return  # no record starts in this range (one record spans it)
            self.index = None
        records, offsets = [], []

        def flush():
            batch = RecordBatch(records[:], np.array(offsets, np.int64), path)
            records.clear()
            offsets.clear()
            return batch

        while True:
            data, base = src.data, src.base
            # walk the lengths of the records wholly in the buffer (and in the unit)
            starts, lengths, p, size = [], [], pos, len(data)
            room = self.batch_size - len(records)
            unpack = _LENGTH.unpack_from
            stop = "full"
            while len(starts) < room:
                if end is not None and base + p >= end:
                    stop = "range"
                    break
                if p + 12 > size:
                    stop = "short"
                    break
                length = unpack(data, p)[0]
                if p + 16 + length > size:
                    stop = "short"
                    break
                starts.append(p)
                lengths.append(length)
                p += 16 + length
            if starts:
                good = _first_bad_header(data, starts)
                if good < len(starts):
                    stop = "damaged"
                    pos = starts[good]
                    starts, lengths = starts[:good], lengths[:good]
            if starts:
                payloads, bad = _check_data(data, starts, lengths)
                for k in bad:
                    s = starts[k]
                    idx = None if self.index is None else self.index + k
                    yield self._dead(payloads[k], base + s,
                                     f"{path}: {self._where(base + s, idx)} fails its data CRC "
                                     f"(corrupted); skipped")
                if bad:
                    drop = set(bad)
                    payloads = [r for k, r in enumerate(payloads) if k not in drop]
                    kept = [s for k, s in enumerate(starts) if k not in drop]
                else:
                    kept = starts
                records.extend(payloads)
                offsets.extend(base + s for s in kept)
                if self.index is not None:
                    self.index += len(starts)
                if stop != "damaged":
                    pos = starts[-1] + 16 + lengths[-1]
            if len(records) >= self.batch_size:
                yield flush()
            if stop == "full":
                continue
            if stop == "range":
                # The range after this one starts at the first position from its first byte
                # where a boundary checks out (``_is_boundary``). If the record here does
                # not, that range will skip it: read it (and report its damage) here, and
                # look again after it.
                ok, pos = self._is_boundary(src, pos)
                if ok:
                    break
                end = src.base + pos + 1
                continue
            data, base = src.data, src.base
            if stop == "short" and pos + 12 <= len(data) and not _header_ok(data, pos):
                stop = "damaged"
            if stop == "damaged":
                if records:
                    yield flush()
                at = base + pos
                where = self._where(at)
                pos, region = self._resync(src, pos + 1, pos)
                self.index = None
                if pos is None:
                    yield self._dead(region, at, f"{path}: {where} has a bad length CRC; the "
                                     f"bytes from {at} to the end of the file are not TFRecord "
                                     f"framing and were skipped")
                    return
                yield self._dead(region, at, f"{path}: {where} has a bad length CRC; bytes "
                                 f"{at}-{src.base + pos} are not TFRecord framing and were "
                                 f"skipped, reading on from the next valid record")
                continue
            # the next record is not wholly in the buffer: read more
            need = 16 + unpack(data, pos)[0] if pos + 12 <= len(data) else 12
            pos = src.more(pos, max(need, self.chunk))
            if len(src.data) >= need:
                continue
            if records:
                yield flush()
            at = src.base
            if src.data:  # the file (or the GZIP stream) ends inside a record
                why = f"the GZIP stream breaks off ({src.error})" if src.error else "the file ends"
                yield self._dead(src.data, at, f"{path}: truncated: {self._where(at)} needs "
                                 f"{need} bytes but {why} after {len(src.data)}")
            elif src.error:
                yield self._dead(b"", at, f"{path}: the GZIP stream breaks off after {at} "
                                 f"decompressed bytes, before {self._where(at)} ({src.error})")
            return
        if records:
            yield flush()

    def _is_boundary(self, src: _Source, c: int) -> tuple[bool, int]:
        """Whether a record boundary checks out at ``src.data[c]``: the end of the file, or a
        length that matches its CRC followed, after its record, by the end of the file or
        by another such length. (ok, the index of the same position after reading more)."""
        if c + 12 > len(src.data) and not src.eof:
            c = src.more(c, self.chunk)
        data = src.data
        if c == len(data):
            return True, c  # the end of the file
        if c + 12 > len(data) or not _header_ok(data, c):
            return False, c
        length = _LENGTH.unpack_from(data, c)[0]
        if c + 16 + length + 12 > len(data) and not src.eof:
            c = src.more(c, max(16 + length + 12, self.chunk))
            data = src.data
        return _boundary_after(data, c + 16 + length, src.eof), c

    def _resync(self, src: _Source, pos: int, keep_from: int, limit: int | None = None):
        """The first position at or after ``pos`` where a boundary checks out (see
        ``_is_boundary``), as (its index in src.data, or None if there is none before
        ``limit`` or the end of the file; the bytes from ``keep_from`` up to it, at most
        _KEEP of them)."""
        kept: list[bytes] = []
        room = [_KEEP]

        def keep(b: bytes):
            if room[0] > 0:
                kept.append(b[:room[0]])
                room[0] -= len(kept[-1])

        while True:
            data = src.data
            reread = False
            for c in _header_candidates(data, pos):
                c = int(c)
                if limit is not None and src.base + c >= limit:
                    keep(data[keep_from:c])
                    return None, b"".join(kept)
                length = _LENGTH.unpack_from(data, c)[0]
                if length > _MAX_RESYNC_RECORD:
                    continue  # 8 bytes that matched their CRC by chance
                after = c + 16 + length
                if after + 12 > len(data) and not src.eof:
                    keep(data[keep_from:c])
                    pos = keep_from = src.more(c, max(after - c + 12, self.chunk))
                    reread = True
                    break
                if _boundary_after(data, after, src.eof):
                    keep(data[keep_from:c])
                    return c, b"".join(kept)
            if reread:
                continue
            # no boundary here: keep the last 11 bytes (a header may straddle) and read on
            scan_end = max(pos, len(data) - 11)
            if src.eof or (limit is not None and src.base + scan_end >= limit):
                keep(data[keep_from:])
                return None, b"".join(kept)
            keep(data[keep_from:scan_end])
            pos = keep_from = src.more(scan_end, self.chunk)


def _boundary_after(data: bytes, after: int, eof: bool) -> bool:
    """A record that ends at ``after`` is followed by the end of the file or a valid length."""
    if after == len(data):
        return eof
    return after + 12 <= len(data) and _header_ok(data, after)


def _header_ok(data: bytes, p: int) -> bool:
    length_bytes = data[p:p + 8]
    return masked_crc32c(length_bytes) == struct.unpack_from("<I", data, p + 8)[0]


def _first_bad_header(data: bytes, starts: list) -> int:
    """How many of the walked headers check out before the first whose length CRC fails."""
    buf = np.frombuffer(data, np.uint8)
    at = np.asarray(starts, np.int64)
    rows = buf[at[:, None] + np.arange(12)]
    expected = rows[:, 8:].copy().view("<u4").reshape(-1).astype(np.uint64)
    ok = _mask(_crc32c_rows(rows[:, :8])) == expected
    return len(starts) if ok.all() else int(np.argmin(ok))


def _check_data(data: bytes, starts: list, lengths: list) -> tuple[list, list]:
    """(payloads, indices whose data CRC fails)."""
    payloads = [data[s + 12:s + 12 + n] for s, n in zip(starts, lengths)]
    value = google_crc32c.value
    crcs = _mask(np.array([value(r) for r in payloads], np.uint64))
    buf = np.frombuffer(data, np.uint8)
    at = np.asarray(starts, np.int64) + 12 + np.asarray(lengths, np.int64)
    stored = buf[at[:, None] + np.arange(4)].copy().view("<u4").reshape(-1).astype(np.uint64)
    return payloads, np.flatnonzero(crcs != stored).tolist()


def _header_candidates(data: bytes, pos: int):
    """Positions >= pos, in order, where 8 bytes are followed by their masked CRC32C.

    Checked with numpy over windows that double from 4 KiB: the boundary sought is usually
    within a record's length, so a 4 MiB buffer is rarely scanned whole."""
    buf = np.frombuffer(data, np.uint8)
    window = 4096
    while pos + 12 <= len(buf):
        stop = min(len(buf), pos + window + 11)
        windows = np.lib.stride_tricks.sliding_window_view(buf[pos:stop], 12)
        crc = _mask(_crc32c_rows(windows[:, :8]))
        stored = (windows[:, 8].astype(np.uint64) | windows[:, 9].astype(np.uint64) << np.uint64(8)
                  | windows[:, 10].astype(np.uint64) << np.uint64(16)
                  | windows[:, 11].astype(np.uint64) << np.uint64(24))
        yield from (np.flatnonzero(crc == stored) + pos).tolist()
        pos += len(windows)
        window *= 2


def iter_unit(unit: Unit, batch_size: int, chunk: int = _CHUNK):
    """RecordBatch and DeadLetter items for one unit, in file order."""
    return iter(_Framer(unit, batch_size, chunk))


def sample_records(files: list[str], n: int, seed: int = 0, compression: str = AUTO) -> list[bytes]:
    """About ``n`` records for launch-time schema inference: the first records of up to 8
    randomly chosen files (seeded), so it stays cheap on huge datasets. Damaged records are
    left out."""
    rng = random.Random(seed)
    chosen = rng.sample(list(files), min(len(files), 8))
    per_file = max(1, -(-n // max(1, len(chosen))))
    out: list[bytes] = []
    for path in chosen:
        unit = Unit(path, 0, None, is_gzip(path, compression))
        framer = iter_unit(unit, per_file, chunk=min(_CHUNK, 1 << 20))
        try:
            for item in framer:
                if isinstance(item, RecordBatch):
                    out.extend(item.records)
                    break
        finally:
            framer.close()
    return out[:n]


class _SplitIntoUnits(beam.DoFn):
    def __init__(self, split_bytes: int, compression: str):
        self._split_bytes = split_bytes
        self._compression = compression

    def process(self, file):
        if isinstance(file, str):  # a path from a launch-time list: ask for its size
            file = FileSystems.match([file])[0].metadata_list[0]
        if file.size_in_bytes > 0:
            yield from split_file(file.path, file.size_in_bytes, self._split_bytes,
                                  self._compression)


class _ReadUnit(beam.DoFn):
    """One unit -> tables of at most ``batch_size`` rows (or raw record tables, to spread).

    Damage and records that do not fit ``schema`` go to ``dead_letter``."""
    DEAD_LETTER = "dead_letter"

    def __init__(self, batch_size: int, schema: pa.Schema | None):
        self._batch_size = batch_size
        self._schema = schema

    def process(self, unit: Unit):
        stamp(FIRST_READ)
        for item in iter_unit(unit, self._batch_size):
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, item)
            elif self._schema is None:
                yield records_table(item)
            else:
                yield from _parsed(item.records, item.offsets,
                                   pa.array([item.path] * len(item.records)), self._schema)


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
    """``tables`` and ``dead_letter``, as ReadParquetBatches' outputs are named."""

    def __new__(cls, tables, dead_letter):
        return super().__new__(cls, (tables, dead_letter))

    tables = property(lambda self: self[0])
    dead_letter = property(lambda self: self[1])


class ReadTFRecordBatches(beam.PTransform):
    """TFRecord files matching ``pattern`` (a glob, a file, or a directory: its ``*.tfr*``
    files; or a list of paths, as listed at launch) -> PCollection of pa.Table, each of at most
    ``batch_size`` rows conforming to ``schema``.

    Outputs ``tables`` and ``dead_letter`` (DeadLetter, stage "read": damaged files, records
    that do not parse or do not fit the schema, with ``record``, ``path``, ``offset``).
    ``compression``: "auto" (by name, then by content), "gzip" or "uncompressed".
    """

    def __init__(self, pattern, batch_size: int, schema: pa.Schema, compression: str = AUTO,
                 split_bytes: int = SPLIT_BYTES, spread_records: bool = False):
        super().__init__()
        for field in schema:
            kind_of(field.type)
        # a pattern is matched when the pipeline runs; a list of paths is taken as listed
        self._pattern = tfrecord_pattern(pattern) if isinstance(pattern, str) else list(pattern)
        self._batch_size = batch_size
        self._schema = schema
        self._compression = _compression(compression)
        self._split_bytes = split_bytes
        self._spread = spread_records

    def expand(self, pbegin):
        files = (pbegin | "MatchFiles" >> fileio.MatchFiles(self._pattern)
                 if isinstance(self._pattern, str) else pbegin | "Files" >> beam.Create(self._pattern))
        units = (
            files
            | "SplitIntoUnits" >> beam.ParDo(_SplitIntoUnits(self._split_bytes, self._compression))
            | "Spread" >> beam.Reshuffle())
        if not self._spread:
            read = units | "ReadUnits" >> beam.ParDo(_ReadUnit(self._batch_size, self._schema)) \
                .with_output_types(pa.Table, dead_letter=DeadLetter) \
                .with_outputs(_ReadUnit.DEAD_LETTER, main="tables")
            return ReadResult(read.tables, read.dead_letter)
        raw = units | "FrameUnits" >> beam.ParDo(_ReadUnit(self._batch_size, None)) \
            .with_output_types(pa.Table, dead_letter=DeadLetter) \
            .with_outputs(_ReadUnit.DEAD_LETTER, main="records")
        parsed = (raw.records
                  | "SpreadRecords" >> beam.Reshuffle()
                  | "Parse" >> beam.ParDo(_ParseRecords(self._schema))
                  .with_output_types(pa.Table, dead_letter=DeadLetter)
                  .with_outputs(_ReadUnit.DEAD_LETTER, main="tables"))
        dead = (raw.dead_letter, parsed.dead_letter) | "DeadLetters" >> beam.Flatten()
        return ReadResult(parsed.tables, dead)


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

"""TFRecord framing: a unit of a file (see ``tfrecord_io``) -> batches of records and dead
letters for its damage, resynchronising after damage and at the start of a byte range.

Framing is TFRecord's (8-byte length, masked CRC32C of the length, data, masked CRC32C of
the data), the format of Beam's ``apache_beam.io.tfrecordio._TFRecordUtil``, whose
``read_record`` is not used: it costs ~1.6 us per record (two reads, a format string, two
copies), more than parsing the record. Here lengths are walked in one pass over a large
read, the length CRCs are checked for the whole batch at once with numpy, and the data CRCs
with google-crc32c's C implementation directly (Beam would pick python-snappy first when it
is installed, whose CRC is much slower).

Resynchronising. The reader of a byte range seeks to its first byte and takes the first
position where a record boundary checks out: 8 bytes of length (within the record-size
cap) followed by their masked CRC32C, and, after that record, the end of the file or
another such length (two CRCs: a false match on random bytes has odds of about 2^-64;
candidates are found with numpy over windows that double from 4 KiB). A range owns the
records that start in it and reads past its end to finish the last one; where the next
range's first boundary would not check out (a damaged or cut record there), this range
reads on and reports the damage, so every byte is read by exactly one range.

Damage. A record whose data fails its CRC is dead-lettered and reading goes on with the
next one (the length was intact). A length that fails its CRC, that is over the record-size
cap (``max_record_bytes``, 64 MiB by default; checked from the header, before the record is
read) or that runs past the end of the file: the bytes from there to the next position
where a boundary checks out are dead-lettered (the first 64 KiB, and the byte range) and
reading goes on from there, streaming (GZIP too: skipped bytes are never buffered). A file
or GZIP stream that ends inside a record is reported as truncated, with the path and the
byte offset (and the record's index when the unit starts at byte 0).
"""
from __future__ import annotations

import dataclasses
import enum
import gzip
import struct
import zlib

import google_crc32c
import numpy as np
import pyarrow as pa
from apache_beam.io import filesystem

from titans.transforms.dead_letter import READ, DeadLetter
from titans.transforms.io import storage
from titans.transforms.overlap import read_ahead

# the largest record read (pipeline/defaults.py holds the command line's copy of it)
MAX_RECORD_BYTES = 64 << 20
CHUNK = 4 << 20  # bytes read at a time
_KEEP = 64 << 10  # bytes of a damaged region kept in the dead letter
_HEADER = struct.Struct("<QI")
_LENGTH = struct.Struct("<Q")


# ---------------------------------------------------------------------------- CRCs

def _crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        c = (c >> np.uint64(1)) ^ np.where(c & np.uint64(1), np.uint64(0x82F63B78), np.uint64(0))
    return c


_CRC_TABLE = _crc_table()


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """CRC32C of every row of a [n, k] uint8 array (k small): k table steps over all rows."""
    crc = np.full(rows.shape[0], 0xFFFFFFFF, np.uint64)
    for k in range(rows.shape[1]):
        crc = _CRC_TABLE[(crc ^ rows[:, k]) & 0xFF] ^ (crc >> np.uint64(8))
    return crc ^ np.uint64(0xFFFFFFFF)


def mask(crc):
    """TFRecord's masked CRC (works on ints and on uint64 arrays)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    return mask(google_crc32c.value(data))


# ---------------------------------------------------------------------------- units

@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of a file one worker reads: records starting in [start, end) (end None: to
    the end of the file)."""
    path: str
    start: int
    end: int | None
    gzip: bool


@dataclasses.dataclass
class RecordBatch:
    """Records framed from one unit: payloads and the byte offset of each record."""
    records: list
    offsets: np.ndarray
    path: str


def _size_text(n: int) -> str:  # 64 MiB, 4096 bytes
    whole = [f"{n >> s} {unit}" for unit, s in (("GiB", 30), ("MiB", 20)) if n % (1 << s) == 0]
    return whole[0] if whole else f"{n} bytes"


class _Source:
    """A unit's bytes, read in large chunks (on a background thread), kept as one buffer."""

    def __init__(self, unit: Unit, chunk: int):
        self.unit = unit
        self.error: str | None = None  # why the stream ended early (GZIP), if it did
        raw = self._raw = storage.filesystems().open(
            unit.path, compression_type=filesystem.CompressionTypes.UNCOMPRESSED)
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


# ---------------------------------------------------------------------------- the framer

class _State(enum.Enum):
    """Where a walk over the buffered records stopped, and what reading on found."""
    FULL = "the batch is full"  # walking stopped:
    RANGE = "the next record starts at or after the unit's end"
    SHORT = "the next record is not wholly in the buffer"
    BAD_CRC = "the next length fails its CRC"
    OVERSIZE = "the next length is over the record-size cap"
    PAST_END = "the next length runs past the end of the file"
    MORE = "more bytes were read: walk on"  # reading on (SHORT) found:
    TRUNCATED = "the file ends inside a record"
    END = "the file ends after a record"

_DAMAGE = (_State.BAD_CRC, _State.OVERSIZE, _State.PAST_END)


class _Framer:
    """Yields RecordBatch (at most ``batch_size`` records) and DeadLetter (damage) for a unit."""

    def __init__(self, unit: Unit, batch_size: int, chunk: int = CHUNK,
                 max_record_bytes: int | None = MAX_RECORD_BYTES):
        self.unit = unit
        self.batch_size = batch_size
        self.chunk = chunk
        self.cap = MAX_RECORD_BYTES if max_record_bytes is None else int(max_record_bytes)
        self.index: int | None = 0  # records framed so far in the unit; None after damage
        self._records, self._offsets = [], []  # the batch being filled

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

    def _flush(self):  # the batch so far, if any
        if self._records:
            yield RecordBatch(self._records, np.array(self._offsets, np.int64), self.unit.path)
            self._records, self._offsets = [], []

    def __iter__(self):
        src = _Source(self.unit, self.chunk)
        try:
            yield from self._frames(src)
        finally:
            src.close()

    def _frames(self, src: _Source):
        end = self.unit.end
        pos = src.more(0, self.chunk)
        if self.unit.start:
            # the bytes before the first boundary belong to the record the range before reads
            pos, _ = self._resync(src, pos, pos, limit=end)
            if pos is None:
                return  # no record starts in this range (one record spans it)
            self.index = None
        while True:
            state, pos = yield from self._walk(src, pos, end)
            if state is _State.RANGE:
                # The range after this one starts at the first position from its first byte
                # where a boundary checks out (``_is_boundary``). If the record here does
                # not, that range will skip it: read it (and report its damage) here, and
                # look again after it.
                ok, pos = self._is_boundary(src, pos)
                if ok:
                    break
                end = src.base + pos + 1
                continue
            if state is _State.SHORT:
                state, pos = self._read_on(src, pos)
            if state in (_State.FULL, _State.MORE):
                continue
            yield from self._flush()
            if state in _DAMAGE:
                pos = yield from self._skip(src, pos, state)
                if pos is not None:
                    continue
            elif state is _State.TRUNCATED:
                yield self._truncated(src)
            return
        yield from self._flush()

    def _walk(self, src: _Source, pos: int, end: int | None):
        """Frame the records wholly in the buffer (and starting in the unit), up to a full
        batch; yields the dead letters of records whose data fails its CRC. Returns (why it
        stopped, the position it stopped at)."""
        data, base, path = src.data, src.base, self.unit.path
        # walk the lengths of the records wholly in the buffer (and in the unit)
        starts, lengths, p, size = [], [], pos, len(data)
        room = self.batch_size - len(self._records)
        unpack = _LENGTH.unpack_from
        state = _State.FULL
        while len(starts) < room:
            if end is not None and base + p >= end:
                state = _State.RANGE
                break
            if p + 12 > size:
                state = _State.SHORT
                break
            length = unpack(data, p)[0]
            if p + 16 + length > size:
                state = _State.SHORT
                break
            starts.append(p)
            lengths.append(length)
            p += 16 + length
        if starts:  # the headers walked over, checked at once: CRC and cap
            good = _first_bad_header(data, starts, self.cap)
            if good < len(starts):
                state, p = _State.BAD_CRC, starts[good]
                starts, lengths = starts[:good], lengths[:good]
        if state in (_State.SHORT, _State.BAD_CRC) and p + 12 <= size:
            state = _header_state(data, p, self.cap, state)
        if starts:
            payloads, bad = _check_data(data, starts, lengths)
            for k in bad:
                s = starts[k]
                idx = None if self.index is None else self.index + k
                yield self._dead(payloads[k], base + s, f"{path}: {self._where(base + s, idx)} "
                                 f"fails its data CRC (corrupted); skipped")
            if bad:
                drop = set(bad)
                payloads = [r for k, r in enumerate(payloads) if k not in drop]
                kept = [s for k, s in enumerate(starts) if k not in drop]
            else:
                kept = starts
            self._records.extend(payloads)
            self._offsets.extend(base + s for s in kept)
            if self.index is not None:
                self.index += len(starts)
        if len(self._records) >= self.batch_size:
            yield from self._flush()
        return state, p

    def _read_on(self, src: _Source, pos: int):
        """The record at ``pos`` (its header checked, if whole) is not wholly in the buffer:
        read until it is (at most the cap), or the end. Returns (state, new pos)."""
        whole = pos + 12 <= len(src.data)
        need = 16 + _LENGTH.unpack_from(src.data, pos)[0] if whole else 12
        pos = src.more(pos, max(need, self.chunk))
        if len(src.data) >= need:
            return _State.MORE, pos
        if whole:  # a valid length the rest of the file cannot hold: damage, or a cut file
            return _State.PAST_END, pos
        return (_State.TRUNCATED if src.data or src.error else _State.END), pos

    def _truncated(self, src: _Source, pos: int = 0) -> DeadLetter:
        data, at, path = src.data[pos:], src.base + pos, self.unit.path
        if not data:
            return self._dead(b"", at, f"{path}: the GZIP stream breaks off after {at} "
                              f"decompressed bytes, before {self._where(at)} ({src.error})")
        need = 16 + _LENGTH.unpack_from(data, 0)[0] if len(data) >= 12 else 12
        why = f"the GZIP stream breaks off ({src.error})" if src.error else "the file ends"
        return self._dead(data, at, f"{path}: truncated: {self._where(at)} needs {need} bytes "
                          f"but {why} after {len(data)}")

    def _skip(self, src: _Source, pos: int, state: _State):
        """Dead-letter the damage at ``pos`` up to the next valid boundary; returns where
        reading goes on (None: nowhere, the rest of the unit was damage)."""
        path, at = self.unit.path, src.base + pos
        where = self._where(at)
        length = _LENGTH.unpack_from(src.data, pos)[0]
        stream = " of the decompressed stream" if self.unit.gzip else ""
        what = {_State.BAD_CRC: "has a bad length CRC",
                _State.OVERSIZE: f"declares a length of {length} bytes, over the record-size "
                                 f"cap of {_size_text(self.cap)} (--max-record-bytes)",
                _State.PAST_END: f"declares a length of {length} bytes, past the end of the "
                                 f"{'decompressed stream' if self.unit.gzip else 'file'}"}[state]
        start = pos  # PAST_END: the whole rest is read, src.data stays as it is
        pos, region = self._resync(src, pos + 1, pos)
        if pos is None and state is _State.PAST_END:
            yield self._truncated(src, start)  # a file cut inside a record, not a lie
            return None
        self.index = None
        if pos is None:
            stop = src.base + len(src.data)
            yield self._dead(region, at, f"{path}: {where} {what}; bytes {at}-{stop}{stream} "
                             f"(to the end) are not TFRecord framing and were skipped")
            return None
        yield self._dead(region, at, f"{path}: {where} {what}; bytes {at}-{src.base + pos}"
                         f"{stream} are not TFRecord framing and were skipped, reading on from "
                         f"the next valid record")
        return pos

    def _is_boundary(self, src: _Source, c: int) -> tuple[bool, int]:
        """Whether a record boundary checks out at ``src.data[c]``: the end of the file, or a
        length within the cap that matches its CRC followed, after its record, by the end of
        the file or by another such length. (ok, the index of the same position after
        reading more)."""
        if c + 12 > len(src.data) and not src.eof:
            c = src.more(c, self.chunk)
        data = src.data
        if c == len(data):
            return True, c  # the end of the file
        if c + 12 > len(data) or not _header_ok(data, c):
            return False, c
        length = _LENGTH.unpack_from(data, c)[0]
        if length > self.cap:
            return False, c
        if c + 16 + length + 12 > len(data) and not src.eof:
            c = src.more(c, max(16 + length + 12, self.chunk))
            data = src.data
        return _boundary_after(data, c + 16 + length, src.eof), c

    def _resync(self, src: _Source, pos: int, keep_from: int, limit: int | None = None):
        """The first position at or after ``pos`` where a boundary checks out (see
        ``_is_boundary``), as (its index in src.data, or None if there is none before
        ``limit`` or the end of the file; the bytes from ``keep_from`` up to it, at most
        _KEEP of them). Streams: holds at most a chunk, or one record within the cap."""
        kept: list[bytes] = []
        room = [_KEEP]

        def keep(b: bytes):
            if room[0] > 0:
                kept.append(b[:room[0]])
                room[0] -= len(kept[-1])

        while True:
            data = src.data
            reread = False
            for c in _header_candidates(data, pos, self.cap):
                if limit is not None and src.base + c >= limit:
                    keep(data[keep_from:c])
                    return None, b"".join(kept)
                length = _LENGTH.unpack_from(data, c)[0]
                if length > self.cap:
                    continue
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


def _header_state(data: bytes, p: int, cap: int, otherwise: _State) -> _State:
    """The state of the whole header at ``p``: a bad CRC, over the cap, else ``otherwise``."""
    if not _header_ok(data, p):
        return _State.BAD_CRC
    return _State.OVERSIZE if _LENGTH.unpack_from(data, p)[0] > cap else otherwise


def _first_bad_header(data: bytes, starts: list, cap: int) -> int:
    """How many of the walked headers check out (CRC, length within ``cap``) before the
    first that does not."""
    buf = np.frombuffer(data, np.uint8)
    at = np.asarray(starts, np.int64)
    rows = buf[at[:, None] + np.arange(12)]
    expected = rows[:, 8:].copy().view("<u4").reshape(-1).astype(np.uint64)
    ok = mask(crc32c_rows(rows[:, :8])) == expected
    ok &= rows[:, :8].copy().view("<u8").reshape(-1) <= np.uint64(cap)
    return len(starts) if ok.all() else int(np.argmin(ok))


def _check_data(data: bytes, starts: list, lengths: list) -> tuple[list, list]:
    """(payloads, indices whose data CRC fails)."""
    payloads = [data[s + 12:s + 12 + n] for s, n in zip(starts, lengths)]
    value = google_crc32c.value
    crcs = mask(np.array([value(r) for r in payloads], np.uint64))
    buf = np.frombuffer(data, np.uint8)
    at = np.asarray(starts, np.int64) + 12 + np.asarray(lengths, np.int64)
    stored = buf[at[:, None] + np.arange(4)].copy().view("<u4").reshape(-1).astype(np.uint64)
    return payloads, np.flatnonzero(crcs != stored).tolist()


def _header_candidates(data: bytes, pos: int, cap: int):
    """Positions >= pos, in order, where 8 bytes that may hold a length within ``cap`` (its
    high bytes are zero) are followed by their masked CRC32C.

    Checked with numpy over windows that double from 4 KiB: the boundary sought is usually
    within a record's length, so a 4 MiB buffer is rarely scanned whole. The CRCs are only
    computed where the high bytes are zero and the 12 bytes are not all zero (the masked
    CRC of a zero length is not zero), so long runs of zeros or noise pass quickly."""
    buf = np.frombuffer(data, np.uint8)
    width = max(1, (cap.bit_length() + 7) // 8)  # the bytes a length within the cap uses
    window = 4096
    while pos + 12 <= len(buf):
        stop = min(len(buf), pos + window + 11)
        n = stop - pos - 11
        zero = buf[pos:stop] == 0
        maybe = np.ones(n, bool)
        for k in range(width, 8):
            maybe &= zero[k:k + n]
        if maybe.any():
            blank = zero[:n].copy()
            for k in (*range(1, width), 8, 9, 10, 11):
                blank &= zero[k:k + n]
            at = np.flatnonzero(maybe & ~blank)
            if at.size:
                rows = buf[pos + at[:, None] + np.arange(12)]
                stored = rows[:, 8:].copy().view("<u4").reshape(-1).astype(np.uint64)
                yield from (at[mask(crc32c_rows(rows[:, :8])) == stored] + pos).tolist()
        pos += n
        window *= 2


def iter_unit(unit: Unit, batch_size: int, chunk: int = CHUNK,
              max_record_bytes: int | None = MAX_RECORD_BYTES):
    """RecordBatch and DeadLetter items for one unit, in file order; records whose header
    declares more than ``max_record_bytes`` (None: MAX_RECORD_BYTES) are damage."""
    return iter(_Framer(unit, batch_size, chunk, max_record_bytes))

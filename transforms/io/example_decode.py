"""The vectorised tf.Example wire-format walk (part of ``example_codec``, which documents it).

``locate_features`` finds, for a whole batch at once, where each named feature's Feature
bytes lie in every record; ``decode_column`` decodes one such column (kind tag, list
header, values) into an Arrow array with ``example_columns.assemble``. Records and
Features in a non-canonical encoding go through protobuf (upb) and are decoded again.
"""
from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from titans.transforms.io.example_columns import assemble
from titans.transforms.io.example_proto import (BYTES, FLOAT, KIND_OF_TAG, TAG, Feature,
                                                RawExample, is_list, kind_of)


class Column:
    """One feature of a batch: where each row's Feature bytes lie in one buffer."""

    def __init__(self, buf: np.ndarray, start: np.ndarray, end: np.ndarray, present: np.ndarray):
        self.buf, self.start, self.end, self.present = buf, start, end, present
        self.n = len(start)

    def replaced(self, rows: dict) -> "Column":
        """The same column with the bytes of some rows replaced ({row: bytes})."""
        extra = b"".join(rows.values())
        buf = np.concatenate([self.buf, np.frombuffer(extra, np.uint8)])
        start, end, present = self.start.copy(), self.end.copy(), self.present.copy()
        at = len(self.buf)
        for i, body in rows.items():
            start[i], end[i], present[i] = at, at + len(body), True
            at += len(body)
        return Column(buf, start, end, present)


def locate_features(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, names, records
                     ) -> tuple[dict[str, Column], dict[int, list[str]]]:
    """Where each named feature's Feature bytes lie in every record, and which records do
    not parse.

    Records in the canonical layout (Example{features: entries of key then value}) are
    walked for the whole batch at once: one step per map entry advances every record.
    The others (another field order, unknown fields, ...) are parsed by protobuf.
    """
    n = len(starts)
    found = {name: (np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool))
             for name in names}
    slow = np.zeros(n, bool)
    # Example = 0x0A varint(len) Features-body, exactly the record (empty: no features)
    rows = np.flatnonzero(ends > starts)
    length, nbytes = _varint_at(buf, starts[rows] + 1, ends[rows])
    body_start = starts[rows] + 1 + nbytes
    ok = (buf[starts[rows]] == 0x0A) & (nbytes > 0) & (body_start + length.astype(np.int64) == ends[rows])
    slow[rows[~ok]] = True
    live, pos = rows[ok], body_start[ok]
    live_end = ends[live]
    keyed = _KeyTable(names)
    while live.size:
        more = pos < live_end
        live, pos, live_end = live[more], pos[more], live_end[more]
        if not live.size:
            break
        # entry = 0x0A varint(len) [0x0A varint(klen) key][0x12 varint(vlen) value]
        elen, nb = _varint_at(buf, pos + 1, live_end)
        es = pos + 1 + nb
        ee = es + elen.astype(np.int64)
        klen, nbk = _varint_at(buf, es + 1, ee)
        ks = es + 1 + nbk
        ke = ks + klen.astype(np.int64)
        vlen, nbv = _varint_at(buf, ke + 1, ee)
        vs = ke + 1 + nbv
        ok = ((buf[pos] == 0x0A) & (nb > 0) & (ee <= live_end) & (buf[np.minimum(es, len(buf) - 1)] == 0x0A)
              & (nbk > 0) & (ke < ee) & (buf[np.minimum(ke, len(buf) - 1)] == 0x12) & (nbv > 0)
              & (vs + vlen.astype(np.int64) == ee))
        if not ok.all():
            slow[live[~ok]] = True
            live, pos, live_end = live[ok], pos[ok], live_end[ok]
            ee, klen, ks, vs = ee[ok], klen[ok], ks[ok], vs[ok]
        for entry, name in keyed.match(buf, ks, klen.astype(np.int64)):
            start, end, present = found[name]
            # a key seen twice: the last one wins, as in a protobuf map
            rows = live[entry]
            start[rows], end[rows], present[rows] = vs[entry], ee[entry], True
        pos = ee
    problems: dict[int, list[str]] = {}
    slow_rows = np.flatnonzero(slow)
    columns = {name: Column(buf, *found[name]) for name in names}
    if slow_rows.size:
        replace = {name: {} for name in names}
        for i in slow_rows:
            try:
                features = RawExample.FromString(records[i]).features.feature
            except DecodeError as e:
                problems[int(i)] = [f"record does not parse as a tf.train.Example ({e})"]
                features = {}
            for name in names:
                body = features.get(name)
                if body is not None:
                    replace[name][int(i)] = body
                else:
                    columns[name].present[i] = False
        for name in names:
            if replace[name]:
                columns[name] = columns[name].replaced(replace[name])
    return columns, problems


class _KeyTable:
    """The schema's feature names, to find among map keys lying in a buffer, all at once.

    Keys of one length are hashed (a polynomial over their bytes, in uint64) and looked up
    in the sorted hashes of the names of that length; a hit is then compared byte for byte.
    """

    def __init__(self, names):
        self._by_size = {}
        groups = collections.defaultdict(list)
        for name in names:
            groups[len(name.encode("utf-8"))].append(name)
        for size, group in groups.items():
            keys = np.array([list(n.encode("utf-8")) for n in group], np.uint8).reshape(len(group), size)
            codes = self._hash(keys)
            order = np.argsort(codes)
            self._by_size[size] = (codes[order], keys[order], [group[i] for i in order])

    @staticmethod
    def _hash(keys: np.ndarray) -> np.ndarray:
        code = np.zeros(len(keys), np.uint64)
        for k in range(keys.shape[1]):
            code = code * np.uint64(1099511628211) + keys[:, k].astype(np.uint64)
        return code

    def match(self, buf, starts, sizes):
        """(indices of the keys equal to a name, that name) for each name found."""
        for size, (codes, keys, names) in self._by_size.items():
            entries = np.flatnonzero(sizes == size)
            if not entries.size:
                continue
            got = buf[starts[entries, None] + np.arange(size)]
            at = np.minimum(np.searchsorted(codes, self._hash(got)), len(codes) - 1)
            same = (got == keys[at]).all(axis=1)
            entries, at = entries[same], at[same]
            for j in np.unique(at):
                yield entries[at == j], names[j]


def decode_column(col: Column, field: pa.Field) -> tuple[pa.Array, dict[int, str]]:
    """Feature bytes of one column -> (Arrow array of ``field.type``, {row: reason}).

    Rows in a non-canonical encoding are re-encoded by protobuf and decoded again (once).
    """
    problems: dict[int, str] = {}
    decoded = _decode(col, field, problems)
    if isinstance(decoded, np.ndarray):  # rows to re-encode
        fixed = {}
        for i in decoded:
            try:
                feature = Feature.FromString(col.buf[col.start[i]:col.end[i]].tobytes())
                feature.DiscardUnknownFields()
                fixed[int(i)] = feature.SerializeToString(deterministic=True)
            except DecodeError:
                problems.setdefault(int(i), f"feature {field.name!r} does not parse as a "
                                            f"tf.train.Feature")
                fixed[int(i)] = b""
        col = col.replaced(fixed)
        decoded = _decode(col, field, problems)
        if isinstance(decoded, np.ndarray):  # cannot happen for what protobuf writes
            for i in decoded:
                problems.setdefault(int(i), f"feature {field.name!r} has an encoding this "
                                            f"reader does not handle")
            decoded = _decode(col.replaced({int(i): b"" for i in decoded}), field, problems)
    return decoded, problems


def _decode(col: Column, field: pa.Field, problems: dict[int, str]):
    """The column's array, or the indices of rows whose encoding is not canonical."""
    kind, t = kind_of(field.type), field.type
    buf, n = col.buf, col.n
    size = col.end - col.start
    has_body = col.present & (size > 0)
    rows = np.flatnonzero(has_body)
    # Feature = tag(kind) varint(len) list; the list spans [ls, le)
    tag = np.zeros(n, np.uint8)
    ls = col.start.copy()
    le = col.end.copy()
    noncanonical = np.zeros(n, bool)
    if rows.size:
        tag[rows] = buf[col.start[rows]]
        length, nbytes = _varint_at(buf, col.start[rows] + 1, col.end[rows])
        ls[rows] = col.start[rows] + 1 + nbytes
        ok = (nbytes > 0) & (ls[rows] + length.astype(np.int64) == col.end[rows]) \
            & np.isin(tag[rows], list(KIND_OF_TAG))
        noncanonical[rows[~ok]] = True
    right_kind = tag == TAG[kind]
    wrong_kind = has_body & ~right_kind & ~noncanonical
    # values of the rows of the right kind
    use = has_body & right_kind & ~noncanonical
    if kind == BYTES:
        count, spans = _bytes_spans(buf, ls, le, use, noncanonical)
    else:
        count, ds, dlen, ints = _packed_spans(buf, ls, le, use, noncanonical, kind)
    if noncanonical.any():
        return np.flatnonzero(noncanonical)
    # shape and presence checks -> which rows carry a value (the rest are null or bad)
    name = field.name
    empty = col.present & (count == 0) & ~wrong_kind  # no kind, or an empty list
    missing = ~col.present
    if is_list(t) and not pa.types.is_fixed_size_list(t):
        valued = col.present & ~wrong_kind
        absent = missing
    else:
        want = t.list_size if pa.types.is_fixed_size_list(t) else 1
        absent = missing | empty
        wrong_len = col.present & ~wrong_kind & ~empty & (count != want)
        for i in np.flatnonzero(wrong_len):
            problems.setdefault(int(i), f"feature {name!r} has {int(count[i])} values, expected {want}")
        valued = use & (count == want)
    for i in np.flatnonzero(wrong_kind):
        got = KIND_OF_TAG.get(int(tag[i]), "unknown kind")
        problems.setdefault(int(i), f"feature {name!r} is {got}, expected {kind}")
    if not field.nullable:
        for i in np.flatnonzero(absent):
            problems.setdefault(int(i), f"feature {name!r} is missing" if missing[i] else
                                f"feature {name!r} is empty")
    count = np.where(valued, count, 0)
    if kind == BYTES:
        values = _bytes_values(buf, spans, valued, count)
    else:
        values = _packed_values(buf, ds, dlen, valued, kind, ints)
        if values is None:  # a varint longer than 10 bytes: let protobuf judge these rows
            return np.flatnonzero(valued & (dlen > 0))
    return assemble(values, count, valued, field, problems)


def _varint_at(buf: np.ndarray, pos: np.ndarray, limit: np.ndarray):
    """The varint starting at each ``buf[pos]``: (value uint64, bytes used; 0 if malformed)."""
    if not len(buf):
        return np.zeros(len(pos), np.uint64), np.zeros(len(pos), np.int64)
    # most varints here (lengths, small ids) are one byte: that step for all, without indices
    first = buf[np.minimum(pos, len(buf) - 1)]
    inside = pos < limit
    value = (first & 0x7F).astype(np.uint64)
    done = inside & (first < 0x80)
    nbytes = done.astype(np.int64)
    live = np.flatnonzero(inside & ~done)
    for k in range(1, 10):
        if not live.size:
            break
        at = pos[live] + k
        inside = at < limit[live]
        live, at = live[inside], at[inside]
        b = buf[at]
        value[live] |= (b & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        last = b < 0x80
        nbytes[live[last]] = k + 1
        live = live[~last]
    return value, nbytes


def _packed_spans(buf, ls, le, use, noncanonical, kind):
    """Float/Int64 list = 0x0A varint(m) <m bytes>: (value count, data start, data length,
    for int64 the varint bytes of the rows read (rows, bytes) to decode them once)."""
    n = len(ls)
    count = np.zeros(n, np.int64)
    ds = np.zeros(n, np.int64)
    dlen = np.zeros(n, np.int64)
    rows = np.flatnonzero(use & (le > ls))  # an empty list has no bytes at all
    if not rows.size:
        return count, ds, dlen, None
    m, nbytes = _varint_at(buf, ls[rows] + 1, le[rows])
    m = m.astype(np.int64)
    start = ls[rows] + 1 + nbytes
    ok = (buf[ls[rows]] == 0x0A) & (nbytes > 0) & (start + m == le[rows])
    if kind == FLOAT:
        ok &= m % 4 == 0
        count[rows] = m // 4
    else:
        # a packed varint run ends on a byte without the continuation bit
        ok &= (m > 0) & (buf[np.maximum(le[rows] - 1, 0)] < 0x80)
    noncanonical[rows[~ok]] = True
    ds[rows], dlen[rows] = start, m
    if kind == FLOAT:
        return count, ds, dlen, None
    # count the varints (bytes without the continuation bit) of each row by prefix sums
    good = rows[ok]
    data = _gather(buf, ds[good], dlen[good])
    count[good] = _per_row(data < 0x80, dlen[good])
    return count, ds, dlen, (good, data)


def _per_row(flags: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """How many ``flags`` are set in each consecutive run of ``sizes`` elements."""
    if not sizes.size:
        return np.zeros(0, np.int64)
    total = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return np.diff(np.concatenate([[0], total[np.cumsum(sizes)]]))


def _bytes_spans(buf, ls, le, use, noncanonical):
    """BytesList = (0x0A varint(len) <len bytes>)*: scan every row's list in step.

    Returns (value count per row, (row, start, length) of every value in row order).
    """
    n = len(ls)
    count = np.zeros(n, np.int64)
    live = np.flatnonzero(use & (le > ls))
    pos = ls[live]
    rows_out, starts_out, lens_out = [], [], []
    while live.size:
        length, nbytes = _varint_at(buf, pos + 1, le[live])
        length = length.astype(np.int64)
        start = pos + 1 + nbytes
        ok = (buf[pos] == 0x0A) & (nbytes > 0) & (start + length <= le[live])
        noncanonical[live[~ok]] = True
        live, start, length = live[ok], start[ok], length[ok]
        rows_out.append(live)
        starts_out.append(start)
        lens_out.append(length)
        count[live] += 1
        pos = start + length
        more = pos < le[live]
        live, pos = live[more], pos[more]
    if not rows_out:
        z = np.zeros(0, np.int64)
        return count, (z, z, z)
    rows_all = np.concatenate(rows_out)
    order = np.argsort(rows_all, kind="stable")  # row-major, values in list order
    return count, (rows_all[order], np.concatenate(starts_out)[order],
                   np.concatenate(lens_out)[order])


def _gather(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bytes ``buf[s:s+l]`` of every (disjoint) span, concatenated, in the given order."""
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    n = len(starts)
    if not n:
        return np.zeros(0, np.uint8)
    if (lengths == lengths[0]).all():
        stride = np.diff(starts)
        if not stride.size or (stride == stride[0]).all() and stride[0] >= lengths[0]:
            # evenly spaced spans of one length (a fixed-length feature): one strided copy
            step = int(stride[0]) if stride.size else int(lengths[0])
            view = np.lib.stride_tricks.as_strided(buf[starts[0]:], (n, int(lengths[0])),
                                                   (step, 1), writeable=False)
            return np.ascontiguousarray(view).reshape(-1)
    # Arrow's take copies the spans in C: the buffer seen as a binary array whose values
    # are the spans and the gaps between them, then every other value taken
    order = None
    if n > 1 and not (starts[1:] >= starts[:-1] + lengths[:-1]).all():
        order = np.argsort(starts, kind="stable")  # rows re-encoded at the end of the buffer
        starts, lengths = starts[order], lengths[order]
    bounds = np.empty(2 * n, np.int64)
    bounds[0::2], bounds[1::2] = starts, starts + lengths
    segments = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 2 * n - 1, [
        None, pa.py_buffer(bounds), pa.py_buffer(buf)])
    pick = np.arange(0, 2 * n, 2, dtype=np.int64)
    if order is not None:
        pick = pick[np.argsort(order, kind="stable")]
    taken = segments.take(pa.array(pick))
    total = int(lengths.sum())
    return np.frombuffer(taken.buffers()[2], np.uint8, total)


def _packed_values(buf, ds, dlen, valued, kind, ints):
    """The values of the ``valued`` rows, row after row."""
    if kind == FLOAT:
        return _gather(buf, ds[valued], dlen[valued]).view("<f4")
    if ints is None:
        return np.zeros(0, np.int64)
    rows, data = ints
    per_row = _per_row(data < 0x80, dlen[rows])
    values = _decode_varints(data, int(per_row.sum()))
    if values is None:
        return None
    return values[np.repeat(valued[rows], per_row)]


def _decode_varints(data: np.ndarray, expected: int) -> np.ndarray | None:
    """A run of varints -> int64 values (None if one is longer than 10 bytes)."""
    if not data.size:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(data < 0x80)
    if ends.size != expected:
        return None
    starts = np.concatenate([[0], ends[:-1] + 1])
    size = ends - starts + 1
    if size.max() > 10:
        return None
    value = (data[starts] & 0x7F).astype(np.uint64)
    for k in range(1, int(size.max())):
        more = np.flatnonzero(size > k)
        value[more] |= (data[starts[more] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return value.view(np.int64)


def _bytes_values(buf, spans, valued, count) -> pa.Array:
    rows, starts, lengths = spans
    keep = valued[rows] if rows.size else np.zeros(0, bool)
    starts, lengths = starts[keep], lengths[keep]
    data = _gather(buf, starts, lengths)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lengths),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])


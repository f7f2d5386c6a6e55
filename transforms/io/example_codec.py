"""tf.train.Example records <-> Arrow tables, without TensorFlow.

The message classes (Example, Features, Feature, BytesList, FloatList, Int64List) are built
at import time from a hand-written descriptor whose field numbers are TensorFlow's public
ones, so records written by TensorFlow parse here and records written here parse there.

Parsing is the hot path of a TFRecord input (one record per row), and protobuf's Python
API costs a few microseconds per record even with its C backend ("upb"), mostly in
building message objects. So a batch is parsed with numpy, with no Python object per
record or value:

- the records are laid end to end in one buffer, and their map entries are walked for
  the whole batch at once, one step per entry advancing every record; keys are compared
  with the schema's names as byte matrices, giving where each feature's Feature bytes lie;
- per column, those bytes are decoded at once: the kind tag, the list header, then float32
  values taken as they lie in the buffer, varints unpacked with a few array operations,
  byte strings located by a scan that advances every row in step. Values land in arrays
  that become Arrow arrays without a copy.

The vectorised walk reads the canonical encoding every protobuf library writes (key before
value, one packed chunk per numeric list). Anything else protobuf accepts (another field
order, unpacked or split lists, unknown fields, a message that appears twice) is detected
and handed to protobuf itself: upb parses that record's envelope (with a second descriptor
in which ``Features.feature`` is ``map<string, bytes>``), or re-encodes that one Feature
canonically, and it is decoded again, so the result is what a full protobuf parse gives.
``benchmarks/tfrecord_read.py`` measures the cost per record.
"""
from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from titans.transforms.dead_letter import READ, DeadLetter

BYTES, FLOAT, INT64 = "bytes_list", "float_list", "int64_list"
# the wire tag of each kind inside a Feature message: field number << 3 | 2 (length-delimited)
_TAG = {BYTES: 0x0A, FLOAT: 0x12, INT64: 0x1A}
_KIND_OF_TAG = {v: k for k, v in _TAG.items()}
_VALUE_TYPE = {FLOAT: pa.float32(), INT64: pa.int64(), BYTES: pa.binary()}


def _message_classes(package: str, raw: bool) -> dict:
    """Example & co. from a descriptor built by hand (tensorflow/core/example/*.proto).

    ``raw`` makes ``Features.feature`` a ``map<string, bytes>``: the same wire format,
    parsed without building a message per feature.
    """
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name=f"{package}/example.proto", package=package,
                                            syntax="proto3")
    prefix = f".{package}."

    def message(name, fields):
        m = fd.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = prefix + type_name
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", 1, F.TYPE_BYTES, rep, None)])
    message("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None)]).field[0].options.packed = True
    message("Int64List", [("value", 1, F.TYPE_INT64, rep, None)]).field[0].options.packed = True
    feature = message("Feature", [("bytes_list", 1, F.TYPE_MESSAGE, opt, "BytesList"),
                                  ("float_list", 2, F.TYPE_MESSAGE, opt, "FloatList"),
                                  ("int64_list", 3, F.TYPE_MESSAGE, opt, "Int64List")])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", [("feature", 1, F.TYPE_MESSAGE, rep, "Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    if raw:
        entry.field.add(name="value", number=2, type=F.TYPE_BYTES, label=opt)
    else:
        entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt,
                        type_name=prefix + "Feature")
    message("Example", [("features", 1, F.TYPE_MESSAGE, opt, "Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    names = ["Example", "Features", "Feature", "BytesList", "FloatList", "Int64List"]
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{n}"))
            for n in names}


_FULL = _message_classes("titans.tensorflow", raw=False)
Example, Features, Feature = _FULL["Example"], _FULL["Features"], _FULL["Feature"]
BytesList, FloatList, Int64List = _FULL["BytesList"], _FULL["FloatList"], _FULL["Int64List"]
_RawExample = _message_classes("titans.tensorflow_raw", raw=True)["Example"]


# ---------------------------------------------------------------------------- schema

def kind_of(t: pa.DataType) -> str:
    """The Feature kind that holds a column of type ``t`` (a scalar or a list of scalars)."""
    v = t.value_type if _is_list(t) else t
    if pa.types.is_floating(v):
        return FLOAT
    if pa.types.is_integer(v) or pa.types.is_boolean(v):
        return INT64
    if pa.types.is_binary(v) or pa.types.is_large_binary(v) or pa.types.is_string(v) \
            or pa.types.is_large_string(v):
        return BYTES
    raise ValueError(f"a column of type {t} cannot be a tf.train.Feature: use numbers, bools, "
                     f"strings or binary, or a list of those")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def infer_schema(records: list[bytes]) -> pa.Schema:
    """The schema of a sample of serialized Examples, one field per feature, sorted by name.

    A feature whose every sampled value has length 1 is a scalar (float32, int64 or
    binary); a constant length L > 1 a ``fixed_size_list<L>``; otherwise a ``list``. A
    feature present in every sampled record is non-nullable (a record without it is a
    dead letter); one missing from some is nullable (missing reads as null). A feature
    seen with several kinds takes the most frequent (the others become dead letters).
    """
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lengths: dict[str, set] = collections.defaultdict(set)
    seen: collections.Counter = collections.Counter()
    parsed = 0
    for record in records:
        try:
            features = Example.FromString(record).features.feature
        except DecodeError:
            continue
        parsed += 1
        for name, feature in features.items():
            kind = feature.WhichOneof("kind")
            seen[name] += 1
            if kind is None:
                lengths[name].add(0)
                continue
            kinds[name][kind] += 1
            lengths[name].add(len(getattr(feature, kind).value))
    if not parsed:
        raise ValueError(f"none of the {len(records)} sampled records parses as a "
                         f"tf.train.Example; is the input TFRecord files of Examples?")
    fields = []
    for name in sorted(seen):
        kind = kinds[name].most_common(1)[0][0] if kinds[name] else BYTES
        value_type = _VALUE_TYPE[kind]
        sizes = lengths[name]
        if sizes == {1}:
            t = value_type
        elif len(sizes) == 1 and min(sizes) > 1:
            t = pa.list_(value_type, min(sizes))
        else:
            t = pa.list_(value_type)
        fields.append(pa.field(name, t, nullable=seen[name] < parsed))
    return pa.schema(fields)


# ---------------------------------------------------------------------------- parsing

def parse_examples(records: list[bytes], schema: pa.Schema) -> tuple[pa.Table, DeadLetter | None]:
    """Serialized Examples -> (table conforming to ``schema``, DeadLetter or None).

    A record that does not parse, lacks a non-nullable feature, or holds a feature of the
    wrong kind or length is left out of the table and goes to the DeadLetter (stage
    "read") with its reason, the raw record kept in a ``record`` binary column.
    """
    table, bad, reasons = parse_with_rejects(records, schema)
    if not bad.size:
        return table, None
    rows = pa.table({"record": pa.array([records[i] for i in bad], pa.binary())})
    return table, DeadLetter(rows, reasons, READ)


def parse_with_rejects(records: list[bytes], schema: pa.Schema
                       ) -> tuple[pa.Table, np.ndarray, list[str]]:
    """(table of the good records, indices of the bad ones, a reason per bad one)."""
    n = len(records)
    for field in schema:
        kind_of(field.type)  # a schema the codec cannot fill is a caller's error, said early
    if not n:
        return schema.empty_table(), np.zeros(0, np.int64), []
    buf = np.frombuffer(b"".join(records), np.uint8)
    ends = np.cumsum(np.fromiter(map(len, records), np.int64, n))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    spans, problems = _locate_features(buf, starts, ends, schema.names, records)
    unparsed = set(problems)
    columns = []
    for field in schema:
        column, column_problems = _decode_column(spans[field.name], field)
        columns.append(column)
        for i, why in column_problems.items():
            if i not in unparsed:  # "does not parse" says it all
                problems.setdefault(i, []).append(why)
    table = pa.Table.from_arrays(columns, schema=schema)
    if not problems:
        return table, np.zeros(0, np.int64), []
    bad = np.array(sorted(problems), np.int64)
    keep = np.ones(n, bool)
    keep[bad] = False
    return table.filter(pa.array(keep)), bad, ["; ".join(problems[i]) for i in bad]


class _Column:
    """One feature of a batch: where each row's Feature bytes lie in one buffer."""

    def __init__(self, buf: np.ndarray, start: np.ndarray, end: np.ndarray, present: np.ndarray):
        self.buf, self.start, self.end, self.present = buf, start, end, present
        self.n = len(start)

    def replaced(self, rows: dict) -> "_Column":
        """The same column with the bytes of some rows replaced ({row: bytes})."""
        extra = b"".join(rows.values())
        buf = np.concatenate([self.buf, np.frombuffer(extra, np.uint8)])
        start, end, present = self.start.copy(), self.end.copy(), self.present.copy()
        at = len(self.buf)
        for i, body in rows.items():
            start[i], end[i], present[i] = at, at + len(body), True
            at += len(body)
        return _Column(buf, start, end, present)


def _locate_features(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, names, records
                     ) -> tuple[dict[str, _Column], dict[int, list[str]]]:
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
    columns = {name: _Column(buf, *found[name]) for name in names}
    if slow_rows.size:
        replace = {name: {} for name in names}
        for i in slow_rows:
            try:
                features = _RawExample.FromString(records[i]).features.feature
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


def _decode_column(col: _Column, field: pa.Field) -> tuple[pa.Array, dict[int, str]]:
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


def _decode(col: _Column, field: pa.Field, problems: dict[int, str]):
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
            & np.isin(tag[rows], list(_KIND_OF_TAG))
        noncanonical[rows[~ok]] = True
    right_kind = tag == _TAG[kind]
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
    if _is_list(t) and not pa.types.is_fixed_size_list(t):
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
        got = _KIND_OF_TAG.get(int(tag[i]), "unknown kind")
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
    return _assemble(values, count, valued, field, problems)


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


def _assemble(values, count, valued, field: pa.Field, problems) -> pa.Array:
    """Flat values + per-row counts -> an array of ``field.type`` (null where not valued)."""
    t, n = field.type, len(count)
    value_type = t.value_type if _is_list(t) else t
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    row_of_value = None
    if values.type != value_type:
        values, bad_values = _cast_values(values, value_type)
        if bad_values is not None:
            row_of_value = np.repeat(np.arange(n), count)
            for i in np.unique(row_of_value[bad_values]):
                problems.setdefault(int(i), f"feature {field.name!r} has a value that is not a "
                                            f"valid {value_type}")
    mask = None if valued.all() else pa.array(~valued)
    if pa.types.is_fixed_size_list(t):
        if not valued.all():  # every row needs its L slots, null ones too
            full_idx = np.full(n * t.list_size, -1, np.int64)
            full_idx[np.repeat(valued, t.list_size)] = np.arange(len(values))
            values = values.take(pa.array(full_idx, mask=full_idx < 0))
        return pa.FixedSizeListArray.from_arrays(values, type=t, mask=mask)
    if _is_list(t):
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(count, out=offsets[1:])
        if pa.types.is_large_list(t):
            return pa.LargeListArray.from_arrays(pa.array(offsets), values, type=t, mask=mask)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=t,
                                        mask=mask)
    if valued.all():
        return values
    idx = np.full(n, -1, np.int64)
    idx[valued] = np.arange(len(values))
    return values.take(pa.array(idx, mask=idx < 0))


def _cast_values(values: pa.Array, value_type: pa.DataType):
    """(values as ``value_type``, indices of values that do not fit or None)."""
    if pa.types.is_integer(value_type) and not pa.types.is_uint64(value_type):
        v = values.to_numpy(zero_copy_only=False)
        info = np.iinfo(np.dtype(str(value_type)))
        bad = (v < info.min) | (v > info.max)
        out = pa.array(np.where(bad, 0, v).astype(info.dtype), value_type)
        return out, (np.flatnonzero(bad) if bad.any() else None)
    if pa.types.is_uint64(value_type):  # TF keeps uint64 in int64's bits
        return pa.array(values.to_numpy(zero_copy_only=False).view(np.uint64)), None
    if pa.types.is_boolean(value_type):
        return pc.not_equal(values, 0), None
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        try:
            return values.cast(value_type), None
        except pa.ArrowInvalid:
            pass
        bad = []
        for i, v in enumerate(values.to_pylist()):
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(i)
        keep = np.ones(len(values), bool)
        keep[bad] = False
        cleaned = pc.if_else(pa.array(keep), values, pa.scalar(b"", values.type))
        return cleaned.cast(value_type), np.array(bad, np.int64)
    return values.cast(value_type), None


# ---------------------------------------------------------------------------- encoding

def encode_examples(table: pa.Table) -> list[bytes]:
    """Every row -> a serialized Example with one feature per column (nulls are omitted)."""
    return encode_examples_array(table).to_pylist()


def encode_examples_array(table: pa.Table) -> pa.LargeBinaryArray:
    """Every row -> a serialized Example, as one Arrow array (no Python object per row).

    ints and bools -> int64_list, floats -> float_list (float32), strings and binary ->
    bytes_list; a list column -> the same list; a null -> the feature is left out.
    Features are written in column order, each list packed, as TensorFlow writes them.
    """
    n = table.num_rows
    pieces = []
    for name, column in zip(table.column_names, table.columns):
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if isinstance(arr, pa.ChunkedArray):  # a column of no chunks
            arr = pa.array([], arr.type)
        pieces.extend(_encode_feature(name, arr))
    if not pieces:  # no columns: every row is an Example with empty Features
        return pa.array([b"\x0a\x00"] * n, pa.large_binary())
    body = _join(pieces, n)
    lengths = _lengths(body)
    return _join([_const(b"\x0a", n), _varint_array(lengths), body], n)


def _encode_feature(name: str, arr: pa.Array) -> list[pa.Array]:
    """The map entry of one feature in every row, as byte pieces to join row-wise."""
    kind = kind_of(arr.type)
    n = len(arr)
    if _is_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            offsets = np.arange(n + 1, dtype=np.int64) * arr.type.list_size + arr.offset * arr.type.list_size
            values = arr.values
        else:
            offsets = np.asarray(arr.offsets).astype(np.int64)
            values = arr.values
        if values.null_count:
            vals_slice = values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            if vals_slice.null_count:
                raise ValueError(f"column {name!r} has null values inside its lists; a "
                                 f"tf.train.Feature cannot hold them")
    else:
        offsets = np.arange(n + 1, dtype=np.int64)
        values = arr
    valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, bool)
    count = np.where(valid, np.diff(offsets), 0)
    # the list's body in every row
    if kind == BYTES:
        data = _bytes_list_bodies(values, offsets, valid)
    else:
        data = _packed_list_bodies(values, offsets, valid, kind)
    data_len = _lengths(data)
    if kind == BYTES:
        list_len = data_len
        list_header = None
    else:
        # 0x0A varint(len) before the packed values; nothing at all for an empty list
        nonempty = count > 0
        list_header = _join([_const(b"\x0a", n), _varint_array(data_len)], n)
        list_header = pc.if_else(pa.array(nonempty), list_header, pa.scalar(b"", pa.large_binary()))
        list_len = data_len + np.where(nonempty, 1 + _varint_size(data_len), 0)
    feature_len = 1 + _varint_size(list_len) + list_len
    key = name.encode("utf-8")
    key_part = b"\x0a" + _varint_bytes(len(key)) + key + b"\x12"
    entry_len = len(key_part) + _varint_size(feature_len) + feature_len
    head = _join([_const(b"\x0a", n), _varint_array(entry_len), _const(key_part, n),
                  _varint_array(feature_len), _const(bytes([_TAG[kind]]), n), _varint_array(list_len)], n)
    pieces = [head] + ([list_header] if list_header is not None else []) + [data]
    if not valid.all():  # a null value: no entry at all in that row
        empty = pa.scalar(b"", pa.large_binary())
        mask = pa.array(valid)
        pieces = [pc.if_else(mask, p, empty) for p in pieces]
    return pieces


def _packed_list_bodies(values: pa.Array, offsets: np.ndarray, valid, kind) -> pa.Array:
    n = len(offsets) - 1
    if kind == FLOAT:
        v = values.cast(pa.float32()) if values.type != pa.float32() else values
        if v.null_count:
            v = pc.fill_null(v, 0.0)
        flat = v.to_numpy(zero_copy_only=False).astype("<f4", copy=False).view(np.uint8)
        return _binary(flat, offsets * 4, n)
    if values.null_count:  # null rows are left out anyway; their slots need a number
        values = pc.fill_null(values, pa.scalar(0, values.type) if not
                              pa.types.is_boolean(values.type) else False)
    if pa.types.is_boolean(values.type):
        ints = values.to_numpy(zero_copy_only=False).astype(np.int64)
    elif pa.types.is_uint64(values.type):
        ints = values.to_numpy(zero_copy_only=False).view(np.int64)
    else:
        ints = values.cast(pa.int64()).to_numpy(zero_copy_only=False)
    flat, sizes = _varint_encode(ints.view(np.uint64))
    ends = np.concatenate([[0], np.cumsum(sizes)])
    return _binary(flat, ends[offsets], n)


def _bytes_list_bodies(values: pa.Array, offsets: np.ndarray, valid) -> pa.Array:
    if not (pa.types.is_large_binary(values.type)):
        values = values.cast(pa.large_binary())
    m = len(values)
    lens = _lengths(values) if m else np.zeros(0, np.int64)
    each = _join([_const(b"\x0a", m), _varint_array(lens), values], m) if m else \
        pa.array([], pa.large_binary())
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), each)
    joined = pc.binary_join(lists, pa.scalar(b"", pa.large_binary()))
    return joined.cast(pa.large_binary())


def _binary(flat: np.ndarray, offsets: np.ndarray, n: int) -> pa.Array:
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [
        None, pa.py_buffer(np.ascontiguousarray(offsets, np.int64)), pa.py_buffer(flat)])


def _const(value: bytes, n: int) -> pa.Scalar:
    return pa.scalar(value, pa.large_binary())


def _join(pieces, n: int) -> pa.Array:
    if all(isinstance(p, pa.Scalar) for p in pieces):
        return pa.array([b"".join(p.as_py() for p in pieces)] * n, pa.large_binary())
    joined = pc.binary_join_element_wise(*pieces, pa.scalar(b"", pa.large_binary()),
                                         null_handling="replace")
    return joined


def _lengths(arr: pa.Array) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], np.int64, len(arr) + 1, arr.offset * 8)
    return np.diff(offsets)


def _varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes a varint takes for each (non-negative) value."""
    v = np.asarray(values).astype(np.uint64)
    size = np.ones(v.shape, np.int64)
    for k in range(1, 10):
        size += v >= np.uint64(1 << (7 * k))
    return size


def _varint_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 values -> (their varints concatenated, bytes per value)."""
    v = values.astype(np.uint64, copy=False)
    size = _varint_size(v)
    width = int(size.max()) if size.size else 1
    groups = np.empty((len(v), width), np.uint8)
    for k in range(width):
        groups[:, k] = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        groups[:, k] |= np.where(k < size - 1, 0x80, 0).astype(np.uint8)
    keep = np.arange(width)[None, :] < size[:, None]
    return groups[keep], size


def _varint_array(values: np.ndarray) -> pa.Array:
    flat, size = _varint_encode(np.asarray(values, np.uint64))
    offsets = np.concatenate([[0], np.cumsum(size)])
    return _binary(flat, offsets, len(size))


def _varint_bytes(value: int) -> bytes:
    flat, _ = _varint_encode(np.array([value], np.uint64))
    return flat.tobytes()

"""tf.train.Example records <-> Arrow tables, without TensorFlow.

This module is the codec's API (schema inference, parsing with rejects; the encoder
re-exported); the work is in four modules: ``example_proto`` (the message classes, built at
import time from a hand-written descriptor with TensorFlow's public field numbers, so
records written by TensorFlow parse here and records written here parse there),
``example_decode`` (the vectorised wire-format walk), ``example_columns`` (values -> Arrow
arrays of the schema's types) and ``example_encode`` (Arrow -> serialized Examples).

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

No maintained decoder is both installable and faster (checked 2026-12-07, 2 shared CPUs,
200k records of an int64 and 64 float32s): tfx-bsl 1.21.0 has a cp311 wheel but requires
tensorflow>=2.21, and its ExamplesToRecordBatchDecoder (run in a separate venv with
--no-deps) took 0.84 us/record against 0.46 here; protobuf's upb parsing each record into
numpy (the "hand" loop of the benchmark) takes about 5 us/record, 4x this codec.
"""
from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from titans.transforms.dead_letter import READ, DeadLetter
from titans.transforms.io.example_decode import decode_column, locate_features
from titans.transforms.io.example_encode import encode_examples, encode_examples_array
from titans.transforms.io.example_proto import (BYTES, FLOAT, INT64, VALUE_TYPE, BytesList,
                                                Example, Feature, Features, FloatList,
                                                Int64List, kind_of)

__all__ = ["BYTES", "FLOAT", "INT64", "BytesList", "Example", "Feature", "Features",
           "FloatList", "Int64List", "encode_examples", "encode_examples_array",
           "infer_schema", "kind_of", "parse_examples", "parse_with_rejects"]


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
        value_type = VALUE_TYPE[kind]
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
    spans, problems = locate_features(buf, starts, ends, schema.names, records)
    unparsed = set(problems)
    columns = []
    for field in schema:
        column, column_problems = decode_column(spans[field.name], field)
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

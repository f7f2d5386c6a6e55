import base64
import json
import random
import struct

import numpy as np
import pyarrow as pa
import pytest

import example_wire as wire
from titans.transforms.io.example_codec import (Example, encode_examples, infer_schema,
                                             parse_examples)

F32 = lambda v: float(np.float32(v))  # noqa: E731 - the float32 a float_list holds


def _records():
    return [
        wire.example({"score": ("float", [0.25]), "vec": ("float", [1.5, -2.0, 3.0]),
                      "id": ("int64", [7]), "tokens": ("int64", [1, -1, 300, -(2 ** 63)]),
                      "name": ("bytes", [b"caf\xc3\xa9"]), "tags": ("bytes", [b"", b"\xff\x00"]),
                      "opt": ("int64", [2 ** 62])}),
        wire.example({"score": ("float", [-1e30]), "vec": ("float", [0.0, 1e-3, 7.0]),
                      "id": ("int64", [2 ** 63 - 1]), "tokens": ("int64", []),
                      "name": ("bytes", [b""]), "tags": ("bytes", [b"a"])}),
    ]


def test_every_feature_kind_reads_with_exact_values():
    records = _records()
    schema = infer_schema(records)
    assert schema == pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("name", pa.binary(), nullable=False),
        pa.field("opt", pa.int64()),  # missing from the second record
        pa.field("score", pa.float32(), nullable=False),
        pa.field("tags", pa.list_(pa.binary()), nullable=False),
        pa.field("tokens", pa.list_(pa.int64()), nullable=False),
        pa.field("vec", pa.list_(pa.float32(), 3), nullable=False)])
    table, dead = parse_examples(records, schema)
    assert dead is None and table.schema == schema
    assert table.to_pylist() == [
        {"id": 7, "name": b"caf\xc3\xa9", "opt": 2 ** 62, "score": 0.25, "tags": [b"", b"\xff\x00"],
         "tokens": [1, -1, 300, -(2 ** 63)], "vec": [1.5, -2.0, 3.0]},
        {"id": 2 ** 63 - 1, "name": b"", "opt": None, "score": F32(-1e30), "tags": [b"a"],
         "tokens": [], "vec": [0.0, F32(1e-3), 7.0]}]


def test_schema_types_other_than_the_inferred_ones_are_honoured():
    schema = pa.schema([("name", pa.string()), ("id", pa.int32()), ("score", pa.float64()),
                        ("vec", pa.large_list(pa.float32())), ("flag", pa.bool_())])
    records = [wire.example({"name": ("bytes", [b"caf\xc3\xa9"]), "id": ("int64", [-3]),
                             "score": ("float", [0.5]), "vec": ("float", [1.0, 2.0]),
                             "flag": ("int64", [1])}),
               wire.example({"name": ("bytes", [b"\xff"]), "id": ("int64", [2 ** 40]),
                             "score": ("float", [1.0]), "vec": ("float", []),
                             "flag": ("int64", [0])})]
    table, dead = parse_examples(records + records[:1], schema)
    assert table.to_pylist() == [{"name": "café", "id": -3, "score": 0.5, "vec": [1.0, 2.0],
                                  "flag": True}] * 2
    assert dead.rows.num_rows == 1
    assert "not a valid string" in dead.reasons[0] and "not a valid int32" in dead.reasons[0]


def test_unusual_but_legal_encodings_read_like_protobuf_reads_them():
    floats, ints = [1.5, -2.0, 3.25], [5, -1, 300]
    split_floats = wire.field(2, wire.field(1, struct.pack("<f", 1.5))
                              + wire.field(1, struct.pack("<2f", -2.0, 3.25)))
    twice = (wire.field(2, wire.field(1, struct.pack("<f", 1.5)))
             + wire.field(2, wire.field(1, struct.pack("<2f", -2.0, 3.25))))
    unknown = wire.field(2, wire.field(1, struct.pack("<3f", *floats)) + b"\x10\x05")
    variants = [wire.feature("float", floats, packed=False), split_floats, twice, unknown]
    records = [wire.example({"x": v, "i": ("int64", ints)}) for v in variants]
    records.append(wire.example({"x": ("float", floats), "i": wire.feature("int64", ints, packed=False)}))
    schema = pa.schema([pa.field("x", pa.list_(pa.float32(), 3), nullable=False),
                        pa.field("i", pa.list_(pa.int64()), nullable=False)])
    table, dead = parse_examples(records, schema)
    assert dead is None
    assert table.to_pylist() == [{"x": floats, "i": ints}] * len(records)


def test_bad_records_go_to_the_dead_letter_with_their_reason_and_bytes():
    good = wire.example({"x": ("float", [1.0, 2.0]), "n": ("bytes", [b"a"])})
    records = [
        good,
        wire.example({"x": ("int64", [1, 2]), "n": ("bytes", [b"a"])}),   # wrong kind
        wire.example({"x": ("float", [1.0]), "n": ("bytes", [b"a"])}),    # wrong length
        wire.example({"n": ("bytes", [b"a"])}),                           # missing
        b"\xff\xff\xff",                                                  # not protobuf
        wire.example({"x": b"\x12\x05\x0a", "n": ("bytes", [b"a"])}),     # broken Feature
        wire.example({"x": ("float", [1.0, 2.0]), "n": ("bytes", [b"a", b"b"])}),  # 2 values
        good,
    ]
    schema = pa.schema([pa.field("x", pa.list_(pa.float32(), 2), nullable=False),
                        pa.field("n", pa.binary(), nullable=False)])
    table, dead = parse_examples(records, schema)
    assert table.to_pylist() == [{"x": [1.0, 2.0], "n": b"a"}] * 2
    assert dead.stage == "read" and dead.rows.column("record").to_pylist() == records[1:7]
    assert dead.reasons == [
        "feature 'x' is int64_list, expected float_list",
        "feature 'x' has 1 values, expected 2",
        "feature 'x' is missing",
        "record does not parse as a tf.train.Example "
        "(Error parsing message with type 'titans.tensorflow_raw.Example')",
        "feature 'x' does not parse as a tf.train.Feature",
        "feature 'n' has 2 values, expected 1"]
    row = json.loads(dead.to_table().column("row")[3].as_py())
    assert base64.b64decode(row["record"]["base64"]) == b"\xff\xff\xff"


def test_missing_feature_is_null_when_nullable():
    schema = pa.schema([pa.field("a", pa.float32()), pa.field("b", pa.list_(pa.int64(), 2))])
    table, dead = parse_examples([wire.example({}), wire.example({"a": ("float", [])})], schema)
    assert dead is None and table.to_pylist() == [{"a": None, "b": None}] * 2


def test_encoded_examples_parse_with_protobuf_and_round_trip():
    table = pa.table({
        "id": pa.array([1, 2, None], pa.int64()),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2),
        "tokens": pa.array([[1, -5], [], [2 ** 40]], pa.list_(pa.int64())),
        "words": pa.array([[b"a", b""], None, [b"xyz"]], pa.list_(pa.binary())),
        "flag": pa.array([True, False, True]),
        "label": pa.array([3, 0, 9], pa.int64()),
        "confidence": pa.array([0.9, 0.5, 1.0], pa.float32()),
        "deferral_score": pa.array([0.1, 0.7, None], pa.float32()),
        "source": pa.array(["student", "teacher", "student"]),
    })
    records = encode_examples(table)
    first = Example.FromString(records[0]).features.feature
    assert list(first["vec"].float_list.value) == [0.0, 1.0]
    assert list(first["tokens"].int64_list.value) == [1, -5]
    assert list(first["words"].bytes_list.value) == [b"a", b""]
    assert list(first["flag"].int64_list.value) == [1]
    assert list(first["source"].bytes_list.value) == [b"student"]
    third = Example.FromString(records[2]).features.feature
    assert "id" not in third and "deferral_score" not in third  # nulls are left out
    assert "words" not in Example.FromString(records[1]).features.feature
    back, dead = parse_examples(records, table.schema)
    assert dead is None and back.equals(table)


def test_vectorised_parse_equals_protobuf_on_random_examples():
    rng = random.Random(0)
    records = []
    for i in range(300):
        f = {"vec": ("float", [rng.uniform(-1e6, 1e6) for _ in range(4)]),
             "id": ("int64", [rng.choice([i, -i, 2 ** 62, -(2 ** 63), 127, 128, 16383, 16384])]),
             "blob": ("bytes", [bytes(rng.randrange(256) for _ in range(rng.randrange(300)))]),
             "seq": ("int64", [rng.randrange(-10, 10 ** 9) for _ in range(rng.randrange(6))]),
             "words": ("bytes", [b"w" * rng.randrange(200) for _ in range(rng.randrange(4))])}
        if rng.random() < 0.5:
            f["opt"] = ("float", [rng.random() for _ in range(rng.randrange(3))])
        records.append(wire.example(dict(rng.sample(list(f.items()), len(f)))))
    schema = infer_schema(records)
    table, dead = parse_examples(records, schema)
    assert dead is None
    for record, row in zip(records, table.to_pylist()):
        feats = Example.FromString(record).features.feature
        for name in schema.names:
            if name not in feats:
                assert row[name] is None
                continue
            kind = feats[name].WhichOneof("kind")
            expected = list(getattr(feats[name], kind).value)
            got = row[name] if isinstance(row[name], list) else [row[name]]
            assert got == expected, name


def test_infer_schema_needs_one_parsable_record():
    with pytest.raises(ValueError, match="none of the 1 sampled records parses"):
        infer_schema([b"\xff\xff"])


def test_empty_batch_and_empty_record():
    schema = pa.schema([("a", pa.float32())])
    table, dead = parse_examples([], schema)
    assert table.num_rows == 0 and table.schema == schema and dead is None
    table, dead = parse_examples([b""], schema)  # an empty Example: every feature missing
    assert table.to_pylist() == [{"a": None}] and dead is None

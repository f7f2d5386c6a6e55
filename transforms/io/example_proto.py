"""The tf.train.Example message classes and the Feature kinds, without TensorFlow.

The message classes (Example, Features, Feature, BytesList, FloatList, Int64List) are built
at import time from a hand-written descriptor whose field numbers are TensorFlow's public
ones, so records written by TensorFlow parse here and records written here parse there.
``RawExample`` is the same wire format with ``Features.feature`` a ``map<string, bytes>``
(no message per feature), for the decoder's fallback. Part of ``example_codec``.
"""
from __future__ import annotations

import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

BYTES, FLOAT, INT64 = "bytes_list", "float_list", "int64_list"
# the wire tag of each kind inside a Feature message: field number << 3 | 2 (length-delimited)
TAG = {BYTES: 0x0A, FLOAT: 0x12, INT64: 0x1A}
KIND_OF_TAG = {v: k for k, v in TAG.items()}
VALUE_TYPE = {FLOAT: pa.float32(), INT64: pa.int64(), BYTES: pa.binary()}


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
RawExample = _message_classes("titans.tensorflow_raw", raw=True)["Example"]


def kind_of(t: pa.DataType) -> str:
    """The Feature kind that holds a column of type ``t`` (a scalar or a list of scalars)."""
    v = t.value_type if is_list(t) else t
    if pa.types.is_floating(v):
        return FLOAT
    if pa.types.is_integer(v) or pa.types.is_boolean(v):
        return INT64
    if pa.types.is_binary(v) or pa.types.is_large_binary(v) or pa.types.is_string(v) \
            or pa.types.is_large_string(v):
        return BYTES
    raise ValueError(f"a column of type {t} cannot be a tf.train.Feature: use numbers, bools, "
                     f"strings or binary, or a list of those")


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


"""Arrow table -> serialized tf.train.Examples, one per row (part of ``example_codec``).

Built column by column with Arrow's binary kernels, with no Python object per row: each
feature's map entry is a row-wise join of byte pieces (headers from vectorised varints, the
packed values or byte strings), then the entries are joined into each row's Example.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.transforms.io.example_proto import BYTES, FLOAT, TAG, is_list, kind_of


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
    if is_list(arr.type):
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
                  _varint_array(feature_len), _const(bytes([TAG[kind]]), n), _varint_array(list_len)], n)
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

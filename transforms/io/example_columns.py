"""Decoded tf.Example values -> Arrow arrays of the schema's types (part of ``example_codec``).

``assemble`` turns one column's flat values and per-row counts, as the wire-format decoder
(``example_decode``) finds them, into an array of the field's type, null where a row has no
value; ``cast_values`` narrows int64/float32/bytes to the schema's value type and says which
values do not fit.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.transforms.io.example_proto import is_list


def assemble(values, count, valued, field: pa.Field, problems) -> pa.Array:
    """Flat values + per-row counts -> an array of ``field.type`` (null where not valued)."""
    t, n = field.type, len(count)
    value_type = t.value_type if is_list(t) else t
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    row_of_value = None
    if values.type != value_type:
        values, bad_values = cast_values(values, value_type)
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
    if is_list(t):
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


def cast_values(values: pa.Array, value_type: pa.DataType):
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


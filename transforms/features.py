"""Arrow table -> float32 feature matrix, with a reason for every row that cannot be scored.

Features are either one vector column (list / large_list / fixed_size_list of numbers)
or several scalar numeric columns concatenated in order. Rows with a null, a wrong
vector length or a non-finite value get a reason and a zero row in the matrix, so a
batch is always scored whole and the bad rows are routed to the dead letter later.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    columns: tuple[str, ...]
    dim: int
    vector: bool = False  # one list column, rather than `dim` scalar columns


def is_list_type(t: pa.DataType) -> bool:
    """A list, large list or fixed-size list type (the forms a vector column takes)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
        or pa.types.is_decimal(t)


def resolve_feature_spec(schema: pa.Schema, columns: tuple[str, ...],
                         first_vector_length: int | None = None) -> FeatureSpec:
    """Check ``columns`` against ``schema`` and work out the feature width.

    ``first_vector_length`` is the length of the first non-null vector, needed only for a
    variable-length list column (a fixed_size_list carries its width in the type).
    Raises ValueError saying what to fix.
    """
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(
            f"feature column(s) {missing} not in the input; its columns are {schema.names}. "
            f"Pass --feature-columns with one vector column or the scalar columns in order.")
    types = [schema.field(c).type for c in columns]
    if len(columns) == 1 and is_list_type(types[0]):
        value_type = types[0].value_type
        if not _is_number(value_type):
            raise ValueError(f"feature column {columns[0]!r} is a list of {value_type}, "
                             f"expected a list of numbers")
        if pa.types.is_fixed_size_list(types[0]):
            dim = types[0].list_size
        elif first_vector_length:
            dim = int(first_vector_length)
        else:
            raise ValueError(f"feature column {columns[0]!r} has no non-null vector to take "
                             f"the feature width from")
        return FeatureSpec(tuple(columns), dim, vector=True)
    bad = [f"{c} ({t})" for c, t in zip(columns, types) if not _is_number(t)]
    if bad:
        raise ValueError(f"feature columns must be numbers (or one list-of-numbers column); "
                         f"these are not: {bad}")
    return FeatureSpec(tuple(columns), len(columns))


def feature_matrix(table: pa.Table, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(matrix float32 [rows, dim], reasons) where reasons is None when every row is fine,
    else an object array with a string for each bad row and None for good ones."""
    n = table.num_rows
    missing = [c for c in spec.columns if c not in table.column_names]
    if missing:
        reasons = np.full(n, f"missing feature column(s) {missing}", dtype=object)
        return np.zeros((n, spec.dim), np.float32), reasons
    if spec.vector:
        return _from_vector(table.column(spec.columns[0]), n, spec.dim, spec.columns[0])
    return _from_scalars(table, spec, n)


def _from_vector(col, n: int, dim: int, name: str):
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == dim and arr.null_count == 0:
        good_len = np.ones(n, bool)  # the type guarantees every length
    else:
        lengths = pc.list_value_length(arr)  # null for a null vector
        good_len = np.asarray(pc.fill_null(pc.equal(lengths, dim), False))
    reasons = None
    if good_len.all():
        values = arr.flatten()
        matrix = _to_float32(values).reshape(n, dim)
    else:
        matrix = np.zeros((n, dim), np.float32)
        if good_len.any():
            matrix[good_len] = _to_float32(arr.filter(pa.array(good_len)).flatten()).reshape(-1, dim)
        reasons = np.full(n, None, dtype=object)
        for i in np.flatnonzero(~good_len):
            length = lengths[i].as_py()
            reasons[i] = (f"null feature vector in {name!r}" if length is None else
                          f"feature vector {name!r} has length {length}, expected {dim}")
    finite = _finite_rows(matrix)
    if not finite.all():
        reasons = reasons if reasons is not None else np.full(n, None, dtype=object)
        for i in np.flatnonzero(~finite):
            reasons[i] = f"null, NaN or inf value in feature vector {name!r}"
        matrix = _zero_rows(matrix, ~finite)
    return matrix, reasons


def _from_scalars(table: pa.Table, spec: FeatureSpec, n: int):
    matrix = np.empty((n, spec.dim), np.float32)
    for j, c in enumerate(spec.columns):
        matrix[:, j] = _to_float32(table.column(c))
    finite = _finite_rows(matrix)
    if finite.all():
        return matrix, None
    reasons = np.full(n, None, dtype=object)
    bad_rows = np.flatnonzero(~finite)
    for i in bad_rows:
        cols = [spec.columns[j] for j in np.flatnonzero(~np.isfinite(matrix[i]))]
        reasons[i] = f"null, NaN or inf in feature column(s) {cols}"
    return _zero_rows(matrix, ~finite), reasons


def _finite_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows without NaN/inf. A NaN or inf anywhere makes the row sum non-finite, and float32
    values cannot overflow a float64 sum, so one reduction replaces an elementwise check."""
    with np.errstate(invalid="ignore"):  # inf - inf is the point here
        return np.isfinite(matrix.sum(axis=1, dtype=np.float64))


def _zero_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix`` with ``rows`` zeroed; a copy, since a zero-copy view of Arrow memory is
    read-only (only batches with bad rows pay for it)."""
    return np.where(rows[:, None], np.float32(0.0), matrix)


def _to_float32(arr) -> np.ndarray:
    """Numbers -> float32 numpy; nulls become NaN so the finiteness check catches them."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.float32():
        arr = pc.cast(arr, pa.float32(), safe=False)
    return arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def as_tensor(matrix: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a feature matrix (Arrow buffers are read-only; the model
    only reads its input, so torch's warning about that does not apply)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(matrix)

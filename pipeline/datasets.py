"""In-process reads of a (small enough) Parquet dataset, and its seeded splits.

Shared by the training-side commands (`titans distill`, `titans calibrate`): they need a few
million rows in memory at most, so they read with pyarrow directly instead of starting a
pipeline. The input pattern, the schema of the first file, the feature columns and the
reasons a row is unusable are exactly those of `titans run`.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa

from titans.models.storage import is_url
from titans.transforms.features import (FeatureSpec, feature_matrix, first_vector_length,
                                        resolve_feature_spec)
from titans.transforms.parquet_io import (ParquetInput, conform, input_pattern, match_files,
                                          open_parquet)


@dataclasses.dataclass
class Dataset:
    """The usable rows of a Parquet dataset: features, labels and any extra columns asked for."""
    x: np.ndarray                       # float32 [rows, dim]
    features: FeatureSpec
    labels: np.ndarray | None           # int64 [rows], when a label column was given
    extra: dict[str, pa.ChunkedArray]   # requested extra columns, same rows as x
    files: list[str]
    rows_read: int
    dropped: dict[str, int]             # why rows were left out -> how many

    def describe(self) -> str:
        line = (f"read {self.rows_read:,} rows from {len(self.files)} file(s); "
                f"{len(self.x):,} usable")
        if self.dropped:
            why = ", ".join(f"{n:,} {reason}" for reason, n in self.dropped.items())
            line += f", {sum(self.dropped.values()):,} dropped ({why})"
        return line


def read_dataset(path: str, features: tuple[str, ...], label_column: str | None = None,
                 extra: dict[str, str] | None = None) -> Dataset:
    """Read every file matching ``path`` (file, directory or glob; local or URL) into memory.

    Only the needed columns are read, conformed to the first file's schema. Rows whose
    features are unusable (null, NaN, wrong length), whose label is null, or that do not fit
    the first file's schema are dropped and counted. ``extra`` maps a column to the flag that
    named it (for error messages). Raises ValueError saying what to fix.
    """
    files = match_files(input_pattern(path))
    schema = ParquetInput.from_files(files).schema
    extra = dict(extra or {})
    _require_columns(schema, features, label_column, extra)
    wanted = list(dict.fromkeys([*features, *([label_column] if label_column else []), *extra]))
    sub_schema = pa.schema([schema.field(c) for c in wanted])

    tables, rows_read, dropped = [], 0, {}
    for f in files:
        table = _read_columns(f, wanted)
        rows_read += table.num_rows
        good, bad, _ = conform(table, sub_schema)
        tables.append(good)
        if bad is not None:
            _count(dropped, "not fitting the first file's schema", bad.num_rows)
    table = pa.concat_tables(tables) if tables else sub_schema.empty_table()

    spec = resolve_feature_spec(schema, features, first_vector_length(table, features))
    x, reasons = feature_matrix(table, spec)
    keep = np.ones(table.num_rows, bool) if reasons is None else \
        np.array([r is None for r in reasons], bool)
    _count(dropped, "with unusable features", int((~keep).sum()))
    if label_column:
        has_label = ~np.asarray(table.column(label_column).is_null(), bool)
        _count(dropped, "with a null label", int((keep & ~has_label).sum()))
        keep &= has_label
    if not keep.all():
        table, x = table.filter(pa.array(keep)), x[keep]
    if len(x) == 0:
        raise ValueError(f"no usable rows in {path!r} ({rows_read:,} read; "
                         f"{_dropped_text(dropped)}); check the input, --feature-columns and "
                         f"--label-column")
    labels = None
    if label_column:
        labels = table.column(label_column).to_numpy().astype(np.int64)
    return Dataset(x, spec, labels, {c: table.column(c) for c in extra}, files, rows_read, dropped)


def _read_columns(path: str, wanted: list[str]) -> pa.Table:
    """The ``wanted`` columns this file has (conform fills the ones it lacks with nulls)."""
    try:
        pf = open_parquet(path)
        return pf.read(columns=[c for c in wanted if c in pf.schema_arrow.names])
    except Exception as e:  # noqa: BLE001 - a corrupt or unreadable file: say which
        raise ValueError(f"cannot read {path!r} as Parquet: {type(e).__name__}: {e}") from e


def _require_columns(schema: pa.Schema, features, label_column, extra: dict[str, str]) -> None:
    """Fail before reading any data when a named column is missing or of the wrong kind."""
    resolve_feature_spec(schema, features, 1)  # names and types; the width is worked out later
    if label_column:
        if label_column not in schema.names:
            raise ValueError(f"--label-column {label_column!r} is not in the input; its columns "
                             f"are {schema.names}")
        if not pa.types.is_integer(schema.field(label_column).type):
            raise ValueError(f"--label-column {label_column!r} must hold integer class ids "
                             f"0..K-1, but it is {schema.field(label_column).type}")
    for column, flag in extra.items():
        if column not in schema.names:
            raise ValueError(f"{flag} {column!r} is not in the input; its columns are "
                             f"{schema.names}")


def check_labels(labels: np.ndarray | None, num_classes: int, column: str | None) -> None:
    """Labels must be class ids in [0, num_classes), in the teacher's class order."""
    if labels is None or labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"--label-column {column!r} holds values from {lo} to {hi}, but the "
                         f"teacher has {num_classes} classes: labels must be class ids "
                         f"0..{num_classes - 1} in the teacher's class order")


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) sorted row indices: a seeded random ``fraction`` of the ``n`` rows goes
    second (round(fraction * n) rows, at least 1 and at most n - 1 when fraction > 0)."""
    from sklearn.model_selection import train_test_split

    n_second = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_second = min(max(n_second, 1), n - 1)
    if n_second == 0:
        return np.arange(n), np.arange(0)
    first, second = train_test_split(np.arange(n), test_size=n_second, random_state=seed)
    return np.sort(first), np.sort(second)


def check_output_path(path: str, flag: str) -> None:
    """A local output's directory must exist (fail now, not after minutes of work)."""
    if is_url(path):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {path!r}: directory {directory!r} does not exist; create it "
                         f"or choose another path")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; give a file path")


def _count(dropped: dict, reason: str, n: int) -> None:
    if n:
        dropped[reason] = dropped.get(reason, 0) + n


def _dropped_text(dropped: dict) -> str:
    return ", ".join(f"{n:,} {r}" for r, n in dropped.items()) or "none dropped"

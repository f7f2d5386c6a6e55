"""In-process reads of a (small enough) dataset, and its seeded splits.

Shared by the training-side commands (`titans distill`, `titans calibrate`): they need a few
million rows in memory at most, so they read without starting a pipeline. The input (Parquet
or TFRecord, see titans.transforms.io.inputs), its unified schema, the features (columns,
images, token sequences) and the reasons a row is unusable are exactly those of `titans run`.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa

from titans.transforms.io.storage import is_url
from titans.transforms.features import (ImageSpec, TokenSpec, feature_matrix,
                                        resolve_feature_spec, resolve_features)
from titans.transforms.io.inputs import open_input


@dataclasses.dataclass
class Dataset:
    """The usable rows of a dataset: features, labels and any extra columns asked for."""
    x: np.ndarray                       # the models' input: float32 [rows, ...] or int64 tokens
    features: object                    # FeatureSpec, ImageSpec or TokenSpec
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


def data_features(args):
    """The features the flags name: an ImageSpec, a TokenSpec or the feature column names."""
    if getattr(args, "image_column", None):
        return ImageSpec(args.image_column, args.image_mode, args.image_size, args.image_mean,
                         args.image_std)
    if getattr(args, "token_column", None):
        return TokenSpec(args.token_column, args.pad_id, args.max_length, args.overflow)
    return tuple(c.strip() for c in args.feature_columns.split(",") if c.strip())


def read_dataset(path: str, features, label_column: str | None = None,
                 extra: dict[str, str] | None = None, fmt: str = "auto") -> Dataset:
    """Read every file matching ``path`` (file, directory or glob; local or URL; Parquet or
    TFRecord, ``fmt`` as --format) into memory.

    ``features``: the feature column names, or an ImageSpec / TokenSpec
    (titans.transforms.features), as `titans run` takes them. Only the needed columns are
    read, conformed to the input's unified schema. Rows whose features are unusable (null,
    NaN, wrong length, an image that does not decode), whose label is null, or that do not
    fit the schema are dropped and counted. ``extra`` maps a column to the flag that named it
    (for error messages). Raises ValueError saying what to fix.
    """
    source = open_input(path, fmt)
    image = features if isinstance(features, ImageSpec) else None
    tokens = features if isinstance(features, TokenSpec) else None
    columns = () if image or tokens else tuple(features)
    extra = dict(extra or {})
    _require_columns(source.schema, columns, label_column, extra)
    spec = resolve_features(source.schema, source.sample(256, 0), columns, image, tokens)
    wanted = list(dict.fromkeys([*spec.columns, *([label_column] if label_column else []), *extra]))
    table = source.read_all(wanted)
    rows_read, dropped = table.num_rows, {}

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
    return Dataset(x, spec, labels, {c: table.column(c) for c in extra}, list(source.files),
                   rows_read, dropped)


def _require_columns(schema: pa.Schema, features, label_column, extra: dict[str, str]) -> None:
    """Fail before reading any data when a named column is missing or of the wrong kind."""
    if features:
        resolve_feature_spec(schema, features, 1)  # names and types; the width comes later
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

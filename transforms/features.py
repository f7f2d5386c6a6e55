"""Arrow table -> the models' input array, with a reason for every row that cannot be scored.

Three kinds of features, one spec class each, all with the same verbs (``matrix``,
``example_input``, ``describe``):
  * ``FeatureSpec``: one vector column (list / large_list / fixed_size_list of numbers) or
    several scalar numeric columns concatenated in order -> float32 [B, dim];
  * ``ImageSpec``: encoded PNG/JPEG bytes -> float32 [B, C, H, W] (``images.decode_images``);
  * ``TokenSpec``: token-id sequences -> int64 [B, L], padded (``tokens.token_matrix``).
Rows with a null, a wrong length, a non-finite value or bytes that do not decode get a
reason and a zeroed (or padded) slot, so a batch is always scored whole and the bad rows are
routed to the dead letter later.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from titans.transforms.columns import one_array

# Decoded images per batch, at most (float32 bytes): a model's batch of images is capped by
# bytes, not rows, so memory is bounded whatever the image size (256 MiB: 85k 28x28 grayscale
# images, 445 224x224 RGB ones; both far past the size where a bigger batch runs faster).
IMAGE_BATCH_BYTES = 256 << 20
# ... decoded a slice at a time within a batch, overlapped with the model's forward
IMAGE_SLICE_BYTES = 32 << 20
# ... and fed to a model on the CPU this much at a time (at least 64 rows): a conv net's
# activations of a whole slice of small images (10k 28x28: ~500 MB after a 16-channel conv)
# fall out of cache; a small CNN took 2.1 s on 10k digits in one forward, 1.4 s in chunks
# of 256-512 (one thread)
IMAGE_FORWARD_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    columns: tuple[str, ...]
    dim: int
    vector: bool = False  # one list column, rather than `dim` scalar columns

    def matrix(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 [rows, dim], reasons): reasons is None when every row is fine, else an
        object array with a string for each bad row and None for good ones."""
        n = table.num_rows
        missing = [c for c in self.columns if c not in table.column_names]
        if missing:
            reasons = np.full(n, f"missing feature column(s) {missing}", dtype=object)
            return np.zeros((n, self.dim), np.float32), reasons
        if self.vector:
            return _from_vector(table.column(self.columns[0]), n, self.dim, self.columns[0])
        return _from_scalars(table, self, n)

    def example_input(self, rows: int = 2) -> np.ndarray:
        return np.zeros((rows, self.dim), np.float32)

    def batch_rows(self, requested: int) -> int:
        return requested

    def slice_rows(self, rows: int) -> int:
        return rows

    def describe(self) -> str:
        return f"float32 [batch, {self.dim}] input (the width of --feature-columns)"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """PNG/JPEG bytes in ``column`` -> float32 [B, C, H, W]; ``shape`` (C, H, W) is worked out
    at launch (``resolve_image_spec``) from --image-size or the sampled images."""
    column: str
    mode: str = "RGB"
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    shape: tuple[int, int, int] | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def matrix(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
        from titans.transforms.images import decode_images

        if self.column not in table.column_names:
            n = table.num_rows
            return (np.zeros((n, *self.shape), np.float32),
                    np.full(n, f"missing image column {self.column!r}", dtype=object))
        # the launch's shape is the one expected: decoded straight into the batch
        expect = None if self.size or self.shape is None else self.shape[1:]
        return decode_images(table.column(self.column), self.mode, self.size, self.mean, self.std,
                             expect=expect)

    def example_input(self, rows: int = 2) -> np.ndarray:
        return np.zeros((rows, *self.shape), np.float32)

    def batch_rows(self, requested: int, max_bytes: int | None = None) -> int:
        """``requested`` rows, or fewer so that a decoded batch holds at most ``max_bytes``
        (default IMAGE_BATCH_BYTES) of float32: 65,536 224x224 RGB images would be 39 GB."""
        per_row = 4 * int(np.prod(self.shape))
        return max(1, min(requested, (max_bytes or IMAGE_BATCH_BYTES) // per_row))

    def slice_rows(self, rows: int) -> int:
        """Rows of a batch decoded at a time: IMAGE_SLICE_BYTES of float32, so the next
        slice is decoded while the model runs on this one (transforms/overlap.py)."""
        return self.batch_rows(rows, IMAGE_SLICE_BYTES)

    def forward_rows(self, rows: int) -> int:
        """Rows per forward pass on a CPU: ``rows``, or fewer so that the input holds at most
        IMAGE_FORWARD_BYTES (at least 64 rows, so large images keep a real batch)."""
        per_row = 4 * int(np.prod(self.shape))
        return max(1, min(rows, max(64, IMAGE_FORWARD_BYTES // per_row)))

    def describe(self) -> str:
        c, h, w = self.shape
        return f"float32 [batch, {c}, {h}, {w}] input (images in {self.column!r}, mode {self.mode})"


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Token ids in ``column`` (a list of integers) -> int64 [B, L], L the batch's longest
    sequence (at most ``max_length``), padded with ``pad_id``."""
    column: str
    pad_id: int = 0
    max_length: int | None = None
    overflow: str = "dead_letter"  # or "truncate"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def dim(self) -> None:  # no fixed width: a sequence model reads any length
        return None

    def matrix(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
        from titans.transforms.tokens import token_matrix

        if self.column not in table.column_names:
            n = table.num_rows
            return (np.full((n, 1), self.pad_id, np.int64),
                    np.full(n, f"missing token column {self.column!r}", dtype=object))
        return token_matrix(table.column(self.column), self.pad_id, self.max_length, self.overflow)

    def example_input(self, rows: int = 2) -> np.ndarray:
        return np.full((rows, 4), self.pad_id, np.int64)

    def batch_rows(self, requested: int) -> int:
        return requested

    def slice_rows(self, rows: int) -> int:
        return rows

    def describe(self) -> str:
        cap = f", at most {self.max_length}" if self.max_length else ""
        return f"int64 [batch, length{cap}] input (token ids in {self.column!r}, padded with {self.pad_id})"


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


def feature_matrix(table: pa.Table, spec) -> tuple[np.ndarray, np.ndarray | None]:
    """The models' input for ``table`` and a reason per bad row (None when all are fine)."""
    return spec.matrix(table)


def first_vector_length(sample: pa.Table, columns) -> int | None:
    """Length of the first non-null vector of a variable-length list feature column."""
    if len(columns) != 1 or columns[0] not in sample.column_names:
        return None
    col = sample.column(columns[0])
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None
    for v in col.drop_null().slice(0, 1).to_pylist():
        return len(v)
    return None


def resolve_features(schema: pa.Schema, sample: pa.Table, columns: tuple[str, ...],
                     image: "ImageSpec | None" = None, tokens: "TokenSpec | None" = None):
    """The spec of the models' input: images or token sequences when asked for, else the
    feature columns; checked against ``schema`` and the ``sample`` rows."""
    if image is not None:
        return resolve_image_spec(schema, image, sample)
    if tokens is not None:
        return resolve_token_spec(schema, tokens)
    return resolve_feature_spec(schema, tuple(columns), first_vector_length(sample, columns))


def resolve_image_spec(schema: pa.Schema, spec: ImageSpec, sample: pa.Table) -> ImageSpec:
    """``spec`` with its input shape, checked against the schema and the sampled images."""
    if spec.column not in schema.names:
        raise ValueError(f"--image-column {spec.column!r} is not in the input; its columns are "
                         f"{schema.names}")
    t = schema.field(spec.column).type
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)):
        raise ValueError(f"--image-column {spec.column!r} must hold encoded images (bytes), "
                         f"but it is {t}")
    channels = 3 if spec.mode == "RGB" else 1
    if spec.size:
        return dataclasses.replace(spec, shape=(channels, *spec.size))
    from titans.transforms.images import image_sizes

    # the most common size, from the headers only: the sample is decoded once, later, by the
    # launch checks (decoding it here too cost as much as the checks themselves)
    sizes = [s for s in image_sizes(sample.column(spec.column)) if s is not None] \
        if sample.num_rows else []
    if not sizes:
        raise ValueError(f"none of the {sample.num_rows:,} sampled images in {spec.column!r} "
                         f"is an image Pillow can read (PNG, JPEG, ...); check --image-column")
    h, w = max(set(sizes), key=sizes.count)
    return dataclasses.replace(spec, shape=(channels, h, w))


def resolve_token_spec(schema: pa.Schema, spec: TokenSpec) -> TokenSpec:
    if spec.column not in schema.names:
        raise ValueError(f"--token-column {spec.column!r} is not in the input; its columns are "
                         f"{schema.names}")
    t = schema.field(spec.column).type
    if not (is_list_type(t) and pa.types.is_integer(t.value_type)):
        raise ValueError(f"--token-column {spec.column!r} must be a list of integer token ids, "
                         f"but it is {t}")
    return spec


def _from_vector(col, n: int, dim: int, name: str):
    arr = one_array(col)
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
    """Rows without NaN/inf. A NaN or inf anywhere makes a sum non-finite, so one reduction
    replaces an elementwise check: first over the whole batch in float32 (the common case,
    3.5x faster than in float64), and only if that is not finite (a bad value, or finite
    values whose float32 sum overflows) row by row in float64, which float32 values cannot
    overflow."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is the point here
        if np.isfinite(matrix.sum()):
            return np.ones(len(matrix), bool)
        return np.isfinite(matrix.sum(axis=1, dtype=np.float64))


def _zero_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix`` with ``rows`` zeroed; a copy, since a zero-copy view of Arrow memory is
    read-only (only batches with bad rows pay for it)."""
    return np.where(rows[:, None], np.float32(0.0), matrix)


def _to_float32(arr) -> np.ndarray:
    """Numbers -> float32 numpy; nulls become NaN so the finiteness check catches them."""
    arr = one_array(arr)
    if arr.type != pa.float32():
        arr = pc.cast(arr, pa.float32(), safe=False)
    return arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def as_tensor(matrix: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a feature matrix (Arrow buffers are read-only; the model
    only reads its input, so torch's warning about that does not apply)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(matrix)

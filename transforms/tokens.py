"""Token-id sequences (a list<int> column) -> an int64 matrix [B, L] padded to the batch.

The same contract as ``features.feature_matrix``: a matrix for the whole batch and a reason
for every row that cannot be used, whose row is left as padding. Built from the column's
offsets and values with numpy index arithmetic, with no Python loop over rows.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.transforms.columns import one_array

DEAD_LETTER, TRUNCATE = "dead_letter", "truncate"


def token_matrix(column, pad_id: int = 0, max_length: int | None = None,
                 overflow: str = DEAD_LETTER) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 [B, L], reasons or None): row i holds sequence i, then ``pad_id``.

    L is the longest usable sequence of the batch (at least 1), capped at ``max_length``.
    A longer sequence is cut to ``max_length`` with ``overflow="truncate"``, or gets a
    reason with ``overflow="dead_letter"``. A null sequence, or one with a null token,
    gets a reason. Reasons: an object array with a string for each bad row and None for
    good ones, or None when every row is fine.
    """
    if overflow not in (DEAD_LETTER, TRUNCATE):
        raise ValueError(f"overflow must be 'dead_letter' or 'truncate', not {overflow!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    arr = one_array(column)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            or not pa.types.is_integer(t.value_type):
        raise ValueError(f"a token column is a list of integers, not {t}")
    n = len(arr)
    if pa.types.is_fixed_size_list(t):
        starts = (np.arange(n, dtype=np.int64) + arr.offset) * t.list_size
        lengths = np.full(n, t.list_size, np.int64)
    else:
        offsets = np.asarray(arr.offsets, np.int64)
        starts, lengths = offsets[:-1], np.diff(offsets)
    valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, bool)
    values = arr.values
    reasons = None

    def reason(rows, text):
        nonlocal reasons
        if reasons is None:
            reasons = np.full(n, None, dtype=object)
        for i in rows:
            reasons[i] = text(i) if callable(text) else text

    if not valid.all():
        reason(np.flatnonzero(~valid), "null token sequence")
    lengths = np.where(valid, lengths, 0)
    if values.null_count:  # a null token inside a sequence: count them per row
        null_token = np.concatenate([[0], np.cumsum(~np.asarray(values.is_valid()))])
        holes = valid & (null_token[starts + lengths] - null_token[starts] > 0)
        reason(np.flatnonzero(holes), "null token in the sequence")
        values = pc.fill_null(values, pad_id)
        valid = valid & ~holes
        lengths = np.where(valid, lengths, 0)
    if max_length is not None and overflow == DEAD_LETTER:
        long = lengths > max_length
        if long.any():
            reason(np.flatnonzero(long),
                   lambda i: f"token sequence has {lengths[i]} tokens, more than max_length {max_length}")
            lengths = np.where(long, 0, lengths)
    keep = lengths if max_length is None else np.minimum(lengths, max_length)
    width = max(1, int(keep.max()) if n else 1)
    matrix = np.full((n, width), pad_id, np.int64)
    total = int(keep.sum())
    if total:
        ids = values.cast(pa.int64()).to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(n), keep)
        first = np.cumsum(keep) - keep  # where each row's tokens start in the output order
        cols = np.arange(total) - np.repeat(first, keep)
        matrix[rows, cols] = ids[np.repeat(starts, keep) + cols]
    return matrix, reasons

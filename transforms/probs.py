"""A column of class probabilities (what `titans teacher-label` writes, ``teacher_probs``)
-> float32 [rows, K], checked; `titans distill --teacher-probs` and `titans label`'s
teacher-labeled sample both read one."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from titans.transforms.features import FeatureSpec, feature_matrix, is_list_type


def probs_from_column(column: pa.ChunkedArray, name: str, flag: str | None = None) -> np.ndarray:
    """A list column of K probabilities per row -> float32 [rows, K]; ValueError if it is
    not one. ``flag`` names the column in messages (default: ``--teacher-probs NAME``)."""
    flag = f"--teacher-probs {name!r}" if flag is None else flag
    t = column.type
    if not is_list_type(t) \
            or not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise ValueError(f"{flag} must be a list of K probabilities per row (as `titans "
                         f"teacher-label` writes it), but it is {t}")
    first = column.drop_null().slice(0, 1).to_pylist()
    k = len(first[0]) if first else 0
    if k < 2:
        raise ValueError(f"{flag} must hold at least 2 probabilities per row; its first row "
                         f"has {k}")
    probs, reasons = feature_matrix(pa.table({name: column}), FeatureSpec((name,), k, vector=True))
    if reasons is not None:
        bad = [r for r in reasons if r is not None]
        raise ValueError(f"{flag}: {len(bad):,} row(s) do not hold {k} finite numbers like the "
                         f"first row (first problem: {bad[0]}); every row needs the teacher's "
                         f"K probabilities")
    sums = probs.sum(axis=1, dtype=np.float64)
    wrong = np.flatnonzero((probs < 0).any(axis=1) | (np.abs(sums - 1.0) > 1e-3))
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"{flag} must hold probabilities (non-negative, summing to 1 per row), "
                         f"but {wrong.size:,} row(s) do not (e.g. a row summing to {sums[i]:.4g}); "
                         f"if it holds logits, store their softmax")
    return probs


__all__ = ["probs_from_column"]

"""The pool of teacher-labelled rows a ``--state`` directory keeps, and its cap.

The pool is one Arrow table (``pool.parquet`` in a generation folder). Three columns are the
store's: ``run_id`` (string, the run that added the row), ``run_index`` (int64, that run's
place in the lineage: larger is newer) and ``origin`` (string: ``sample``, ``hard`` or
``audit``, why the teacher saw the row). Every other column (the features, the teacher's
probabilities) is the label job's, carried as is.

The cap (``cap``), the rule a user can count on:
  1. at most ``max_rows`` rows are kept; a pool within the cap is kept whole;
  2. every run is represented: each keeps at least ``floor = max_rows // (2 * runs)`` rows
     (all of its rows if it has fewer), so half the cap is shared equally by the runs;
  3. the rest of the cap goes to the newest runs first, each keeping all its rows until
     the cap is reached: recent runs are kept whole, older ones thinned to the floor;
  4. within a run the rows kept are a uniform random subset, seeded by the run's id (so the
     mix of sample / hard / audit rows is the run's, in expectation, and a cap is
     repeatable); rows keep their order;
  5. only when there are more runs than ``max_rows`` do whole runs go: the oldest ones,
     the newest ``max_rows`` runs keeping one row each.
Arrow in, Arrow out: one ``take`` of row numbers, no Python object per row.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

RUN_ID, RUN_INDEX, ORIGIN = "run_id", "run_index", "origin"
STORE_COLUMNS = (RUN_ID, RUN_INDEX, ORIGIN)
ORIGINS = ("sample", "hard", "audit")


def check_columns(pool: pa.Table) -> None:
    """ValueError unless ``pool`` has the store's three columns with their types."""
    want = {RUN_ID: pa.string(), RUN_INDEX: pa.int64(), ORIGIN: pa.string()}
    wrong = [f"{name} ({pool.schema.field(name).type if name in pool.column_names else 'missing'},"
             f" wanted {t})" for name, t in want.items()
             if name not in pool.column_names or pool.schema.field(name).type != t]
    wrong += [f"{name} (has nulls)" for name in STORE_COLUMNS
              if name in pool.column_names and pool.column(name).null_count]
    if wrong:
        raise ValueError(f"a state pool needs the columns run_id string, run_index int64, "
                         f"origin string, without nulls: {', '.join(wrong)}")


def quotas(counts: np.ndarray, max_rows: int) -> np.ndarray:
    """Rows kept per run, for ``counts`` rows per run ordered oldest -> newest (rules 1-3, 5)."""
    counts = np.asarray(counts, dtype=np.int64)
    keep = np.zeros_like(counts)
    if max_rows <= 0 or not len(counts):
        return keep
    if counts.sum() <= max_rows:
        return counts.copy()
    runs = len(counts)
    if runs > max_rows:  # rule 5: only the newest max_rows runs can keep a row each
        keep[runs - max_rows:] = np.minimum(counts[runs - max_rows:], 1)
        floor = 0
    else:
        floor = max(1, max_rows // (2 * runs))
        keep = np.minimum(counts, floor)
    left = max_rows - int(keep.sum())
    for r in range(runs - 1, -1, -1):  # rule 3: newest first
        if left <= 0:
            break
        extra = min(int(counts[r] - keep[r]), left)
        keep[r] += extra
        left -= extra
    return keep


def _seed(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(run_id.encode("utf-8")).digest()[:8], "little")


def cap(pool: pa.Table, max_rows: int) -> pa.Table:
    """``pool`` cut to at most ``max_rows`` rows by the rule in this module's docstring."""
    check_columns(pool)
    if max_rows <= 0:
        return pool.slice(0, 0)
    if pool.num_rows <= max_rows:
        return pool
    index = pool.column(RUN_INDEX).to_numpy(zero_copy_only=False)
    runs, inverse, counts = np.unique(index, return_inverse=True, return_counts=True)
    keep = quotas(counts, max_rows)
    run_ids = pool.column(RUN_ID)
    order = np.argsort(inverse, kind="stable")          # row numbers grouped by run
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = []
    for r in range(len(runs)):
        rows = order[starts[r]:starts[r] + counts[r]]
        if keep[r] == counts[r]:
            chosen.append(rows)
        elif keep[r] > 0:
            rng = np.random.default_rng(_seed(str(run_ids[int(rows[0])])))
            chosen.append(np.sort(rng.choice(rows, size=int(keep[r]), replace=False)))
    taken = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return pool.take(pa.array(taken, pa.int64()))


def runs_in(pool: pa.Table | None) -> int:
    """How many runs have rows in ``pool``."""
    if pool is None or not pool.num_rows:
        return 0
    return len(np.unique(pool.column(RUN_INDEX).to_numpy(zero_copy_only=False)))

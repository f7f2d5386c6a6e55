"""One `--state` run's worth of data for the store's tests, importable without torch (the
writer processes that tests/test_state_store.py kills import only this and the store)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from titans.pipeline.state import pool as pool_rule
from titans.pipeline.state.store import State, StateDir

__all__ = ["SCHEMA", "TEACHER", "StateDir", "entry", "rows", "write_run"]

TEACHER = {"path": "gs://models/teacher.pt", "sha256": "ab" * 32}
SCHEMA = {"features": "fixed_size_list<float>[8]", "classes": 4}


def rows(run: int, n: int, seed: int = 0) -> pa.Table:
    """``n`` teacher-labelled rows of run ``run``: the store's columns and a feature vector."""
    rng = np.random.default_rng(seed * 1000 + run)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return pa.table({
        "run_id": pa.array([f"run-{run}"] * n), "run_index": pa.array([run] * n, pa.int64()),
        "origin": pa.array(rng.choice(pool_rule.ORIGINS, n)),
        "row_id": pa.array(run * 1_000_000 + np.arange(n), pa.int64()),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
        "teacher_probs": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.dirichlet(np.ones(4), n).astype(np.float32).ravel()), 4)})


def entry(run: int) -> dict:
    return {"run_id": f"run-{run}", "time": f"2026-12-{run + 1:02d}T03:00:00Z", "rows": 1000,
            "teacher_rows": {"sample": 100, "hard": 50, "audit": 5, "checks": 3, "total": 158},
            "teacher_share": 0.5 / (run + 1), "threshold": 0.2 + run / 100, "eps": 0.05,
            "delta": 0.1, "fresh_agreement": None if run == 0 else 0.9,
            "drift": {"agreement_drop": 0.01, "ks_statistic": 0.05, "ks_pvalue": 0.4,
                      "shifted": False}, "phase_seconds": {"sample": 1.0, "cascade": 2.0}}


def write_run(sd: StateDir, base: State | None, run: int, student_file: str, new_rows: int = 200,
              cap: int = 500):
    """One run's generation on ``base`` (not committed)."""
    old = base.read_pool() if base is not None else None
    pool = rows(run, new_rows) if old is None else pa.concat_tables([old, rows(run, new_rows)])
    return sd.write_generation(
        base, student_file=student_file, student={"arch": "MLP 8-16-4", "config": {"hidden": [16]}},
        lineage_entry={"run_id": f"run-{run}", "kept": "cold" if base is None else "challenger"},
        pool=pool, pool_cap=cap, history_entry=entry(run), teacher=TEACHER, feature_schema=SCHEMA)

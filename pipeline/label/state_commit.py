"""`titans label --state`, after the run: this run's line of the state's history
(``history_entry``, added to report.json by the cascade's last step) and, after _SUCCESS, the
commit: today's teacher-labelled rows (the fresh sample and the cascade's hard rows) join the
pool and a new generation is written and made current (``commit``). A run that dies before
leaves the state as it was. The run's phases are ``pipeline/label/continual.py``.
"""
from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from titans.pipeline.label.continual import FRESH_SPLIT, PROBS, Continual, model_columns
from titans.pipeline.label.distil import Split
from titans.transforms.io import storage


def history_entry(c, cont: Continual, report: dict, student: dict, cal: dict,
                  student_sha256: str) -> dict:
    """This run's entry of the state's history, from the whole job's report."""
    phases = report.get("phases", {})
    cont_facts = student.get("continual") or {}
    drift = cont_facts.get("drift")
    parent = cont.base.meta.get("student", {}).get("sha256") if cont.warm else None
    return {
        "run_id": report.get("label_run_id"),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": report["rows_in"], "mode": "warm" if cont.warm else "cold",
        "teacher_rows": {"sample": report.get("rows_prelabeled", 0),
                         "hard": report.get("rows_hard", 0),
                         "audit": report.get("rows_audited", 0),
                         "checks": report.get("rows_teacher_checks", 0),
                         "total": report.get("rows_to_teacher", 0)},
        "teacher_share": report.get("rows_to_teacher_share"),
        "sample_rows": report.get("rows_sample_drawn"),
        "split_rows": student.get("split_rows"),
        # what the fresh sample was sized on: the deferral of the other rows it predicted
        "predicted_deferral": (cont.sizes or {}).get("predicted_deferral"),
        "threshold": cal.get("threshold"), "rule": cal.get("rule"),
        "guarantee": cal.get("guarantee_text"), "certified": cal.get("certified"),
        "eps": c.eps, "delta": None if c.eps is None else c.level,
        "fresh_agreement": None if drift is None else drift["fresh_agreement"],
        "student_agreement": cont.heldout_agreement,
        "audit_disagreement": report.get("audit_disagreement_estimate"),
        "drift": drift,
        "student": {"sha256": student_sha256, "parent_sha256": parent,
                    "kept": cont_facts.get("kept", "cold"), "arch": student.get("arch")},
        "phase_seconds": {k: v.get("seconds") for k, v in phases.items()
                          if isinstance(v, dict)},
        "job_wall_seconds": report.get("job_wall_seconds"),
    }


def pool_rows(c, plan, s, split: Split, jd, run_id: str, run_index: int) -> pa.Table:
    """Today's teacher-labelled rows for the pool: every labeled fresh row (origin sample,
    with its part of the split) and the cascade's hard rows (origin hard, the teacher's
    probabilities rebuilt from its label and confidence: labels/ keeps no more)."""
    cols = model_columns(plan.features)
    k = plan.num_classes
    probs_type = pa.list_(pa.float32(), k)
    part = np.full(len(s.x), "train", dtype=object)
    part[split.val], part[split.cal] = "val", "cal"
    fresh = s.table.select(cols)
    fresh = fresh.append_column(PROBS, pa.FixedSizeListArray.from_arrays(
        pa.array(s.probs.astype(np.float32).ravel()), k).cast(probs_type))
    fresh = fresh.append_column(FRESH_SPLIT, pa.array(part.tolist(), pa.string()))
    fresh = _store_columns(fresh, run_id, run_index, "sample")
    tables = [fresh]
    hard = _hard_rows(c, plan, jd, cols)
    if hard is not None and hard.num_rows:
        label = hard.column(plan.columns.label).to_numpy()
        conf = hard.column(plan.columns.confidence).to_numpy().astype(np.float32)
        probs = np.repeat(((1 - conf) / (k - 1))[:, None], k, axis=1)
        probs[np.arange(len(label)), label] = conf
        h = hard.select(cols).append_column(PROBS, pa.FixedSizeListArray.from_arrays(
            pa.array(probs.astype(np.float32).ravel()), k).cast(probs_type))
        h = h.append_column(FRESH_SPLIT, pa.nulls(h.num_rows, pa.string()))
        tables.append(_store_columns(h, run_id, run_index, "hard"))
    return pa.concat_tables([t.cast(tables[0].schema) for t in tables])


def _store_columns(t: pa.Table, run_id: str, run_index: int, origin: str) -> pa.Table:
    n = t.num_rows
    t = t.append_column("run_id", pa.array([run_id] * n, pa.string()))
    t = t.append_column("run_index", pa.array(np.full(n, run_index, np.int64)))
    return t.append_column("origin", pa.array([origin] * n, pa.string()))


def _hard_rows(c, plan, jd, cols: list[str]) -> pa.Table | None:
    """The rows the teacher labeled in the cascade (source 'teacher', outside the sample),
    read from labels/ (Parquet output only; a TFRecord output adds no hard rows)."""
    if c.job.output_format != "parquet":
        return None
    src = plan.columns.source
    paths = [p for p in storage.list_under(jd.path("labels"))
             if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("sample-")]
    want = cols + [plan.columns.label, plan.columns.confidence, src]
    parts = []
    for p in paths:
        t = pq.read_table(storage.open_read(p), columns=want)
        parts.append(t.filter(pc.equal(t.column(src), "teacher")))
    parts = [t for t in parts if t.num_rows]
    return pa.concat_tables(parts) if parts else None


def commit(c, plan, s, split: Split, jd, cont: Continual, report: dict) -> object:
    """After _SUCCESS: the pool grows by today's teacher rows, a new generation is written
    in full and made current (only if the state is still the generation this run began
    from). Returns the new State."""
    from titans.pipeline.content_keys import model_key

    entry = (report.get("state") or {}).get("entry")
    if entry is None:
        raise ValueError(f"{jd.path('report.json')} has no state entry; rerun the job")
    run_index = len(cont.history)
    new = pool_rows(c, plan, s, split, jd, entry["run_id"], run_index)
    old = cont.pool()  # read by the run's start, not again
    if old is not None and old.num_rows:
        pool = pa.concat_tables([old.select(new.schema.names).cast(new.schema), new])
    else:
        pool = new
    student_sha = model_key(jd.student)["sha256"]
    student = {"arch": entry["student"].get("arch"),
               "config": {"rule": entry.get("rule"), "arch": entry["student"].get("arch")}}
    lineage = {"run_id": entry["run_id"], "student_sha256": student_sha,
               "parent_sha256": entry["student"]["parent_sha256"],
               "kept": entry["student"]["kept"]}
    pending = cont.store.write_generation(
        cont.base, student_file=jd.student, student=student, lineage_entry=lineage,
        pool=pool, pool_cap=cont.pool_rows, history_entry=entry, teacher=cont.teacher,
        feature_schema=cont.schema)
    return cont.store.commit(pending)


__all__ = ["history_entry", "pool_rows", "commit"]

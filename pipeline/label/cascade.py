"""Phase 5, cascade: the cascade pipeline over the input *without* the sample rows the
teacher labeled (``JobConfig.skip_rows``); those rows go into labels/ as they are
(``RunConfig.prelabeled``, files ``sample-*``, source 'teacher') and into the same report
-> DIR/labels/, dead_letter/, report.json, report.png, _SUCCESS.

A sample row the teacher could not label (bad features, a teacher failure) is not left out:
the cascade labels or dead-letters it like any other row, so every input row ends up exactly
once in labels/ or dead_letter/. Its plan is `titans run`'s (``plan_run``) on the launch
plan's input, features and teacher (``Launch.resolved``): only the new student is loaded and
checked.
"""
from __future__ import annotations

import dataclasses
import time

import pyarrow as pa

from titans.models.loading import ModelRef
from titans.pipeline.label.launch import CHECK_ROWS, job_config
from titans.pipeline.label.sample import write_parquet
from titans.pipeline.plan import CascadePlan, RunConfig, plan_run


@dataclasses.dataclass(frozen=True)
class LabelPlan(CascadePlan):
    """The cascade's plan, whose facts (what report.json says besides the counts) also cover
    the phases before it."""
    label_facts: dict = dataclasses.field(default_factory=dict)

    def facts(self) -> dict:
        return {**super().facts(), **self.label_facts}


def run(c, launch, s, student: dict, cal: dict, phases: dict, jd, beam_args: list[str],
        lock=None) -> dict:
    """The cascade job under DIR's lock; its report."""
    from titans.pipeline.graphs.cascade import build_pipeline
    from titans.pipeline.job import run_job

    table, n, cols = s.table, s.table.num_rows, launch.columns
    out = table.select(launch.source.schema.names + [cols.label, cols.confidence])
    out = out.append_column(cols.deferral_score, pa.nulls(n, pa.float32()))
    out = out.append_column(cols.source, pa.array(["teacher"] * n, pa.string()))
    write_parquet(jd.prelabeled, out.cast(launch.output_schema))
    config = job_config(
        RunConfig, c.job, student=ModelRef(jd.student, device=c.student_device),
        overwrite=True,  # removes a failed attempt's labels/, dead_letter/ and report only
        sample_rows=CHECK_ROWS, skip_rows=s.skip, calibration=jd.calibration,
        audit_rate=c.audit_rate, prelabeled=jd.prelabeled)
    plan = plan_run(config, resolved=launch.resolved())
    facts = {
        "mode": "label", "prelabeled": jd.prelabeled, "rows_sample_drawn": launch.sample_rows,
        "max_disagreement": c.eps, "delta": None if c.eps is None else c.level,
        "guarantee": cal["guarantee_text"], "certified": cal["certified"],
        "student_arch": student["arch"], "student_flops_per_row": student["flops_per_row"],
        "teacher_flops_per_row": launch.teacher_flops, "compute_proxy": launch.proxy,
        "student_budget": c.student_budget,
        "student_size_vs_teacher": {
            "flops": student["flops_share"],
            "parameters": plan.student_parameters / max(1, plan.teacher_parameters)},
        "sample_split": student["split_rows"],
        # the teacher's rows in launch checks: this command's, the teacher-label phase's (when
        # it ran, in this run or the one it resumes) and the cascade plan's
        "rows_teacher_checks": (launch.teacher_check_rows + plan.teacher_check_rows
                                + phases.get("teacher labels", {}).get("rows_teacher_checks", 0)),
    }
    label_plan = LabelPlan(*[getattr(plan, f.name) for f in dataclasses.fields(CascadePlan)],
                           label_facts=facts)
    return run_job(label_plan, build_pipeline, beam_args, time.time(), lock=lock)


__all__ = ["LabelPlan", "run"]

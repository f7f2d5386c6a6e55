"""The run report: row counts gathered inside the pipeline, written as ``report.json``.

Counting happens in the pipeline (not from the launcher's metrics) so that the report
is written on every runner, including Dataflow jobs whose launcher does not wait.
"""
from __future__ import annotations

import dataclasses

from titans.pipeline.graphs.counts import Count, Counts
from titans.pipeline.graphs.stages import job_status


def _rates(rows: int, wall_seconds: float) -> dict:
    return {"wall_seconds": round(wall_seconds, 3),
            "rows_per_second": round(rows / wall_seconds, 1) if wall_seconds > 0 else None}


@dataclasses.dataclass(frozen=True)
class CascadeReport:
    """build(counts, wall seconds) -> report.json of `titans run`."""
    facts: dict

    def __call__(self, counts: Counts, wall_seconds: float) -> dict:
        f = self.facts
        prelabeled = counts[Count.PRELABELED]  # `titans label`'s sample rows; 0 for `titans run`
        rows_in, dead = counts[Count.IN] + prelabeled, counts[Count.DEAD_LETTER]
        easy, hard, deferred = counts[Count.EASY], counts[Count.HARD], counts[Count.DEFERRED]
        scored = easy + deferred  # rows the student labeled or sent on
        teacher_rows = counts[Count.TEACHER_SCORED]
        checks = f.get("rows_teacher_checks") or 0  # the teacher's rows at launch, not labeling
        sp, tp = f.get("student_parameters") or 0, f.get("teacher_parameters") or 0
        report = {
            **job_status(counts, f["max_dead_letter_rate"]),
            "rows_in": rows_in,
            "rows_easy": easy,
            "rows_hard": hard,
            "rows_dead_letter": dead,
            "conservation_ok": rows_in == easy + hard + dead + prelabeled,
            "rows_deferred": deferred,
            "rows_deferred_teacher_failed": deferred - hard,
            "rows_student_nonfinite": counts[Count.STUDENT_NONFINITE],
            "rows_teacher_scored": teacher_rows,
            "rows_teacher_checks": checks,
            # rows the student sent to the teacher, whatever the teacher then made of them
            "deferral_rate": deferred / scored if scored else 0.0,
            **{k: f[k] for k in ("rule", "threshold", "threshold_source", "requested_deferral_rate")},
            **_rates(rows_in, wall_seconds),
            "teacher_rows_avoided": easy,
            "teacher_rows_avoided_share": easy / scored if scored else 0.0,
            # compute proxy: parameters per row (an MLP costs ~2 FLOPs per weight per row); the
            # launch checks are left out here, as a teacher-only job runs such checks too
            "teacher_compute_avoided_share": (
                1.0 - (scored * sp + teacher_rows * tp) / (scored * tp) if scored and tp else None),
            "dead_letter_reasons": counts.dead_letter_reasons(),
        }
        histogram = counts.score_histogram()
        if histogram:
            report["deferral_score_histogram"] = histogram
        if f.get("audit_rate"):
            report.update(audit_figures(counts[Count.AUDITED], counts[Count.AUDIT_AGREE]))
        if prelabeled or f.get("prelabeled"):
            report.update(whole_job_figures(counts, f))
        report.update({k: v for k, v in f.items() if k not in report})
        return report


def whole_job_figures(counts: Counts, f: dict) -> dict:
    """A cascade with prelabeled rows (`titans label`: its sample, labeled by the teacher):
    figures over every row of the job. Compute per row is FLOPs when the facts carry it
    (student_flops_per_row, teacher_flops_per_row), else parameters."""
    pre, easy, deferred = counts[Count.PRELABELED], counts[Count.EASY], counts[Count.DEFERRED]
    rows_in, teacher = counts[Count.IN] + pre, counts[Count.TEACHER_SCORED]
    checks = f.get("rows_teacher_checks") or 0  # every launch check of the job, all phases
    scored = easy + deferred
    cs = f.get("student_flops_per_row") or f.get("student_parameters") or 0
    ct = f.get("teacher_flops_per_row") or f.get("teacher_parameters") or 0
    out = {
        "rows_prelabeled": pre,
        "rows_cascade_in": counts[Count.IN],
        # every row the teacher ran on in this job and before it: sample + hard + audited +
        # the launch checks' rows (counted in rows_teacher_checks)
        "rows_to_teacher": pre + teacher + checks,
        "rows_to_teacher_share": (pre + teacher + checks) / rows_in if rows_in else 0.0,
        # against the teacher labeling every row the job labeled or tried to (launch checks
        # left out, as in teacher_compute_avoided_share)
        "teacher_compute_saved_share_job": (
            1.0 - (pre * ct + scored * cs + teacher * ct) / ((pre + scored) * ct)
            if pre + scored and ct else None),
    }
    audited, agree = counts[Count.AUDITED], counts[Count.AUDIT_AGREE]
    if audited and scored:
        from titans.models.calibration import binomial_interval

        # disagreement over the cascade's rows = P(easy) x P(student != teacher | easy)
        keep = easy / scored
        lo, hi = binomial_interval(audited - agree, audited)
        out["audit_disagreement_estimate"] = keep * (audited - agree) / audited
        out["audit_disagreement_ci95"] = [keep * lo, keep * hi]
        if f.get("max_disagreement") is not None:
            out["audit_consistent_with_guarantee"] = keep * lo <= f["max_disagreement"]
    return out


@dataclasses.dataclass(frozen=True)
class TeacherLabelReport:
    """build(counts, wall seconds) -> report.json of `titans teacher-label`."""
    facts: dict

    def __call__(self, counts: Counts, wall_seconds: float) -> dict:
        rows_in, labeled, dead = counts[Count.IN], counts[Count.LABELED], counts[Count.DEAD_LETTER]
        report = {
            **job_status(counts, self.facts["max_dead_letter_rate"]),
            "rows_in": rows_in,
            "rows_labeled": labeled,
            "rows_dead_letter": dead,
            # rows the launch checks ran the teacher on, besides the rows it labeled
            "rows_teacher_checks": self.facts.get("rows_teacher_checks") or 0,
            "conservation_ok": rows_in == labeled + dead,
            **_rates(rows_in, wall_seconds),
            "dead_letter_reasons": counts.dead_letter_reasons(),
        }
        report.update({k: v for k, v in self.facts.items() if k not in report})
        return report


def audit_figures(audited: int, agree: int) -> dict:
    """Student-teacher agreement on audited easy rows, with a 95% Clopper-Pearson interval:
    the live estimate of how much accuracy the cascade gives up on the rows it keeps."""
    from titans.models.calibration import binomial_interval

    return {
        "rows_audited": audited,
        "audit_agreement": agree / audited if audited else None,
        "audit_agreement_ci95": list(binomial_interval(agree, audited)) if audited else None,
    }


def summary(report: dict) -> str:
    """A few readable lines for the end of a run."""
    if report.get("mode") == "teacher-label":
        lines = [f"rows in: {report['rows_in']:,}   labeled by the teacher: "
                 f"{report['rows_labeled']:,}   dead letter: {report['rows_dead_letter']:,}"]
        if report.get("rows_teacher_checks"):
            lines.append(f"teacher rows of the launch checks: {report['rows_teacher_checks']:,} "
                         f"(besides the rows it labeled)")
    else:
        lines = [
            f"rows in: {report['rows_in']:,}   easy (student): {report['rows_easy']:,}   "
            f"hard (teacher): {report['rows_hard']:,}   dead letter: "
            f"{report['rows_dead_letter']:,}",
            f"deferral rate: {report['deferral_rate']:.1%} (rule {report.get('rule')}, threshold "
            f"{report.get('threshold')})",
            f"teacher rows avoided: {report['teacher_rows_avoided']:,} "
            f"({report['teacher_rows_avoided_share']:.1%})" + (
                f", teacher compute avoided: {report['teacher_compute_avoided_share']:.1%}"
                if report.get("teacher_compute_avoided_share") is not None else "")]
        if report.get("rows_teacher_checks"):
            scored, checks = report["rows_teacher_scored"], report["rows_teacher_checks"]
            lines.append(f"teacher rows: {scored + checks:,} ({scored:,} in the pipeline, "
                         f"launch checks: {checks:,})")
        if report.get("rows_student_nonfinite"):
            lines.append(f"student output not finite on {report['rows_student_nonfinite']:,} "
                         f"rows: sent to the teacher")
    if report.get("rows_audited"):
        lo, hi = report["audit_agreement_ci95"]
        lines.append(f"audit: student agrees with the teacher on {report['audit_agreement']:.1%} "
                     f"of {report['rows_audited']:,} audited easy rows (95% CI {lo:.1%}-{hi:.1%})")
    lines.append(f"wall time: {report['wall_seconds']:.1f} s "
                 f"({report['rows_per_second'] or 0:,.0f} rows/s)")
    if report.get("phase_seconds"):
        lines.append("where the time went: " + ", ".join(
            f"{name.replace('_', ' ')} {s:.2f} s" for name, s in report["phase_seconds"].items()))
    if report["rows_dead_letter"]:
        lines.append("dead-letter reasons: " + "; ".join(
            f"{n:,} x {r}" for r, n in report.get("dead_letter_reasons", {}).items()))
    if report["status"] != "complete":
        lines.append(f"JOB FAILED: {report['status']} (no _SUCCESS marker written)")
    return "\n".join(lines)

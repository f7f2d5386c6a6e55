"""The run report: row counts gathered inside the pipeline, written as ``report.json``.

Counting happens in the pipeline (not from the launcher's metrics) so that the report
is written on every runner, including Dataflow jobs whose launcher does not wait.
"""
from __future__ import annotations

import io
import time

import apache_beam as beam
import numpy as np

from titans.models.storage import write_bytes, write_json
from titans.transforms.dead_letter import reason_counts

REASON_PREFIX = "dead_letter_reason:"
SCORE_BINS = 50  # histogram of deferral scores over [0, 1], where every rule's score lies




def count_rows(pcoll, key: str, label: str):
    """(key, rows) for every table; the counts are summed by key in the report."""
    return pcoll | label >> beam.Map(lambda t, k=key: (k, t.num_rows))


def count_reasons(dead_tables, label: str):
    return dead_tables | label >> beam.FlatMap(
        lambda t: [(REASON_PREFIX + r, n) for r, n in reason_counts(t).items()])


def count_scores(tables, source: str, column: str, label: str):
    """(f"score_{source}:{bin}", rows) for the deferral scores of every table."""
    def histogram(table):
        scores = np.clip(np.asarray(table.column(column)), 0.0, 1.0)
        counts, _ = np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))
        return [(f"score_{source}:{i}", int(n)) for i, n in enumerate(counts) if n]
    return tables | label >> beam.FlatMap(histogram)


class WriteReport(beam.PTransform):
    """Flattened (key, rows) counts -> ``path`` (JSON), merged with the run's static facts,
    and, for a cascade, ``report.png``: the deferral scores of easy and hard rows."""

    def __init__(self, path: str, facts: dict, start_time: float):
        super().__init__()
        self._path = path
        self._facts = facts
        self._start = start_time

    def expand(self, counts):
        return (counts
                | "Sum" >> beam.CombinePerKey(sum)
                | "ToDict" >> beam.combiners.ToDict()
                | "Write" >> beam.Map(self._write))

    def _write(self, counts: dict):
        report = build_report(counts, self._facts, time.time() - self._start)
        write_json(self._path, report)
        if "deferral_score_histogram" in report:
            plot_scores(report, self._path[:-len(".json")] + ".png")
        return report


def build_report(counts: dict, facts: dict, wall_seconds: float) -> dict:
    rows_in = counts.get("in", 0)
    easy, hard, dead = counts.get("easy", 0), counts.get("hard", 0), counts.get("dead_letter", 0)
    labeled = easy + hard
    sp, tp = facts.get("student_parameters") or 0, facts.get("teacher_parameters") or 0
    report = {
        "rows_in": rows_in,
        "rows_easy": easy,
        "rows_hard": hard,
        "rows_dead_letter": dead,
        "rows_teacher_scored": counts.get("teacher", 0),
        "conservation_ok": rows_in == easy + hard + dead,
        "deferral_rate": hard / labeled if labeled else 0.0,
        **{k: facts[k] for k in ("rule", "threshold", "threshold_source", "requested_deferral_rate")
           if k in facts},
        "wall_seconds": round(wall_seconds, 3),
        "rows_per_second": round(rows_in / wall_seconds, 1) if wall_seconds > 0 else None,
        "teacher_rows_avoided": easy,
        "teacher_rows_avoided_share": easy / labeled if labeled else 0.0,
        # compute proxy: parameters per row (an MLP costs ~2 FLOPs per weight per row)
        "teacher_compute_avoided_share": (
            1.0 - (labeled * sp + hard * tp) / (labeled * tp) if labeled and tp else None),
        "dead_letter_reasons": {k[len(REASON_PREFIX):]: v for k, v in sorted(counts.items())
                                if k.startswith(REASON_PREFIX)},
    }
    if any(k.startswith("score_") for k in counts):
        report["deferral_score_histogram"] = {
            "bin_edges": np.linspace(0.0, 1.0, SCORE_BINS + 1).round(4).tolist(),
            **{source: [counts.get(f"score_{source}:{i}", 0) for i in range(SCORE_BINS)]
               for source in ("easy", "hard")}}
    if facts.get("audit_rate"):
        report.update(audit_figures(counts.get("audit", 0), counts.get("audit_agree", 0)))
    report.update({k: v for k, v in facts.items() if k not in report})
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


def plot_scores(report: dict, path: str) -> None:
    """Stacked histogram of deferral scores (easy vs hard rows) with the threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = report["deferral_score_histogram"]
    edges = np.asarray(h["bin_edges"])
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], h["easy"], width=np.diff(edges), align="edge", label="easy: student labels")
    ax.bar(edges[:-1], h["hard"], width=np.diff(edges), align="edge", bottom=h["easy"],
           label="hard: teacher labels")
    threshold = report.get("threshold")
    if isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"deferral score ({report.get('rule')}; higher = harder)")
    ax.set_ylabel("rows")
    ax.set_title(f"{report['rows_easy'] + report['rows_hard']:,} rows, "
                 f"{report['deferral_rate']:.1%} to the teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(path, buf.getvalue())


def summary(report: dict) -> str:
    """A few readable lines for the end of a run."""
    if report.get("mode", "").startswith("teacher-label"):
        lines = [f"rows in: {report['rows_in']:,}   labeled by the teacher: "
                 f"{report['rows_hard']:,}   dead letter: {report['rows_dead_letter']:,}"]
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
    if report.get("rows_audited"):
        lo, hi = report["audit_agreement_ci95"]
        lines.append(f"audit: student agrees with the teacher on {report['audit_agreement']:.1%} "
                     f"of {report['rows_audited']:,} audited easy rows (95% CI {lo:.1%}-{hi:.1%})")
    lines.append(f"wall time: {report['wall_seconds']:.1f} s "
                 f"({report['rows_per_second'] or 0:,.0f} rows/s)")
    if report["rows_dead_letter"]:
        lines.append("dead-letter reasons: " + "; ".join(
            f"{n:,} x {r}" for r, n in report.get("dead_letter_reasons", {}).items()))
    return "\n".join(lines)

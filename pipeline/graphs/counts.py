"""The row counts a pipeline gathers for its report: the one place that names them.

Every branch of a pipeline emits ``(key, rows)`` pairs; they are summed per key on the way
(``stages.finish``), and the report step reads the sums through ``Counts``. Keys are plain
strings.
"""
from __future__ import annotations

import enum

import apache_beam as beam
import numpy as np
import pyarrow as pa

from titans.transforms.dead_letter import reason_counts

SCORE_BINS = 50  # histogram of deferral scores over [0, 1], where every rule's score lies


class Count(str, enum.Enum):
    IN = "in"                              # rows read (or dead-lettered while reading)
    EASY = "easy"                          # rows labeled by the student
    DEFERRED = "deferred"                  # rows the student sent to the teacher (no audits)
    STUDENT_NONFINITE = "student_nonfinite"  # of those, rows whose student output was not finite
    HARD = "hard"                          # rows labeled by the teacher in a cascade
    LABELED = "labeled"                    # rows labeled by `titans teacher-label`
    TEACHER_SCORED = "teacher_scored"      # rows the teacher ran on (hard + audited)
    DEAD_LETTER = "dead_letter"
    AUDITED = "audited"                    # audited easy rows the teacher answered
    AUDIT_AGREE = "audit_agree"            # of those, rows where student and teacher agree
    PRELABELED = "prelabeled"              # rows labeled before the job (`titans label`'s sample,
                                           # by the teacher), written as they are


_REASON, _SCORE = "reason:", "score:"


def rows(pcoll, key: Count, label: str):
    """(key, rows) for every table."""
    return pcoll | label >> beam.Map(lambda t, k=key.value: (k, t.num_rows))


def nonfinite_scores(pcoll, column: str, label: str):
    """(STUDENT_NONFINITE, rows with a NaN deferral score) for every table."""
    def count(table):
        return [(Count.STUDENT_NONFINITE.value,
                 int(np.isnan(np.asarray(table.column(column), dtype=np.float32)).sum()))]
    return pcoll | label >> beam.FlatMap(count)


def reasons(dead_tables, label: str):
    """(reason key, rows) for every dead-letter reason."""
    return dead_tables | label >> beam.FlatMap(
        lambda t: [(_REASON + r, n) for r, n in reason_counts(t).items()])


def scores(tables, source: str, column: str, label: str):
    """(score key, rows) per bin of the deferral scores of every table."""
    def histogram(table: pa.Table):
        values = np.asarray(table.column(column), dtype=np.float32)
        values = np.clip(values[np.isfinite(values)], 0.0, 1.0)
        counts, _ = np.histogram(values, bins=SCORE_BINS, range=(0.0, 1.0))
        return [(f"{_SCORE}{source}:{i}", int(n)) for i, n in enumerate(counts) if n]
    return tables | label >> beam.FlatMap(histogram)


def audits(pcoll, label: str):
    """(AUDITED, n) and (AUDIT_AGREE, k) for every (n, k) pair."""
    return pcoll | label >> beam.FlatMap(
        lambda a: [(Count.AUDITED.value, a[0]), (Count.AUDIT_AGREE.value, a[1])])


class Counts:
    """The (key, rows) pairs of every branch, summed by key and read by name (a key may come
    more than once; the job hands over one pair per key)."""

    def __init__(self, pairs):
        self._sums: dict[str, int] = {}
        for key, rows in pairs:
            self._sums[key] = self._sums.get(key, 0) + rows

    def __getitem__(self, key: Count) -> int:
        return int(self._sums.get(key.value, 0))

    def dead_letter_reasons(self) -> dict[str, int]:
        return {k[len(_REASON):]: v for k, v in sorted(self._sums.items()) if k.startswith(_REASON)}

    def score_histogram(self) -> dict | None:
        if not any(k.startswith(_SCORE) for k in self._sums):
            return None
        return {"bin_edges": np.linspace(0.0, 1.0, SCORE_BINS + 1).round(4).tolist(),
                **{source: [int(self._sums.get(f"{_SCORE}{source}:{i}", 0))
                            for i in range(SCORE_BINS)] for source in ("easy", "hard")}}

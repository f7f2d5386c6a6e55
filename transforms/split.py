"""Route scored tables by table, not by row: easy, hard, audited and dead-letter rows."""
from __future__ import annotations

import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.transforms.dead_letter import DeadLetter
from titans.transforms.labels import (AUDIT, ERROR, ERROR_STAGE, STUDENT_LABEL, LabelColumns,
                                      with_source)

EASY, HARD, DEAD_LETTER, AUDITED = "easy", "hard", "dead_letter", "audited"


def split_errors(table: pa.Table, input_names: list[str]) -> tuple[pa.Table, list[DeadLetter]]:
    """(rows that can be labeled, without the error columns; a DeadLetter per stage for the
    rows that cannot)."""
    errors = table.column(ERROR)
    dead = []
    if errors.null_count < table.num_rows:
        bad = np.asarray(pc.is_valid(errors))
        rows = table.filter(pa.array(bad))
        stages = np.asarray(rows.column(ERROR_STAGE).to_pylist(), dtype=object)
        for stage in dict.fromkeys(stages):
            mine = rows.filter(pa.array(stages == stage))
            dead.append(DeadLetter(mine.select(input_names), mine.column(ERROR).to_pylist(), stage))
        table = table.filter(pa.array(~bad))
    return table.drop_columns([ERROR, ERROR_STAGE]), dead


class SplitErrors(beam.DoFn):
    """Rows with an error -> dead_letter (DeadLetter); the rest -> main."""

    def __init__(self, input_names: list[str]):
        self._input_names = list(input_names)

    def process(self, table: pa.Table):
        ok, dead = split_errors(table, self._input_names)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)
        if ok.num_rows:
            yield ok


class SplitByDeferral(beam.DoFn):
    """Rows with an error -> dead_letter; deferral_score > threshold -> hard; the rest -> easy,
    labeled by the student. A NaN score (the student's output was not finite) is hard: such
    a row is never labeled by the student.

    With ``audit_rate`` A, about A of the easy rows are also sent, in the hard output and
    flagged in the AUDIT column, to the teacher: their labels stay the student's, and the
    teacher's answer only measures agreement. The draw is seeded by ``seed`` and the table's
    content, so the same input gives the same audit sample on every run.
    """

    def __init__(self, threshold: float, columns: LabelColumns, input_names: list[str],
                 audit_rate: float = 0.0, seed: int = 0):
        self._threshold = threshold
        self._columns = columns
        self._input_names = list(input_names)
        self._audit_rate = audit_rate
        self._seed = seed

    def process(self, table: pa.Table):
        c = self._columns
        table, dead = split_errors(table, self._input_names)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)
        if table.num_rows == 0:
            return
        score = np.asarray(table.column(c.deferral_score))
        hard_mask = ~(score <= self._threshold)  # NaN compares false: hard
        easy = table.filter(pa.array(~hard_mask)) if hard_mask.any() else table
        hard = table.filter(pa.array(hard_mask)) if hard_mask.any() else None
        if self._audit_rate > 0:
            hard = self._with_audits(hard, easy, score)
        if hard is not None and hard.num_rows:
            yield beam.pvalue.TaggedOutput(HARD, hard)
        if easy.num_rows:
            yield beam.pvalue.TaggedOutput(EASY, with_source(easy, c, "student"))

    def _with_audits(self, hard, easy: pa.Table, score: np.ndarray) -> pa.Table:
        rng = np.random.default_rng([self._seed, zlib.crc32(score.tobytes())])
        audited = easy.filter(pa.array(rng.random(easy.num_rows) < self._audit_rate))
        parts = []
        if hard is not None:
            parts.append(hard.append_column(AUDIT, pa.repeat(pa.scalar(False), hard.num_rows)))
        parts.append(audited.append_column(AUDIT, pa.repeat(pa.scalar(True), audited.num_rows)))
        return pa.concat_tables(parts)


class SeparateTeacherRows(beam.DoFn):
    """Teacher-scored rows -> main: the hard rows the teacher labeled, to be written;
    ``dead_letter``: hard rows the teacher failed on; ``audited``: (rows, rows where the
    student's label equals the teacher's) for each table's audited easy rows, which are
    already written with the student's label (an audited row the teacher failed on is
    left out of the audit)."""

    def __init__(self, columns: LabelColumns, input_names: list[str]):
        self._columns = columns
        self._input_names = list(input_names)

    def process(self, table: pa.Table):
        audit = (np.asarray(table.column(AUDIT)) if AUDIT in table.column_names
                 else np.zeros(table.num_rows, bool))
        if audit.any():
            rows = table.filter(pa.array(audit))
            ok = np.asarray(pc.is_null(rows.column(ERROR)))
            agree = np.asarray(rows.column(STUDENT_LABEL)) == np.asarray(
                rows.column(self._columns.label).fill_null(-1))
            yield beam.pvalue.TaggedOutput(AUDITED, (int(ok.sum()), int((agree & ok).sum())))
            table = table.filter(pa.array(~audit))
        if AUDIT in table.column_names:
            table = table.drop_columns([AUDIT, STUDENT_LABEL])
        hard, dead = split_errors(table, self._input_names)
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)
        if hard.num_rows:
            yield hard

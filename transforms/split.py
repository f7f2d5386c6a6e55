"""Split student-scored tables into easy, hard and dead-letter rows, by table not by row."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from titans.transforms.labels import ERROR, LabelColumns, with_source

EASY, HARD, DEAD_LETTER = "easy", "hard", "dead_letter"


class SplitByDeferral(beam.DoFn):
    """Rows with an error -> dead_letter (input columns, reasons, 'validate');
    deferral_score > threshold -> hard; the rest -> easy, labeled by the student."""

    def __init__(self, threshold: float, columns: LabelColumns, input_names: list[str]):
        self._threshold = threshold
        self._columns = columns
        self._input_names = list(input_names)

    def process(self, table: pa.Table):
        c = self._columns
        errors = table.column(ERROR)
        bad = np.asarray(pc.is_valid(errors))
        table_ok = table
        if bad.any():
            dead = table.filter(pa.array(bad))
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, (
                dead.select(self._input_names), dead.column(ERROR).to_pylist(), "validate"))
            table_ok = table.filter(pa.array(~bad))
        table_ok = table_ok.drop_columns([ERROR])
        if table_ok.num_rows == 0:
            return
        hard = np.asarray(table_ok.column(c.deferral_score)) > self._threshold
        if hard.all():
            yield beam.pvalue.TaggedOutput(HARD, table_ok)
            return
        if hard.any():
            yield beam.pvalue.TaggedOutput(HARD, table_ok.filter(pa.array(hard)))
            easy = table_ok.filter(pa.array(~hard))
        else:
            easy = table_ok
        if easy.num_rows:
            yield beam.pvalue.TaggedOutput(EASY, with_source(easy, c, "student"))

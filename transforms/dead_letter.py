"""The dead letter: rows that could not be labeled, each with its reason and stage.

Rows are kept as JSON text so any input schema fits one output schema, and a user
can read the reason next to the original values.
"""
from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([("reason", pa.string()), ("stage", pa.string()), ("row", pa.string())])


def dead_letter_table(table: pa.Table, reasons, stage: str) -> pa.Table:
    """``reasons``: one string for every row, or a sequence with one string per row."""
    n = table.num_rows
    reasons = [reasons] * n if isinstance(reasons, str) else [str(r) for r in reasons]
    rows = [json.dumps(r, default=str, allow_nan=True) for r in table.to_pylist()]
    return pa.table([pa.array(reasons, pa.string()), pa.array([stage] * n, pa.string()),
                     pa.array(rows, pa.string())], schema=SCHEMA)


class ToDeadLetter(beam.PTransform):
    """(table, reasons, stage) tuples -> dead-letter tables."""

    def expand(self, pcoll):
        return pcoll | beam.MapTuple(dead_letter_table).with_output_types(pa.Table)


def reason_counts(dead: pa.Table) -> dict[str, int]:
    values, counts = np.unique(np.asarray(dead.column("reason").to_pylist(), dtype=object),
                               return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

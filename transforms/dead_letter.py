"""The dead letter: rows that could not be labeled, each with its reason and stage.

Every stage that rejects rows emits a ``DeadLetter`` (the input rows, why, where); the
pipeline writes them all as one Parquet output. Rows are kept as JSON text so any input
schema fits one output schema, and a user can read the reason next to the original values
(binary values, such as an undecodable image or a TFRecord that does not parse, are kept as
base64 strings).
"""
from __future__ import annotations

import base64
import dataclasses
import json
from typing import Sequence, Union

import apache_beam as beam
import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([("reason", pa.string()), ("stage", pa.string()), ("row", pa.string())])

# where a row was rejected
READ, VALIDATE, STUDENT, TEACHER = "read", "validate", "student", "teacher"


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """Rows (input columns only) that cannot be labeled: one reason for all, or one per row."""
    rows: pa.Table
    reasons: Union[str, Sequence[str]]
    stage: str

    def to_table(self) -> pa.Table:
        n = self.rows.num_rows
        reasons = [self.reasons] * n if isinstance(self.reasons, str) else [str(r) for r in self.reasons]
        rows = [json.dumps(r, default=_jsonable, allow_nan=True) for r in self.rows.to_pylist()]
        return pa.table([pa.array(reasons, pa.string()), pa.array([self.stage] * n, pa.string()),
                         pa.array(rows, pa.string())], schema=SCHEMA)


def _jsonable(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    return str(value)


class ToDeadLetter(beam.PTransform):
    """DeadLetter records -> dead-letter tables (SCHEMA)."""

    def expand(self, pcoll):
        return pcoll | beam.Map(DeadLetter.to_table).with_output_types(pa.Table)


def reason_counts(dead: pa.Table) -> dict[str, int]:
    values, counts = np.unique(np.asarray(dead.column("reason").to_pylist(), dtype=object),
                               return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

"""The columns a cascade adds to every row, and the functions that fill them.

Input columns pass through untouched; each labeled row gains
  label (int64)            argmax of the model that decided
  confidence (float32)     that model's max class probability
  deferral_score (float32) the student's deferral score (higher = harder)
  source (string)          'student' or 'teacher'
`titans teacher-label` adds label, confidence and teacher_probs (the teacher's K
class probabilities) instead.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from titans.models.deferral import DeferralRule

# internal columns, never written: why a row cannot be labeled (null when it can) and at which
# stage, whether a row in the teacher stage is an audited easy row, and the student's label
# of such a row
ERROR = "__titans_error"
ERROR_STAGE = "__titans_error_stage"
AUDIT = "__titans_audit"
STUDENT_LABEL = "__titans_student_label"


@dataclasses.dataclass(frozen=True)
class LabelColumns:
    prefix: str = ""

    @property
    def label(self):
        return self.prefix + "label"

    @property
    def confidence(self):
        return self.prefix + "confidence"

    @property
    def deferral_score(self):
        return self.prefix + "deferral_score"

    @property
    def source(self):
        return self.prefix + "source"

    @property
    def probs(self):
        return self.prefix + "teacher_probs"

    def cascade_fields(self) -> list[pa.Field]:
        return [pa.field(self.label, pa.int64()), pa.field(self.confidence, pa.float32()),
                pa.field(self.deferral_score, pa.float32()), pa.field(self.source, pa.string())]

    def teacher_fields(self, num_classes: int) -> list[pa.Field]:
        return [pa.field(self.label, pa.int64()), pa.field(self.confidence, pa.float32()),
                pa.field(self.probs, pa.list_(pa.float32(), num_classes))]

    def output_schema(self, input_schema: pa.Schema, added: list[pa.Field]) -> pa.Schema:
        clash = [f.name for f in added if f.name in input_schema.names]
        if clash:
            raise ValueError(f"the input already has column(s) {clash}, which titans adds; "
                             f"pass --column-prefix (e.g. 'titans_') to name the added columns apart")
        return pa.schema(list(input_schema) + added, metadata=input_schema.metadata)


def _label_and_confidence(probs: np.ndarray, ok: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """argmax and max of each row of ``probs``; null where not ``ok``."""
    if probs.shape[1] == 0:
        return pa.nulls(len(ok), pa.int64()), pa.nulls(len(ok), pa.float32())
    label = probs.argmax(axis=1).astype(np.int64)
    conf = probs.max(axis=1).astype(np.float32)
    return pa.array(label, mask=~ok), pa.array(conf, mask=~ok)


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """Rows whose outputs are all finite (a NaN or inf anywhere makes the row sum non-finite)."""
    if logits.shape[1] == 0:
        return np.zeros(len(logits), bool)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is the point here
        return np.isfinite(logits.sum(axis=1, dtype=np.float64))


def _softmax(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 0:
        return logits
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


@dataclasses.dataclass(frozen=True)
class StudentLabels:
    """annotate() for the student: label, confidence and deferral score.

    A row whose outputs are not finite gets no label and a NaN deferral score: the split
    sends it to the teacher, so no label ever comes from a non-finite output.
    """
    rule: DeferralRule
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: np.ndarray) -> pa.Table:
        ok = finite_rows(logits)
        n = table.num_rows
        if logits.shape[1]:
            probs, score = self.rule(torch.from_numpy(np.where(ok[:, None], logits, 0.0)))
            probs, score = probs.numpy(), score.numpy().astype(np.float32)
            score[~ok] = np.nan
        else:
            probs, score = logits, np.full(n, np.nan, np.float32)
        label, conf = _label_and_confidence(probs, ok)
        c = self.columns
        table = table.append_column(c.label, label).append_column(c.confidence, conf)
        return table.append_column(c.deferral_score, pa.array(score))


@dataclasses.dataclass(frozen=True)
class TeacherLabels:
    """annotate() for the teacher on hard rows: its label and confidence replace the student's
    (audited easy rows keep the student's label aside, to be compared). A non-finite teacher
    output is an error: the row goes to the dead letter."""
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: np.ndarray) -> pa.Table:
        ok = _check_finite(logits, errors, "teacher")
        c = self.columns
        if AUDIT in table.column_names:
            table = table.append_column(STUDENT_LABEL, table.column(c.label))
        label, conf = _label_and_confidence(_softmax(logits), ok)
        table = table.set_column(table.column_names.index(c.label), c.label, label)
        table = table.set_column(table.column_names.index(c.confidence), c.confidence, conf)
        return with_source(table, c, "teacher")


@dataclasses.dataclass(frozen=True)
class TeacherProbs:
    """annotate() for `titans teacher-label`: label, confidence and all K probabilities."""
    columns: LabelColumns
    num_classes: int

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: np.ndarray) -> pa.Table:
        ok = _check_finite(logits, errors, "teacher")
        probs = _softmax(logits)
        if probs.shape[1] == 0:
            probs = np.full((table.num_rows, self.num_classes), np.nan, np.float32)
        label, conf = _label_and_confidence(probs, ok)
        c = self.columns
        flat = pa.array(np.where(ok[:, None], probs, 0.0).astype(np.float32).reshape(-1))
        table = table.append_column(c.label, label).append_column(c.confidence, conf)
        return table.append_column(c.probs, pa.FixedSizeListArray.from_arrays(flat, self.num_classes))


def _check_finite(logits: np.ndarray, errors: np.ndarray, name: str) -> np.ndarray:
    """Rows with finite outputs; the others (not already in error) get an error."""
    ok = finite_rows(logits)
    bad = ~ok & (errors == None)  # noqa: E711 - elementwise on an object array
    errors[bad] = f"{name} output is not finite (NaN or inf logits)"
    return ok


def with_source(table: pa.Table, columns: LabelColumns, source: str) -> pa.Table:
    values = pa.repeat(pa.scalar(source, pa.string()), table.num_rows)
    if columns.source in table.column_names:
        return table.set_column(table.column_names.index(columns.source), columns.source, values)
    return table.append_column(columns.source, values)

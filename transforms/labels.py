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

# internal columns, never written: why a row cannot be labeled (null when it can), whether a
# row in the teacher stage is an audited easy row, and the student's label of such a row
ERROR = "__titans_error"
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


def _label_and_confidence(probs: torch.Tensor):
    conf, label = probs.max(dim=-1)
    return (pa.array(label.numpy().astype(np.int64)), pa.array(conf.numpy().astype(np.float32)))


def _errors(reasons, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()) if reasons is None else pa.array(reasons, pa.string())


@dataclasses.dataclass(frozen=True)
class StudentLabels:
    """annotate() for the student: label, confidence, deferral score, and the error column."""
    rule: DeferralRule
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: torch.Tensor, reasons) -> pa.Table:
        probs, score = self.rule(logits)
        label, conf = _label_and_confidence(probs)
        c = self.columns
        table = table.append_column(c.label, label).append_column(c.confidence, conf)
        table = table.append_column(c.deferral_score, pa.array(score.numpy().astype(np.float32)))
        return table.append_column(ERROR, _errors(reasons, table.num_rows))


@dataclasses.dataclass(frozen=True)
class TeacherLabels:
    """annotate() for the teacher on hard rows: its label and confidence replace the student's
    (audited easy rows keep the student's label aside, to be compared)."""
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: torch.Tensor, reasons) -> pa.Table:
        if reasons is not None:  # the student stage already routed such rows away
            raise ValueError(f"teacher got rows it cannot score: {set(r for r in reasons if r)}")
        c = self.columns
        if AUDIT in table.column_names:
            table = table.append_column(STUDENT_LABEL, table.column(c.label))
        label, conf = _label_and_confidence(torch.softmax(logits.float(), dim=-1))
        table = table.set_column(table.column_names.index(c.label), c.label, label)
        table = table.set_column(table.column_names.index(c.confidence), c.confidence, conf)
        return with_source(table, c, "teacher")


@dataclasses.dataclass(frozen=True)
class TeacherProbs:
    """annotate() for `titans teacher-label`: label, confidence and all K probabilities."""
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: torch.Tensor, reasons) -> pa.Table:
        probs = torch.softmax(logits.float(), dim=-1)
        label, conf = _label_and_confidence(probs)
        c = self.columns
        k = probs.shape[-1]
        flat = pa.array(probs.numpy().astype(np.float32).reshape(-1))
        table = table.append_column(c.label, label).append_column(c.confidence, conf)
        table = table.append_column(c.probs, pa.FixedSizeListArray.from_arrays(flat, k))
        return table.append_column(ERROR, _errors(reasons, table.num_rows))


def with_source(table: pa.Table, columns: LabelColumns, source: str) -> pa.Table:
    values = pa.repeat(pa.scalar(source, pa.string()), table.num_rows)
    if columns.source in table.column_names:
        return table.set_column(table.column_names.index(columns.source), columns.source, values)
    return table.append_column(columns.source, values)

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

from titans.models.deferral import DeferralRule, softmax
from titans.transforms.dead_letter import TEACHER

# internal columns, never written: why a row cannot be labeled (null when it can) and at which
# stage, whether a row in the teacher stage is an audited easy row, and the student's label
# of such a row
ERROR = "__titans_error"
ERROR_STAGE = "__titans_error_stage"
AUDIT = "__titans_audit"
STUDENT_LABEL = "__titans_student_label"


class RowErrors:
    """Why rows of a batch cannot be labeled, and at which stage. Nothing is allocated while
    every row is fine, the common case: no per-row Python work on a clean batch."""

    def __init__(self, n: int):
        self.n = n
        self.reasons: np.ndarray | None = None  # object arrays: a string or None per row
        self.stages: np.ndarray | None = None

    def add(self, rows, reason, stage: str) -> None:
        """``rows`` (a mask or indices) get ``reason`` (one string or one per row)."""
        if self.reasons is None:
            self.reasons = np.full(self.n, None, dtype=object)
            self.stages = np.full(self.n, None, dtype=object)
        self.reasons[rows] = reason
        self.stages[rows] = stage

    @property
    def bad(self) -> np.ndarray:
        if self.stages is None:
            return np.zeros(self.n, bool)
        return self.stages != None  # noqa: E711 - elementwise on an object array

    def slice(self, start: int, end: int) -> "RowErrors":
        part = RowErrors(end - start)
        if self.reasons is not None:
            part.reasons, part.stages = self.reasons[start:end].copy(), self.stages[start:end].copy()
        return part

    def columns(self) -> tuple[pa.Array, pa.Array]:
        """The ERROR and ERROR_STAGE columns."""
        if self.reasons is None:
            nulls = pa.nulls(self.n, pa.string())
            return nulls, nulls
        return pa.array(self.reasons, pa.string()), pa.array(self.stages, pa.string())


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


def _label_and_confidence(probs: np.ndarray, ok: np.ndarray | None) -> tuple[pa.Array, pa.Array]:
    """argmax and max of each row of ``probs`` (one pass, torch); null where not ``ok``
    (None: every row is fine)."""
    n = len(probs)
    if probs.shape[1] == 0:
        return pa.nulls(n, pa.int64()), pa.nulls(n, pa.float32())
    conf, label = torch.from_numpy(probs).max(dim=-1)
    mask = None if ok is None else ~ok
    return (pa.array(label.numpy().astype(np.int64, copy=False), mask=mask),
            pa.array(conf.numpy().astype(np.float32, copy=False), mask=mask))


def finite_rows(logits: np.ndarray) -> np.ndarray | None:
    """Rows whose outputs are all finite, or None when every row is. A NaN or inf anywhere
    makes the row's sum non-finite (so may a sum that overflows: that row is then treated as
    non-finite too, the safe side)."""
    if logits.shape[1] == 0:
        return np.zeros(len(logits), bool)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is the point here
        if np.isfinite(logits.sum()):  # one fast pass: the common case
            return None
        ok = np.isfinite(logits.sum(axis=1))
    return None if ok.all() else ok


def _softmax(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 0:
        return logits
    return softmax(torch.from_numpy(logits)).numpy()


@dataclasses.dataclass(frozen=True)
class StudentLabels:
    """annotate() for the student: label, confidence and deferral score.

    A row whose outputs are not finite gets no label and a NaN deferral score: the split
    sends it to the teacher, so no label ever comes from a non-finite output.
    """
    rule: DeferralRule
    columns: LabelColumns

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: RowErrors) -> pa.Table:
        ok = finite_rows(logits)
        n = table.num_rows
        if logits.shape[1]:
            clean = logits if ok is None else np.where(ok[:, None], logits, np.float32(0.0))
            probs, score = self.rule(torch.from_numpy(clean))
            probs, score = probs.numpy(), score.numpy().astype(np.float32, copy=False)
            if ok is not None:
                score = np.where(ok, score, np.float32(np.nan))
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

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: RowErrors) -> pa.Table:
        ok = _check_finite(logits, errors)
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

    def __call__(self, table: pa.Table, logits: np.ndarray, errors: RowErrors) -> pa.Table:
        ok = _check_finite(logits, errors)
        probs = _softmax(logits)
        if probs.shape[1] == 0:
            probs = np.full((table.num_rows, self.num_classes), np.nan, np.float32)
        label, conf = _label_and_confidence(probs, ok)
        c = self.columns
        kept = probs if ok is None else np.where(ok[:, None], probs, np.float32(0.0))
        flat = pa.array(kept.astype(np.float32, copy=False).reshape(-1))
        table = table.append_column(c.label, label).append_column(c.confidence, conf)
        return table.append_column(c.probs, pa.FixedSizeListArray.from_arrays(flat, self.num_classes))


def _check_finite(logits: np.ndarray, errors: RowErrors) -> np.ndarray | None:
    """Rows with finite teacher outputs (None: all); the others, not already in error, get
    an error."""
    ok = finite_rows(logits)
    if ok is not None:
        errors.add(~ok & ~errors.bad, "teacher output is not finite (NaN or inf logits)", TEACHER)
    return ok


def with_source(table: pa.Table, columns: LabelColumns, source: str) -> pa.Table:
    values = pa.repeat(pa.scalar(source, pa.string()), table.num_rows)
    if columns.source in table.column_names:
        return table.set_column(table.column_names.index(columns.source), columns.source, values)
    return table.append_column(columns.source, values)

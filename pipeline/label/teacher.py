"""Phase 2, teacher labels: the teacher-label pipeline on the sample file, keeping the
teacher's probabilities -> DIR/_label/teacher/ (labels, dead letter, report, _SUCCESS).

Its plan comes from the launch plan (``Launch.resolved``): the sample file's one footer is
read, but the features are the launch's and the teacher is not loaded or checked again.
``labeled_sample`` reads the labeled rows back for the distil and calibrate phases, with the
rows the cascade leaves out (``skip``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from titans.pipeline.label.launch import CHECK_ROWS, MIN_LABELED, job_config
from titans.pipeline.label.sample import FILE_COL, ROW_COL
from titans.pipeline.plan import TeacherLabelConfig, plan_teacher_label
from titans.transforms.features import feature_matrix
from titans.transforms.io import storage
from titans.transforms.io.parquet import ParquetInput
from titans.transforms.probs import probs_from_column


def run(c, launch, jd, beam_args: list[str], lock=None) -> dict:
    """The teacher-label job on the sample, under DIR's lock; its report."""
    from titans.pipeline.job import run_teacher_label

    config = job_config(
        TeacherLabelConfig, c.job, input=jd.sample, output=jd.teacher, input_format="parquet",
        output_format="parquet", overwrite=True,  # a failed attempt's files only
        sample_rows=min(CHECK_ROWS, launch.sample_rows))
    plan = plan_teacher_label(config, resolved=launch.resolved(ParquetInput.from_files([jd.sample])))
    return run_teacher_label(plan, beam_args, lock=lock)


@dataclasses.dataclass
class LabeledSample:
    """The sample rows the teacher labeled, in (file, position) order."""
    table: pa.Table        # the teacher-label output: input columns, file/row, label, probs
    x: np.ndarray          # the models' input
    probs: np.ndarray      # the teacher's probabilities
    skip: dict             # {path: ((first, end), ...)}: positions the cascade leaves out

    @property
    def teacher_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def labeled_sample(launch, jd) -> LabeledSample:
    paths = [p for p in storage.list_under(storage.join(jd.teacher, "labels"))
             if p.endswith(".parquet")]
    tables = [pq.read_table(storage.open_read(p)) for p in paths]
    tables = [t for t in tables if t.num_rows]
    if not tables or sum(t.num_rows for t in tables) < MIN_LABELED:
        raise ValueError(f"the teacher labeled {sum(t.num_rows for t in tables)} sample row(s); "
                         f"at least {MIN_LABELED} are needed (see {jd.teacher})")
    table = pa.concat_tables(tables).sort_by([(FILE_COL, "ascending"), (ROW_COL, "ascending")])
    x, reasons = feature_matrix(table, launch.features)
    if reasons is not None:  # the teacher labeled only rows with usable features
        raise ValueError("teacher-labeled sample rows have unusable features")
    probs = probs_from_column(table.column(launch.columns.probs), launch.columns.probs,
                              f"the teacher's probabilities ({launch.columns.probs!r})")
    files = table.column(FILE_COL).to_numpy()
    rows = table.column(ROW_COL).to_numpy()
    skip = {launch.files[i]: row_ranges(rows[files == i]) for i in np.unique(files)}
    return LabeledSample(table, x, probs, skip)


def row_ranges(rows: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted row numbers -> ((first, end), ...) runs of consecutive rows."""
    if rows.size == 0:
        return ()
    rows = np.sort(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return tuple((int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends))


__all__ = ["run", "LabeledSample", "labeled_sample", "row_ranges"]

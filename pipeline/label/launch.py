"""`titans label`'s one launch plan: everything that can fail before the data is touched,
learnt once and read by every phase.

The input is listed, its footers read (Parquet) or its records sampled for a schema
(TFRecord), rows sampled and the features resolved by the very code `titans run` plans with
(``pipeline.plan.plan_source``: the same formats, --image-*, the same checks); the teacher is
loaded and run on those rows once (``plan.check_teacher``), its FLOPs per row counted, and the
student budget checked. On token ids (--token-column) the token student's vocabulary is fixed
here when the teacher has an embedding table (``teacher_vocab``), else at distil time from the
sample. The sample is drawn by row number over the files, so it needs each
file's row count: a Parquet footer has it; a TFRecord file's records are counted here, one
framing pass over each file (no parsing), so that every record of every file is equally
likely to be drawn.

The teacher-label and cascade phases plan their pipelines from this plan (``resolved``):
they neither list the input, read its footers, sample it nor load and check the teacher again.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from titans.models.student_search import candidate_architectures, teacher_vocab, token_candidates
from titans.pipeline import plan
from titans.pipeline.label import defaults as ld
from titans.pipeline.label.flops_cache import teacher_flops as counted_flops
from titans.pipeline.label.sample import FILE_COL, ROW_COL, count_records
from titans.pipeline.model_checks import Tally
from titans.transforms.features import TokenSpec
from titans.transforms.io.parquet import ParquetInput
from titans.transforms.labels import LabelColumns

MIN_LABELED = 30        # labeled sample rows below which nothing can be learnt
CHECK_ROWS = 1000       # rows read at launch to check the models and count the teacher's FLOPs
FLOPS_ROWS = 64         # of them, the rows the teacher's FLOPs are counted on
# a --state whose runs ran this very teacher file (its sha256) on this feature schema: the
# launch tries it on a handful of today's rows, not plan.TEACHER_CHECK_ROWS. The teacher-label
# phase runs it on the whole fresh sample next; on benchmarks/continual.py's 12,000-row days
# the 256 rows were 2.1% of every warm day's teacher share
VOUCHED_CHECK_ROWS = 16


@dataclasses.dataclass
class Launch:
    """What the launch checks learnt about the input and the teacher."""
    source: object                   # ParquetInput or TFRecordInput
    row_counts: list[int]            # per file; 0 for a file whose rows cannot be read
    check: pa.Table                  # the rows sampled at launch
    x: np.ndarray                    # their models' input (rows with usable features)
    features: object                 # FeatureSpec or ImageSpec
    num_classes: int
    teacher_flops: float
    teacher_parameters: int
    proxy: str
    sample_rows: int
    columns: LabelColumns
    teacher_check_rows: int = 0      # rows these checks ran the teacher on (report.json counts them)
    teacher_vocab: int | None = None  # token ids: the teacher's embedding rows, when it has one

    @property
    def tokens(self) -> bool:
        return isinstance(self.features, TokenSpec)

    @property
    def files(self) -> list[str]:
        return list(self.source.files)

    @property
    def rows(self) -> int:
        return int(sum(self.row_counts))

    @property
    def output_schema(self) -> pa.Schema:
        return self.columns.output_schema(self.source.schema, self.columns.cascade_fields())

    def resolved(self, source=None) -> plan.Resolved:
        """What a phase's plan takes from this one; ``source``: another input with these
        features (the teacher-label phase reads the sample file)."""
        return plan.Resolved(self.source if source is None else source, self.check,
                             self.features, self.x, self.num_classes, self.teacher_parameters)


def default_sample_rows(rows: int) -> int:
    """``ld.SAMPLE_RULE``: enough rows to distil a small student and to certify a useful
    threshold at EPS = 0.01 (a few thousand calibration rows), few enough that on a large
    input the sample is a small share of the teacher's rows (2% of 1M rows)."""
    n = min(ld.SAMPLE_MAX, max(ld.SAMPLE_MIN, int(round(ld.SAMPLE_SHARE * rows))))
    return min(n, rows // 2)


def plan_launch(c, teacher_sha256: str | None = None, vouched: bool = False) -> Launch:
    """The launch plan of the LabelConfig ``c``; ValueError saying what to fix. With the
    teacher file's ``teacher_sha256``, its FLOPs per row come from the cache when counted
    before (``flops_cache``). ``vouched``: the --state ran this teacher file before, on this
    input's features (checked again once they are resolved): it is tried on
    VOUCHED_CHECK_ROWS sampled rows."""
    job = dataclasses.replace(c.job, sample_rows=CHECK_ROWS, skip_rows={}, skip_labeled=None)
    source, check, features = plan.plan_source(job)
    clash = [name for name in (FILE_COL, ROW_COL) if name in source.schema.names]
    if clash:
        raise ValueError(f"the input has column(s) {clash}, which titans label uses internally")
    row_counts = file_row_counts(source)
    rows = int(sum(row_counts))
    if rows < 2 * MIN_LABELED:
        raise ValueError(f"the input has {rows:,} readable row(s); titans label needs at least "
                         f"{2 * MIN_LABELED} (label a small input with `titans teacher-label`)")
    n = default_sample_rows(rows) if c.sample_rows is None else c.sample_rows
    if n >= rows:
        raise ValueError(f"--sample-rows {n:,} is not below the input's {rows:,} readable rows; "
                         f"label it all with `titans teacher-label`, or sample fewer rows")
    x = plan.usable_rows(check, features)
    checks = Tally()
    k, parameters, teacher, _ = plan.check_teacher(
        job.teacher, features, x, checks, keep=True,
        rows=VOUCHED_CHECK_ROWS if vouched else plan.TEACHER_CHECK_ROWS)
    if k < 2:
        raise ValueError(f"--teacher has {k} output; a classifier needs at least 2 classes")
    teacher_flops, proxy, counted_on = counted_flops(teacher, x[:FLOPS_ROWS], teacher_sha256)
    checks.add(counted_on)
    vocab = None
    if isinstance(features, TokenSpec):
        token_candidates(k, c.student_budget * teacher_flops)  # budget too small?
        vocab = teacher_vocab(teacher)
    else:
        candidate_architectures(features.dim, k, c.student_budget * teacher_flops)
    columns = LabelColumns(job.column_prefix)
    columns.output_schema(source.schema, columns.cascade_fields())  # a clash with an added column?
    return Launch(source, row_counts, check, x, features, k, teacher_flops, parameters, proxy, n,
                  columns, teacher_check_rows=checks.rows, teacher_vocab=vocab)


def job_config(cls, job, **changes):
    """A ``cls`` (RunConfig, TeacherLabelConfig) with the JobConfig ``job``'s fields and
    ``changes``: a phase's job is the user's job with another input or output."""
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(plan.JobConfig)}
    return cls(**{**fields, "skip_rows": {}, "skip_labeled": None, **changes})


def file_row_counts(source, threads: int = 8) -> list[int]:
    """Rows per input file: from the footers (Parquet; 0 for a file that does not fit the
    schema), or by counting each TFRecord file's records."""
    if isinstance(source, ParquetInput):
        return [0 if f in source.conflicts else n for f, n in zip(source.files, source.file_rows)]
    with ThreadPoolExecutor(max(1, min(threads, len(source.files)))) as pool:
        return list(pool.map(lambda f: count_records(f, source), source.files))


__all__ = ["Launch", "plan_launch", "default_sample_rows", "file_row_counts", "FILE_COL",
           "ROW_COL", "MIN_LABELED", "CHECK_ROWS", "job_config"]

"""`titans run`: the cascade pipeline, composed from named transforms (see README's diagram)."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.ml.inference.base import RunInference

from titans.pipeline import manifest
from titans.pipeline.graphs import counts
from titans.pipeline.graphs.counts import Count
from titans.pipeline.plan import CascadePlan
from titans.pipeline.report import CascadeReport
from titans.pipeline.report_plot import plot_scores
from titans.pipeline.graphs.model_counts import CountingHandler, counted
from titans.pipeline.graphs.stages import (Launch, failures, finish, read_input, tables_typed,
                                           write_labels)
from titans.transforms.dead_letter import STUDENT, TEACHER, DeadLetter
from titans.transforms.inference import ArrowModelHandler, BatchFailed
from titans.transforms.labels import AUDIT, StudentLabels, TeacherLabels
from titans.transforms.io.parquet import (ParquetInput, ReadParquetBatches, input_pattern, match_files)
from titans.transforms.split import (AUDITED, DEAD_LETTER, EASY, HARD, SeparateTeacherRows,
                                     SplitByDeferral)


def student_handler(plan: CascadePlan) -> ArrowModelHandler:
    c = plan.config
    return CountingHandler(c.student, plan.input.features,
                             StudentLabels(plan.rule, plan.input.columns),
                             batch_size=plan.input.batch_rows(c.batch_size), name=STUDENT)


def teacher_handler(plan: CascadePlan) -> ArrowModelHandler:
    c = plan.config
    return CountingHandler(c.teacher, plan.input.features, TeacherLabels(plan.input.columns),
                             batch_size=plan.input.batch_rows(c.teacher_batch_size), name=TEACHER,
                             resource_hints=c.teacher_resource_hints)


def fusion_break_before_teacher(config) -> bool:
    """Whether the hard rows are reshuffled before the teacher: when it has resource hints.

    On Dataflow, right fitting runs a step on the worker pool its hints ask for, and steps
    are fused into stages; a stage that held the student and the teacher would put every row
    on the GPU workers. The hints already give the teacher its own environment (Beam's own
    fusion never merges environments), and the Reshuffle makes the stage boundary explicit,
    as Google's right-fitting GPU sample does: CPU workers read, score with the student and
    split; the hard rows go through the shuffle to the GPU pool, where BatchElements merges
    them, across the student's bundles, into full teacher batches. Locally (no hints) the
    break would only cost time: the in-process runner materialises the hard rows first.
    """
    return bool(config.teacher_resource_hints)


def build_pipeline(p: beam.Pipeline, plan: CascadePlan, job: float | Launch) -> None:
    """read -> student -> split -> (easy | teacher(hard)) -> write, plus dead letter and report.
    ``job``: the launcher's ``Launch``, or when the command began (see ``stages.finish``)."""
    c, columns = plan.config, plan.input.columns
    names = plan.input.input_names
    tables, read_dead, count_parts, inputs_read = read_input(
        p, plan.input, plan.input.batch_rows(c.batch_size), manifest.reader_keys(plan))

    # A batch's failing rows are isolated inside the handler; a failure outside the model's
    # forward still only dead-letters its batch (and keeps the DirectRunner in-process).
    scored, student_failed = tables | "ScoreStudent" >> RunInference(
        student_handler(plan)).with_exception_handling(exc_class=BatchFailed)
    scored, student_counts = counted(scored, STUDENT, "CountStudentCalls")
    split = tables_typed(scored) | "SplitByDeferral" >> beam.ParDo(
        SplitByDeferral(plan.threshold, columns, names, c.audit_rate, c.seed)
    ).with_output_types(pa.Table, easy=pa.Table, hard=pa.Table,
                        dead_letter=DeadLetter).with_outputs(EASY, HARD, DEAD_LETTER)
    to_teacher = split[HARD]
    if fusion_break_before_teacher(c):
        to_teacher = to_teacher | "ToTeacherWorkers" >> beam.Reshuffle()
    teacher_scored, teacher_failed = to_teacher | "ScoreTeacher" >> RunInference(
        teacher_handler(plan)).with_exception_handling(exc_class=BatchFailed).with_resource_hints(
        **c.teacher_resource_hints)
    teacher_scored, teacher_counts = counted(teacher_scored, TEACHER, "CountTeacherCalls")
    teacher = tables_typed(teacher_scored) | "SeparateTeacherRows" >> beam.ParDo(
        SeparateTeacherRows(columns, names)).with_output_types(
        pa.Table, audited=tuple, dead_letter=DeadLetter).with_outputs(AUDITED, DEAD_LETTER,
                                                                      main="hard")

    # Easy and teacher rows go to labels/ through one writer each rather than a Flatten:
    # the local runners execute a multi-input Flatten outside the fused stage, which
    # materialises every labeled row in memory (2 GB and +2 s per 1M x 64 floats, measured).
    schema, fmt = plan.input.output_schema, c.output_format
    written = [write_labels(split[EASY], "WriteStudentLabels", c.output, schema, fmt, "student"),
               write_labels(teacher.hard, "WriteTeacherLabels", c.output, schema, fmt, "teacher")]
    hard_rows = split[HARD] | "NotAudited" >> beam.ParDo(_NotAudited()).with_output_types(pa.Table)
    count_parts += [
        counts.rows(split[EASY], Count.EASY, "CountEasy"),
        counts.rows(hard_rows, Count.DEFERRED, "CountDeferred"),
        counts.nonfinite_scores(hard_rows, columns.deferral_score, "CountStudentNonFinite"),
        counts.rows(teacher.hard, Count.HARD, "CountHard"),
        counts.scores(split[EASY], "easy", columns.deferral_score, "EasyScores"),
        counts.scores(teacher.hard, "hard", columns.deferral_score, "HardScores"),
        counts.rows(tables_typed(teacher_scored), Count.TEACHER_SCORED, "CountTeacherScored"),
        counts.audits(teacher[AUDITED], "CountAudits"), student_counts, teacher_counts]
    dead_parts = [read_dead, split[DEAD_LETTER], teacher[DEAD_LETTER],
                  failures(student_failed, STUDENT, names), failures(teacher_failed, TEACHER, names)]
    if c.prelabeled:  # `titans label`: its sample rows, labeled by the teacher already
        written.append(_prelabeled(p, plan, count_parts, dead_parts))
    finish(c.output, dead_parts, count_parts, written, CascadeReport(plan.facts()), job,
           plot=plot_scores, on_complete=manifest.record_for(plan, "run"),
           inputs_read=inputs_read)


def _prelabeled(p: beam.Pipeline, plan: CascadePlan, count_parts: list, dead_parts: list):
    """Rows labeled before this job, read as they are (conformed to the output schema) and
    written into labels/ by a writer of their own (prefix 'sample'), counted as PRELABELED.
    A row that does not fit the schema is dead-lettered and counted in (IN) like an input row."""
    files = match_files(input_pattern(plan.config.prelabeled))
    source = dataclasses.replace(ParquetInput.from_files(files),
                                 schema=plan.input.output_schema, conflicts={})
    read = p | "ReadPrelabeled" >> ReadParquetBatches(source, plan.config.batch_size)
    rejected = read.dead_letter | "PrelabeledRejected" >> beam.Map(lambda d: d.rows)
    count_parts += [counts.rows(read.tables, Count.PRELABELED, "CountPrelabeled"),
                    counts.rows(rejected, Count.IN, "CountPrelabeledRejected")]
    dead_parts.append(read.dead_letter)
    return write_labels(read.tables, "WritePrelabeledLabels", plan.config.output,
                        plan.input.output_schema, plan.config.output_format, "sample")


class _NotAudited(beam.DoFn):
    """The hard rows of a table bound for the teacher, without the audited easy rows."""

    def process(self, table: pa.Table):
        if AUDIT in table.column_names:
            table = table.filter(pc.invert(table.column(AUDIT)))
        if table.num_rows:
            yield table

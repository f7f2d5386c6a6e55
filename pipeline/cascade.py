"""The pipelines, composed from named transforms (see the diagram in README.md)."""
from __future__ import annotations

import importlib
import logging
import threading
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from titans.pipeline.plan import Plan
from titans.models.storage import read_json, write_json
from titans.pipeline.report import WriteReport, count_reasons, count_rows, count_scores
from titans.transforms.dead_letter import SCHEMA as DEAD_LETTER_SCHEMA
from titans.transforms.dead_letter import DeadLetter, ToDeadLetter
from titans.transforms.inference import ArrowModelHandler
from titans.transforms.labels import AUDIT, StudentLabels, TeacherLabels, TeacherProbs
from titans.transforms.parquet_io import ReadParquetBatches, WriteParquetBatches
from titans.transforms.split import (AUDITED, DEAD_LETTER, EASY, HARD, SeparateAudits,
                                     SplitByDeferral, SplitErrors)

_LOG = logging.getLogger("titans")


def student_handler(plan: Plan) -> ArrowModelHandler:
    c = plan.config
    return ArrowModelHandler(c.student, plan.features, StudentLabels(plan.rule, plan.columns),
                             batch_size=c.batch_size, name="student")


def teacher_handler(plan: Plan) -> ArrowModelHandler:
    c = plan.config
    annotate = TeacherProbs(plan.columns) if plan.teacher_only else TeacherLabels(plan.columns)
    return ArrowModelHandler(c.teacher, plan.features, annotate,
                             batch_size=c.teacher_batch_size, name="teacher",
                             resource_hints=c.teacher_resource_hints)


def build_pipeline(p: beam.Pipeline, plan: Plan, start_time: float) -> None:
    """read -> student -> split -> (easy | teacher(hard)) -> write, plus dead letter and report;
    or, for `titans teacher-label`, read -> teacher -> write."""
    c = plan.config
    names = plan.input_schema.names
    labels_dir = FileSystems.join(c.output, "labels")
    read = p | "ReadBatches" >> ReadParquetBatches(plan.pattern, c.batch_size, plan.input_schema)
    unconforming = read.dead_letter | "UnconformingTables" >> beam.Map(lambda d: d.rows)
    counts = [count_rows(read.tables, "in", "CountIn"),
              count_rows(unconforming, "in", "CountInUnconforming")]
    dead_parts = [read.dead_letter]

    if plan.teacher_only:
        scored, teacher_failed = read.tables | "ScoreTeacher" >> RunInference(
            teacher_handler(plan)).with_exception_handling()
        labeled = tables_typed(scored) | "SplitErrors" >> beam.ParDo(
            SplitErrors(names)).with_output_types(pa.Table, dead_letter=DeadLetter).with_outputs(
            DEAD_LETTER, main="ok")
        _ = labeled.ok | "WriteTeacherLabels" >> WriteParquetBatches(
            labels_dir, plan.output_schema, prefix="teacher")
        counts += [count_rows(labeled.ok, "hard", "CountLabeled"),
                   count_rows(labeled.ok, "teacher", "CountTeacher")]
        dead_parts += [labeled[DEAD_LETTER], failures(teacher_failed, "teacher", names)]
    else:
        # A batch a model raises on goes to the dead letter instead of failing the job (this
        # also keeps the DirectRunner on its in-process engine rather than starting Prism).
        scored, student_failed = read.tables | "ScoreStudent" >> RunInference(
            student_handler(plan)).with_exception_handling()
        split = tables_typed(scored) | "SplitByDeferral" >> beam.ParDo(
            SplitByDeferral(plan.threshold, plan.columns, names, c.audit_rate, c.seed)
        ).with_output_types(pa.Table, easy=pa.Table, hard=pa.Table, dead_letter=DeadLetter).with_outputs(
            EASY, HARD, DEAD_LETTER)
        teacher_scored, teacher_failed = split[HARD] | "ScoreTeacher" >> RunInference(
            teacher_handler(plan)).with_exception_handling()
        teacher = tables_typed(teacher_scored) | "SeparateAudits" >> beam.ParDo(
            SeparateAudits(plan.columns)).with_output_types(pa.Table, audited=tuple).with_outputs(
            AUDITED, main="hard")

        # Easy and teacher rows go to labels/ through one writer each rather than a Flatten:
        # the local runners execute a multi-input Flatten outside the fused stage, which
        # materialises every labeled row in memory (2 GB and +2 s per 1M x 64 floats, measured).
        _ = split[EASY] | "WriteStudentLabels" >> WriteParquetBatches(
            labels_dir, plan.output_schema, prefix="student")
        _ = teacher.hard | "WriteTeacherLabels" >> WriteParquetBatches(
            labels_dir, plan.output_schema, prefix="teacher")
        counts += [count_rows(split[EASY], "easy", "CountEasy"),
                   count_rows(teacher.hard, "hard", "CountHard"),
                   count_scores(split[EASY], "easy", plan.columns.deferral_score, "EasyScores"),
                   count_scores(teacher.hard, "hard", plan.columns.deferral_score, "HardScores"),
                   count_rows(tables_typed(teacher_scored), "teacher", "CountTeacher"),
                   teacher[AUDITED] | "CountAudits" >> beam.FlatMap(
                       lambda a: [("audit", a[0]), ("audit_agree", a[1])])]
        dead_parts += [split[DEAD_LETTER], failures(student_failed, "student", names),
                       failures(teacher_failed, "teacher", names)]

    dead = (dead_parts | "MergeDeadLetter" >> beam.Flatten()
            | "FormatDeadLetter" >> ToDeadLetter())
    _ = dead | "WriteDeadLetter" >> WriteParquetBatches(
        FileSystems.join(c.output, "dead_letter"), DEAD_LETTER_SCHEMA)
    counts += [count_rows(dead, "dead_letter", "CountDeadLetter"),
               count_reasons(dead, "CountReasons")]
    _ = (counts | "MergeCounts" >> beam.Flatten()
         | "Report" >> WriteReport(report_path(c.output), plan.facts(), start_time))


def tables_typed(pcoll):
    """Declare a RunInference output as pa.Table so Beam codes and sizes it with the Arrow
    coder (its default, pickle, serialises every batch just to sample its size). RunInference
    with exception handling rejects an output type hint, so it is set on the PCollection."""
    pcoll.element_type = pa.Table
    return pcoll


def failures(dlq, stage: str, input_names: list[str]):
    """RunInference's failed batches -> (table, reason, stage) per table, input columns only.
    Audited easy rows are dropped: they are labeled by the student already."""
    def to_dead_letter(failure):
        tables, (_, exc_repr, _) = failure
        for table in tables:
            if AUDIT in table.column_names:
                table = table.filter(pc.invert(table.column(AUDIT)))
            yield DeadLetter(table.select(input_names), f"{stage} model failed on this batch: "
                                                        f"{exc_repr}", stage)
    return dlq.failed_inferences | f"{stage.title()}Failures" >> beam.FlatMap(to_dead_letter)


def report_path(output: str) -> str:
    return FileSystems.join(output, "report.json")


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    options = PipelineOptions(beam_args)
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    return options


def run_cascade(plan: Plan, beam_args: list[str], start: float | None = None) -> dict:
    """Run the cascade to the end and return its report; ``start``: when the command began."""
    start = time.time() if start is None else start
    # matplotlib (for report.png, drawn at the end) takes ~0.3 s to import: do it while the
    # pipeline runs, which leaves the GIL free most of the time
    threading.Thread(target=importlib.import_module, args=("matplotlib.backends.backend_agg",),
                     daemon=True).start()
    options = pipeline_options(beam_args)
    p = beam.Pipeline(options=options)
    build_pipeline(p, plan, start)
    result = p.run()
    result.wait_until_finish()
    # the in-pipeline report is written before the output files are finalised: restate the
    # wall time as launch-to-finish so rows/s covers the whole job
    report = read_json(report_path(plan.config.output))
    wall = time.time() - start
    report["wall_seconds"] = round(wall, 3)
    report["rows_per_second"] = round(report["rows_in"] / wall, 1) if wall > 0 else None
    report["runner"] = str(options.view_as(StandardOptions).runner)
    report["metrics"] = titans_counters(result)
    write_json(report_path(plan.config.output), report)
    return report



def titans_counters(result) -> dict:
    """The pipeline's own counters (rows and forward calls per model), summed over workers."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace("titans"))["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # runners without metrics
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    return dict(sorted(totals.items()))

"""`titans teacher-label`: the teacher on every row, writing its class probabilities, so a
student can be distilled from unlabeled data at scale."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import RunInference

from titans.pipeline import manifest
from titans.pipeline.graphs import counts
from titans.pipeline.graphs.counts import Count
from titans.pipeline.plan import TeacherLabelPlan
from titans.pipeline.report import TeacherLabelReport
from titans.pipeline.graphs.model_counts import CountingHandler, counted
from titans.pipeline.graphs.stages import (Launch, failures, finish, read_input, tables_typed,
                                           write_labels)
from titans.transforms.dead_letter import TEACHER, DeadLetter
from titans.transforms.inference import ArrowModelHandler, BatchFailed
from titans.transforms.labels import TeacherProbs
from titans.transforms.split import DEAD_LETTER, SplitErrors


def teacher_handler(plan: TeacherLabelPlan) -> ArrowModelHandler:
    c = plan.config
    return CountingHandler(c.teacher, plan.input.features,
                             TeacherProbs(plan.input.columns, plan.num_classes),
                             batch_size=plan.input.batch_rows(c.teacher_batch_size), name=TEACHER,
                             resource_hints=c.teacher_resource_hints)


def build_pipeline(p: beam.Pipeline, plan: TeacherLabelPlan, job: float | Launch) -> None:
    """read -> teacher -> write, plus dead letter and report. ``job``: the launcher's
    ``Launch``, or when the command began (see ``stages.finish``)."""
    c, names = plan.config, plan.input.input_names
    tables, read_dead, count_parts, inputs_read = read_input(
        p, plan.input, plan.input.batch_rows(c.batch_size), manifest.reader_keys(plan))
    scored, failed = tables | "ScoreTeacher" >> RunInference(
        teacher_handler(plan)).with_exception_handling(exc_class=BatchFailed)
    scored, teacher_counts = counted(scored, TEACHER, "CountTeacherCalls")
    labeled = tables_typed(scored) | "SplitErrors" >> beam.ParDo(SplitErrors(names)).with_output_types(
        pa.Table, dead_letter=DeadLetter).with_outputs(DEAD_LETTER, main="ok")
    written = [write_labels(labeled.ok, "WriteTeacherLabels", c.output, plan.input.output_schema,
                            c.output_format, "teacher")]
    count_parts += [counts.rows(labeled.ok, Count.LABELED, "CountLabeled"),
                    counts.rows(tables_typed(scored), Count.TEACHER_SCORED, "CountTeacherScored"),
                    teacher_counts]
    finish(c.output, [read_dead, labeled[DEAD_LETTER], failures(failed, TEACHER, names)],
           count_parts, written, TeacherLabelReport(plan.facts()), job,
           on_complete=manifest.record_for(plan, "teacher-label"),
           inputs_read=inputs_read)

"""The Arrow-table ModelHandler inside a real RunInference, and the deferral split."""
import apache_beam as beam
import pytest
import numpy as np
import pyarrow as pa
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import DIM, RUNNER, features_table, logits_of
from titans.models.deferral import make_rule
from titans.transforms.features import FeatureSpec
from titans.models.loading import ModelRef
from titans.transforms.inference import ArrowModelHandler
from titans.transforms.labels import (AUDIT, ERROR, ERROR_STAGE, LabelColumns, RowErrors,
                                      StudentLabels, TeacherLabels)
from titans.transforms.split import (AUDITED, DEAD_LETTER, EASY, HARD, SeparateTeacherRows,
                                     SplitByDeferral, SplitErrors)

SPEC = FeatureSpec(("features",), DIM, vector=True)
COLS = LabelColumns()


def _tables(n=1000, per_table=150, seed=1):
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    ids = np.arange(n)
    return x, [features_table(ids[i:i + per_table], x[i:i + per_table]) for i in range(0, n, per_table)]


def test_student_handler_matches_the_model_row_for_row(models):
    student, _ = models
    x, tables = _tables()
    expected_probs, expected_score = make_rule("margin")(logits_of(student, x))
    handler = ArrowModelHandler(ModelRef(student), SPEC, StudentLabels(make_rule("margin"), COLS),
                                batch_size=400, name="student")
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:
        out = p | beam.Create(tables) | RunInference(handler)
        rows = out | beam.FlatMap(lambda t: zip(t.column("id").to_pylist(), t.column("label").to_pylist(),
                                                t.column("deferral_score").to_pylist(),
                                                t.column(ERROR).to_pylist()))
        expected = [(i, int(expected_probs[i].argmax()), float(np.float32(expected_score[i])), None)
                    for i in range(len(x))]
        assert_that(rows, equal_to(expected, equals_fn=lambda a, b: a[:2] == b[:2] and a[3] == b[3]
                                   and abs(a[2] - b[2]) < 1e-5))
        # tables are merged up to 400 rows per forward pass, yet each comes back whole
        sizes = out | beam.Map(lambda t: t.num_rows)
        assert_that(sizes, equal_to([150] * 6 + [100]), label="tables keep their rows")


def test_handler_counts_bytes_without_pickling(models):
    handler = ArrowModelHandler(ModelRef(models[0]), SPEC, TeacherLabels(COLS), batch_size=10,
                                name="teacher")
    _, tables = _tables(100, 50)
    assert handler.get_num_bytes(tables) == sum(t.nbytes for t in tables)
    assert handler.batch_elements_kwargs()["element_size_fn"](tables[0]) == 50


def _scored(scores, errors=None):
    n = len(scores)
    t = pa.table({"id": list(range(n)), "label": [0] * n, "confidence": pa.array([0.5] * n, pa.float32()),
                  "deferral_score": pa.array(scores, pa.float32())})
    errors = errors or [None] * n
    stages = [None if e is None else "validate" for e in errors]
    return t.append_column(ERROR, pa.array(errors, pa.string())).append_column(
        ERROR_STAGE, pa.array(stages, pa.string()))


def test_split_routes_every_row_once():
    table = _scored([0.1, 0.9, 0.5, 0.7, 0.2], [None, None, "bad row", None, None])
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:
        out = p | beam.Create([table]) | beam.ParDo(SplitByDeferral(0.5, COLS, ["id"])).with_outputs(
            EASY, HARD, DEAD_LETTER)
        ids = lambda t: t.column("id").to_pylist()  # noqa: E731
        assert_that(out[EASY] | "e" >> beam.FlatMap(lambda t: zip(ids(t), t.column("source").to_pylist())),
                    equal_to([(0, "student"), (4, "student")]), label="easy")
        assert_that(out[HARD] | "h" >> beam.FlatMap(ids), equal_to([1, 3]), label="hard")
        assert_that(out[DEAD_LETTER] | "d" >> beam.Map(lambda d: (d.rows.column_names, ids(d.rows), d.reasons, d.stage)),
                    equal_to([(["id"], [2], ["bad row"], "validate")]), label="dead")


def test_teacher_labels_replace_the_students():
    table = _scored([0.9, 0.8]).drop_columns([ERROR, ERROR_STAGE])
    logits = torch.tensor([[0.0, 3.0], [2.0, 0.0]])
    out = TeacherLabels(COLS)(table, logits.numpy(), RowErrors(2))
    assert out.column("label").to_pylist() == [1, 0]
    assert out.column("source").to_pylist() == ["teacher", "teacher"]
    assert out.column("confidence").to_pylist() == pytest.approx(
        [float(torch.softmax(logits, -1).max(-1).values[i]) for i in range(2)], rel=1e-6)
    assert out.column("deferral_score").to_pylist() == table.column("deferral_score").to_pylist()


def test_split_errors_and_audits_route_each_row_once():
    table = _scored([0.1, 0.2, 0.3, 0.9], [None, "bad", None, None])
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:
        out = p | "c1" >> beam.Create([table]) | beam.ParDo(SplitErrors(["id"])).with_outputs(
            DEAD_LETTER, main="ok")
        assert_that(out.ok | "ok" >> beam.FlatMap(lambda t: t.column("id").to_pylist()),
                    equal_to([0, 2, 3]), label="ok")
        assert_that(out[DEAD_LETTER] | "d" >> beam.Map(lambda d: (d.rows.column("id").to_pylist(), d.reasons)),
                    equal_to([([1], ["bad"])]), label="dead")

    # all three easy rows audited (rate 1): the hard output carries them flagged, and after
    # the teacher only the truly hard row goes on; agreement counts the audited rows
    scored = _scored([0.1, 0.2, 0.3, 0.9])
    split = SplitByDeferral(0.5, COLS, ["id"], audit_rate=1.0, seed=0)
    hard = [t for t in split.process(scored) if t.tag == HARD][0].value
    assert hard.column(AUDIT).to_pylist() == [False, True, True, True]
    # rows in order: id 3 (hard), then audited ids 0, 1, 2; the teacher says 1, 0, 1, 0
    teacher_logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    labeled = TeacherLabels(COLS)(hard, teacher_logits.numpy(), RowErrors(4))
    labeled = labeled.append_column(ERROR, pa.nulls(4, pa.string())).append_column(
        ERROR_STAGE, pa.nulls(4, pa.string()))
    with test_pipeline.TestPipeline(options=PipelineOptions(RUNNER)) as p:
        out = p | "c2" >> beam.Create([labeled]) | beam.ParDo(
            SeparateTeacherRows(COLS, ["id"])).with_outputs(AUDITED, DEAD_LETTER, main="hard")
        assert_that(out.hard | "h" >> beam.Map(lambda t: (t.column("id").to_pylist(), t.column_names)),
                    equal_to([([3], ["id", "label", "confidence", "deferral_score", "source"])]),
                    label="hard")
        # the student said 0 for every row: it agrees with the teacher on ids 0 and 2
        assert_that(out[AUDITED], equal_to([(3, 2)]), label="audited")

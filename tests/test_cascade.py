"""The whole cascade on real Parquet files and real TorchScript models (in-process runner)."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DIM, RUNNER, features_table, logits_of, read_labels, write_dataset
from titans.models.deferral import make_rule
from titans.transforms.io.models import save_torchscript
from titans.pipeline.job import run_cascade
from titans.pipeline.plan import RunConfig, plan_run
from titans.models.loading import ModelRef


def _run(data, out, models, **kw):
    student, teacher = models
    config = RunConfig(input=data, output=str(out), student=ModelRef(student),
                       teacher=ModelRef(teacher), batch_size=kw.pop("batch_size", 512), **kw)
    return run_cascade(plan_run(config), RUNNER)


def _bad_rows_file(directory, first_id):
    """Rows that must go to the dead letter: null vector, wrong length, NaN, and one good row."""
    vec = pa.array([None, [1.0] * (DIM + 1), [float("nan")] + [0.0] * (DIM - 1), [0.5] * DIM],
                   pa.list_(pa.float32()))
    ids = np.arange(first_id, first_id + 4)
    t = pa.table({"id": pa.array(ids, pa.int64()), "features": vec.cast(pa.list_(pa.float32())),
                  "note": pa.array([f"row {i}" for i in ids])})
    pq.write_table(t, os.path.join(directory, "zz-bad.parquet"))


def test_every_row_accounted_for_once_with_bad_rows_mixed_in(tmp_path, models):
    data = tmp_path / "data"
    x = write_dataset(data, 3000, files=3, row_group_size=400)
    # the first file fixes the schema (fixed-size list); this one uses a variable list -> cast
    _bad_rows_file(data, 3000)
    report = _run(str(data), tmp_path / "out", models, deferral_rate=0.25)

    labels = read_labels(tmp_path / "out")
    dead = pq.read_table(tmp_path / "out" / "dead_letter")
    dead_ids = sorted(json.loads(r)["id"] for r in dead.column("row").to_pylist())
    all_ids = labels.column("id").to_pylist() + dead_ids
    assert sorted(all_ids) == list(range(3004))  # each input id exactly once
    assert dead_ids == [3000, 3001, 3002]
    stage_of = {json.loads(r)["id"]: s for r, s in zip(dead.column("row").to_pylist(),
                                                       dead.column("stage").to_pylist())}
    # the wrong-length vector cannot even be cast to the first file's fixed-size list
    assert stage_of == {3000: "validate", 3001: "read", 3002: "validate"}
    assert report["rows_in"] == 3004 == report["rows_easy"] + report["rows_hard"] + report["rows_dead_letter"]
    assert report["rows_dead_letter"] == 3 and report["conservation_ok"]
    assert sum(report["dead_letter_reasons"].values()) == 3

    # input columns pass through unchanged, the four label columns are added
    assert labels.column_names == ["id", "features", "note", "label", "confidence", "deferral_score", "source"]
    good = labels.filter(pa.compute.less(labels.column("id"), 3000))
    assert good.column("note").to_pylist() == [f"row {i}" for i in range(3000)]
    np.testing.assert_array_equal(np.stack(good.column("features").to_numpy(zero_copy_only=False)), x)


def test_teacher_sees_exactly_the_hard_rows(tmp_path, models):
    data = tmp_path / "data"
    x = write_dataset(data, 2000, files=2, row_group_size=300)
    report = _run(str(data), tmp_path / "out", models, threshold=0.9)
    labels = read_labels(tmp_path / "out")
    source = np.array(labels.column("source").to_pylist())
    score = labels.column("deferral_score").to_numpy()
    hard = source == "teacher"
    assert (hard == (score > 0.9)).all()
    assert report["rows_hard"] == hard.sum() == report["metrics"]["teacher_rows"]
    assert report["rows_teacher_scored"] == hard.sum()
    assert report["metrics"]["student_rows"] == 2000
    hist = report["deferral_score_histogram"]
    assert sum(hist["easy"]) == report["rows_easy"] and sum(hist["hard"]) == report["rows_hard"]
    first_hard_bin = int(0.9 * (len(hist["bin_edges"]) - 1))  # the bin holding the threshold
    assert not any(hist["hard"][:first_hard_bin])
    assert (tmp_path / "out" / "report.png").stat().st_size > 5_000

    student, teacher = models
    s_probs, s_score = make_rule("margin")(logits_of(student, x))
    t_label = logits_of(teacher, x).argmax(-1).numpy()
    label = labels.column("label").to_numpy()
    np.testing.assert_array_equal(label[hard], t_label[hard])
    np.testing.assert_array_equal(label[~hard], s_probs.argmax(-1).numpy()[~hard])
    np.testing.assert_allclose(score, s_score.numpy(), atol=1e-5)


def test_two_runs_give_identical_labels(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 1500)
    _run(str(data), tmp_path / "a", models, deferral_rate=0.3)
    _run(str(data), tmp_path / "b", models, deferral_rate=0.3)
    assert read_labels(tmp_path / "a").equals(read_labels(tmp_path / "b"))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_deferral_rate_lands_within_two_points(tmp_path, models, rate):
    data = tmp_path / "data"
    write_dataset(data, 20000, files=4, row_group_size=2500, seed=3)
    # threshold from a 4000-row sample; the rate is measured on all 20000 rows
    report = _run(str(data), tmp_path / "out", models, deferral_rate=rate, sample_rows=4000)
    assert abs(report["deferral_rate"] - rate) <= 0.02
    assert report["requested_deferral_rate"] == rate
    assert "sample of" in report["threshold_source"]


class Picky(torch.nn.Module):
    """A model that raises on a batch holding any feature above 100."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100).any()):
            raise RuntimeError("input out of range")
        return self.linear(x)


def test_a_row_the_model_raises_on_goes_to_the_dead_letter_alone(tmp_path, models):
    data = tmp_path / "data"
    x = np.random.default_rng(0).normal(size=(1000, DIM)).astype(np.float32)
    x[[10, 11, 517], 0] = 1000.0  # the model raises on any batch holding one of these rows
    os.makedirs(data)
    pq.write_table(features_table(np.arange(1000), x), data / "part.parquet", row_group_size=100)
    picky = str(tmp_path / "picky.pt")
    save_torchscript(Picky(), picky)
    config = RunConfig(input=str(data), output=str(tmp_path / "out"), student=ModelRef(picky),
                       teacher=ModelRef(models[1]), batch_size=400, deferral_rate=0.2)
    report = run_cascade(plan_run(config), RUNNER)
    assert report["rows_dead_letter"] == 3 and report["conservation_ok"]
    (reason, n), = report["dead_letter_reasons"].items()
    assert n == 3 and "student model failed on this row" in reason and "out of range" in reason
    dead = pq.read_table(tmp_path / "out" / "dead_letter")
    assert sorted(json.loads(r)["id"] for r in dead.column("row").to_pylist()) == [10, 11, 517]
    assert set(dead.column("stage").to_pylist()) == {"student"}
    assert read_labels(tmp_path / "out").num_rows == 997
    # bisection, not one forward per row: 3 bad rows in batches of up to 400 rows
    assert report["metrics"]["student_forward_calls"] < 3 + 2 * 3 * 10 + 3 * 3


def test_two_parallel_workers_label_every_row_once(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 4000, files=4, row_group_size=500)
    student, teacher = models
    config = RunConfig(input=str(data), output=str(tmp_path / "out"), student=ModelRef(student),
                       teacher=ModelRef(teacher), batch_size=256, deferral_rate=0.2)
    report = run_cascade(plan_run(config), ["--runner", "DirectRunner", "--direct_num_workers", "2",
                                            "--direct_running_mode", "multi_threading"])
    assert sorted(read_labels(tmp_path / "out").column("id").to_pylist()) == list(range(4000))
    assert report["conservation_ok"] and report["metrics"]["teacher_rows"] == report["rows_hard"]


def test_no_batch_is_pickled(tmp_path, models, monkeypatch):
    """Tables travel and are sized with the Arrow coder: a PCollection left untyped falls back
    to pickle, and Beam then pickles a whole batch every time it samples an element's size
    (745 MB pickled in a 4M-row run when RunInference's outputs were untyped)."""
    import pickle

    pickled = []
    dumps = pickle.dumps

    def spy(obj, *args, **kwargs):
        if isinstance(obj, pa.Table):
            pickled.append(obj.num_rows)
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(pickle, "dumps", spy)
    write_dataset(tmp_path / "data", 3000, files=2, row_group_size=1000)
    report = _run(str(tmp_path / "data"), tmp_path / "out", models, deferral_rate=0.25)
    assert report["rows_in"] == 3000
    assert pickled == []

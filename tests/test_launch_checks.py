"""What the launch checks run the models on, said and counted (issue 16, item 10).

The teacher here is a real state_dict MLP whose class counts every row it is run on, in this
process (the in-process runner runs the pipelines here too), so the report's teacher rows are
checked against what the teacher really did, launch checks included.
"""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import CLASSES, DIM, RUNNER, features_table, write_dataset
from titans.models.architectures import MLP
from titans.transforms.io.models import save_torchscript
from titans.pipeline.cli.main import main

TEACHER_CLASS = "test_launch_checks:CountingTeacher"
TEACHER_KWARGS = json.dumps({"in_features": DIM, "out_features": CLASSES, "hidden": [32, 32]})


class CountingTeacher(MLP):
    """An MLP that counts the rows of every forward call, wherever it is built."""
    rows = 0

    def forward(self, x):
        CountingTeacher.rows += int(x.shape[0])
        return super().forward(x)


@pytest.fixture
def counting_teacher(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "teacher_state.pt")
    torch.save(MLP(DIM, CLASSES, (32, 32)).state_dict(), path)
    CountingTeacher.rows = 0
    yield ["--teacher", path, "--teacher-class", TEACHER_CLASS,
           "--teacher-class-kwargs", TEACHER_KWARGS]
    CountingTeacher.rows = 0


class NonFiniteStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.linear(x) * float("nan")


def test_a_student_non_finite_on_every_sampled_row_is_named(tmp_path, capsys):
    write_dataset(tmp_path / "data", 500, files=1)
    student = str(tmp_path / "student.pt")
    save_torchscript(NonFiniteStudent(), student)
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher.pt")
    save_torchscript(MLP(DIM, CLASSES, (16,)), teacher)
    code = main(["run", "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                 "--student", student, "--teacher", teacher, *RUNNER])
    err = capsys.readouterr().err
    assert code == 2
    assert "zero scores" not in err
    assert "non-finite outputs (NaN or inf) on all 500 sampled rows" in err and "check the" in err


def test_run_reports_the_teacher_rows_of_the_launch_checks(tmp_path, counting_teacher, capsys):
    student_path = str(tmp_path / "student.pt")
    torch.manual_seed(1)
    save_torchscript(MLP(DIM, CLASSES, (6,)), student_path)
    write_dataset(tmp_path / "data", 3000, files=2)
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path / "data"), "--output", str(out), "--student",
                 student_path, *counting_teacher, "--deferral-rate", "0.2", *RUNNER]) == 0
    report = json.loads((out / "report.json").read_text())
    # the model check (2 example rows) and the sample check (256 rows) at launch
    assert report["rows_teacher_checks"] == 2 + 256
    assert CountingTeacher.rows == report["rows_teacher_scored"] + report["rows_teacher_checks"]
    assert "launch checks: 258" in capsys.readouterr().out


def test_teacher_label_reports_the_teacher_rows_of_the_launch_checks(tmp_path, counting_teacher,
                                                                     capsys):
    write_dataset(tmp_path / "data", 100, files=1)
    out = tmp_path / "out"
    assert main(["teacher-label", "--input", str(tmp_path / "data"), "--output", str(out),
                 *counting_teacher, *RUNNER]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows_teacher_checks"] == 2 + 100
    assert CountingTeacher.rows == report["rows_labeled"] + report["rows_teacher_checks"]
    assert "launch checks: 102" in capsys.readouterr().out


def test_label_counts_every_teacher_row_of_the_job(tmp_path, counting_teacher, monkeypatch,
                                                   capsys):
    from titans.models import student_search

    monkeypatch.setattr(student_search, "TRAIN_STEPS", 1000)  # tiny students converge fast
    n = 2400
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    os.makedirs(tmp_path / "data")
    for i, part in enumerate(np.array_split(np.arange(n), 3)):
        pq.write_table(features_table(part, x[part]), tmp_path / "data" / f"part-{i}.parquet",
                       row_group_size=250)
    out = tmp_path / "out"
    assert main(["label", "--input", str(tmp_path / "data"), "--output", str(out),
                 *counting_teacher, "--id-column", "id", "--sample-rows", "800",
                 "--deferral-rate", "0.2", *RUNNER]) == 0
    report = json.loads((out / "report.json").read_text())
    # the one launch plan: model check 2 + sample check 256 + FLOPs count 64; the teacher-label
    # and cascade phases plan from it and run no teacher check of their own
    assert report["rows_teacher_checks"] == 2 + 256 + 64
    assert report["rows_to_teacher"] == (report["rows_prelabeled"] + report["rows_teacher_scored"]
                                         + report["rows_teacher_checks"])
    assert CountingTeacher.rows == report["rows_to_teacher"]  # every row the teacher ran on
    assert f"teacher rows: {report['rows_to_teacher']:,}" in capsys.readouterr().out


def test_a_warm_state_run_tries_the_teacher_it_ran_before_on_a_handful_of_rows(
        tmp_path, counting_teacher, monkeypatch):
    from titans.models import student_search
    from titans.pipeline.label.launch import VOUCHED_CHECK_ROWS

    monkeypatch.setattr(student_search, "TRAIN_STEPS", 1000)  # tiny students converge fast
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2400, DIM)).astype(np.float32)
    os.makedirs(tmp_path / "data")
    pq.write_table(features_table(np.arange(2400), x), tmp_path / "data" / "part-0.parquet")
    checks = []
    for run in ("cold", "warm"):
        CountingTeacher.rows = 0
        out = tmp_path / f"out-{run}"
        assert main(["label", "--input", str(tmp_path / "data"), "--output", str(out),
                     *counting_teacher, "--id-column", "id", "--sample-rows", "800",
                     "--deferral-rate", "0.2", "--state", str(tmp_path / "state"),
                     *RUNNER]) == 0
        report = json.loads((out / "report.json").read_text())
        assert CountingTeacher.rows == report["rows_to_teacher"]  # every row the teacher ran on
        checks.append(report["rows_teacher_checks"])
    # cold: model check 2 + sample check 256 (+ the FLOPs count, unless cached by another
    # test's run of this teacher); warm: the state ran this teacher file: 2 + a handful
    assert checks[0] in (2 + 256, 2 + 256 + 64)
    assert checks[1] == 2 + VOUCHED_CHECK_ROWS


class CountingStudent(MLP):
    """The student's counterpart of CountingTeacher."""
    rows = 0

    def forward(self, x):
        CountingStudent.rows += int(x.shape[0])
        return super().forward(x)


def _png_digits(directory, n: int) -> None:
    import io

    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for pixels in rng.integers(0, 256, (n, 8, 8), dtype=np.uint8):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        blobs.append(buf.getvalue())
    os.makedirs(directory)
    pq.write_table(pa.table({"id": np.arange(n), "image": pa.array(blobs, pa.binary())}),
                   directory / "a.parquet", row_group_size=n // 4)


def test_the_image_sample_is_a_bounded_share_of_the_input():
    from titans.pipeline.plan import RunConfig, sample_rows
    from titans.models.loading import ModelRef
    from titans.transforms.features import ImageSpec

    images = RunConfig(input="x", output="y", student=ModelRef("s"), teacher=ModelRef("t"),
                       image=ImageSpec("image"))
    assert [sample_rows(images, n) for n in (500, 5000, 50_000, 10**7, None)] == \
        [1000, 1000, 5000, 10_000, 10_000]
    given = RunConfig(input="x", output="y", student=ModelRef("s"), teacher=ModelRef("t"),
                      image=ImageSpec("image"), sample_rows=30_000)
    vectors = RunConfig(input="x", output="y", student=ModelRef("s"), teacher=ModelRef("t"))
    assert sample_rows(given, 10**7) == 30_000 and sample_rows(vectors, 5000) == 100_000


@pytest.mark.parametrize("sample_flag", [[], ["--sample-rows", "300"]])
def test_images_launch_scores_a_bounded_sample_once(tmp_path, monkeypatch, capsys, sample_flag):
    # the image sample is IMAGE_SAMPLE_ROWS unless --sample-rows is given (here 120 for the
    # real 10,000, over 600 images, 10% of them: 60, below the minimum of 100 here); the
    # student scores it once, the teacher a handful of it
    from titans.pipeline import plan

    monkeypatch.setattr(plan, "IMAGE_SAMPLE_ROWS", 120)
    monkeypatch.setattr(plan, "IMAGE_SAMPLE_MIN", 100)
    _png_digits(tmp_path / "data", 600)
    torch.manual_seed(0)
    models = []
    for role, cls in (("student", CountingStudent), ("teacher", CountingTeacher)):
        path = str(tmp_path / f"{role}.pt")
        torch.save(MLP(64, CLASSES, (8,)).state_dict(), path)
        cls.rows = 0
        models += [f"--{role}", path, f"--{role}-class", f"test_launch_checks:{cls.__name__}",
                   f"--{role}-class-kwargs",
                   json.dumps({"in_features": 64, "out_features": CLASSES, "hidden": [8]})]
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path / "data"), "--output", str(out), *models,
                 "--image-column", "image", "--image-mode", "L", "--deferral-rate", "0.2",
                 *sample_flag, *RUNNER]) == 0
    report = json.loads((out / "report.json").read_text())
    sampled = 300 if sample_flag else 100
    assert f"over {sampled} rows" in report["threshold_source"]
    assert report["rows_teacher_checks"] == 2 + min(plan.TEACHER_CHECK_ROWS, sampled)
    assert CountingTeacher.rows == report["rows_teacher_scored"] + report["rows_teacher_checks"]
    # student: its model check (2 rows), the sample once, then every row in the pipeline
    assert CountingStudent.rows == 2 + sampled + 600
    assert report["rows_in"] == 600 and report["conservation_ok"]

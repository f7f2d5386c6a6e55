"""A labeling job's promise under faults: bad rows, misbehaving models, reruns, kills.

Every test here pins down a failure that was observed (issue 6) and would catch it again.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import DIM, RUNNER, features_table, read_labels, write_dataset
from titans.models.loading import ModelRef
from titans.transforms.io.models import save_torchscript
from titans.pipeline.cli.main import main
from titans.pipeline.job import run_cascade, run_teacher_label
from titans.pipeline.plan import (RunConfig, TeacherLabelConfig, plan_run, plan_teacher_label)
from titans.transforms.features import FeatureSpec, feature_matrix

RAISE, NAN, HUGE = 777.0, 555.0, 1e38


class Faulty(torch.nn.Module):
    """Raises on a batch holding a row whose first feature is RAISE; NaN logits on rows whose
    first feature is NaN; overflows to inf on rows near float32's limit."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 777.0).any()):
            raise RuntimeError("cannot score this row")
        out = self.net(x) * 1.0e3  # inputs near 1e38 overflow to inf here
        nan = torch.full_like(out, float("nan"))
        return torch.where((x[:, 0] == 555.0).unsqueeze(1), nan, out)


def faulty_model(path, seed=0) -> str:
    torch.manual_seed(seed)
    save_torchscript(Faulty(), str(path))
    return str(path)


def _dead(out) -> dict:
    """{id: (stage, reason)} of the dead letter."""
    dead = pq.read_table(os.path.join(out, "dead_letter"))
    return {json.loads(r)["id"]: (s, why) for r, s, why in zip(
        dead.column("row").to_pylist(), dead.column("stage").to_pylist(),
        dead.column("reason").to_pylist())}


def _cascade(data, out, student, teacher, **kw):
    config = RunConfig(input=str(data), output=str(out), student=ModelRef(student),
                       teacher=ModelRef(teacher), batch_size=kw.pop("batch_size", 256), **kw)
    return run_cascade(plan_run(config), RUNNER)


# ------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize("fixed", [True, False])
def test_nan_and_inf_features_get_a_reason_naming_the_column(fixed):
    x = np.arange(40, dtype=np.float32).reshape(5, 8)
    x[1, 3], x[3, 0] = np.nan, -np.inf
    table = features_table(np.arange(5), x, fixed=fixed)  # read-only Arrow memory
    matrix, reasons = feature_matrix(table, FeatureSpec(("features",), 8, vector=True))
    assert [r is None for r in reasons] == [True, False, True, False, True]
    assert "NaN or inf" in reasons[1] and "'features'" in reasons[1]
    np.testing.assert_array_equal(matrix[[0, 2, 4]], x[[0, 2, 4]])
    assert (matrix[[1, 3]] == 0).all()


def test_no_label_ever_comes_from_a_non_finite_output(tmp_path, models):
    x = np.random.default_rng(1).normal(size=(3000, DIM)).astype(np.float32)
    x[100:110, 0] = NAN      # student and teacher both return NaN here
    x[200:205, 0] = HUGE     # overflows to inf in both models
    x[300, 3] = np.nan       # a NaN feature: dead letter before any model runs
    os.makedirs(tmp_path / "data")
    pq.write_table(features_table(np.arange(3000), x), tmp_path / "data" / "a.parquet",
                   row_group_size=500)
    faulty = faulty_model(tmp_path / "faulty.pt")
    # the faulty model as student (with a sound teacher): its non-finite rows go to the teacher
    report = _cascade(tmp_path / "data", tmp_path / "s", faulty, models[1], deferral_rate=0.1)
    labels = read_labels(tmp_path / "s")
    bad = list(range(100, 110)) + list(range(200, 205))
    rows = labels.filter(pa.compute.is_in(labels.column("id"), pa.array(bad)))
    assert rows.num_rows == 15 and set(rows.column("source").to_pylist()) == {"teacher"}
    assert report["rows_student_nonfinite"] == 15 and report["conservation_ok"]
    assert np.isfinite(labels.column("confidence").to_numpy()).all()
    assert _dead(tmp_path / "s") == {300: ("validate", "null, NaN or inf value in feature vector 'features'")}

    # ... and as teacher: its non-finite rows go to the dead letter, never labeled
    report = _cascade(tmp_path / "data", tmp_path / "t", models[0], faulty, deferral_rate=1.0)
    dead = _dead(tmp_path / "t")
    assert sorted(dead) == sorted(bad + [300]) and report["conservation_ok"]
    assert {dead[i] for i in bad} == {("teacher", "teacher output is not finite (NaN or inf logits)")}
    assert report["rows_deferred"] == 2999 and report["rows_hard"] == 2984
    assert report["deferral_rate"] == 1.0  # the teacher's failures are still deferred rows


def test_teacher_label_dead_letters_non_finite_and_failing_rows(tmp_path):
    x = np.random.default_rng(2).normal(size=(1000, DIM)).astype(np.float32)
    x[[5, 6], 0] = NAN
    x[[700], 0] = RAISE
    os.makedirs(tmp_path / "data")
    pq.write_table(features_table(np.arange(1000), x), tmp_path / "data" / "a.parquet")
    faulty = faulty_model(tmp_path / "faulty.pt")
    report = run_teacher_label(plan_teacher_label(TeacherLabelConfig(
        input=str(tmp_path / "data"), output=str(tmp_path / "out"), teacher=ModelRef(faulty),
        batch_size=300)), RUNNER)
    assert report["rows_labeled"] == 997 and report["rows_dead_letter"] == 3
    dead = _dead(tmp_path / "out")
    assert sorted(dead) == [5, 6, 700] and "cannot score this row" in dead[700][1]


# ------------------------------------------------------------------ row-level isolation

def test_a_model_broken_on_every_row_is_a_launch_error(tmp_path, models):
    data = tmp_path / "data"
    x = np.full((50, DIM), RAISE, np.float32)
    os.makedirs(data)
    pq.write_table(features_table(np.arange(50), x), data / "a.parquet")
    with pytest.raises(ValueError, match="fails on every sampled row.*cannot score this row"):
        plan_run(RunConfig(input=str(data), output=str(tmp_path / "out"),
                           student=ModelRef(faulty_model(tmp_path / "f.pt")), teacher=ModelRef(models[1])))


def test_a_model_failing_on_a_few_sampled_rows_still_runs(tmp_path, models):
    data = tmp_path / "data"
    x = np.random.default_rng(3).normal(size=(400, DIM)).astype(np.float32)
    x[[3, 90], 0] = RAISE  # inside the launch sample
    os.makedirs(data)
    pq.write_table(features_table(np.arange(400), x), data / "a.parquet")
    report = _cascade(data, tmp_path / "out", faulty_model(tmp_path / "f.pt"), models[1])
    assert sorted(_dead(tmp_path / "out")) == [3, 90] and report["rows_easy"] + report["rows_hard"] == 398


# ------------------------------------------------------------------ output protocol

def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "run", *args, *RUNNER],
                          capture_output=True, text=True, timeout=600)


def test_killed_run_is_visibly_incomplete_and_a_rerun_never_duplicates(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 1_500_000, files=3, row_group_size=50_000)
    out = tmp_path / "out"
    args = ["--input", str(data), "--output", str(out), "--student", models[0], "--teacher",
            models[1], "--batch-size", "20000", "--id-column", "id"]
    proc = subprocess.Popen([sys.executable, "-m", "titans.pipeline.cli.main", "run", *args, *RUNNER],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            f.endswith(".parquet") for _, _, fs in os.walk(out) for f in fs):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert left, "the run was killed before it wrote anything; the test proves nothing"
    assert not (out / "_SUCCESS").exists()  # visibly incomplete

    again = _run_cli(*args)  # the killed run's lock is there: refused, naming it
    assert again.returncode == 2 and f"pid {proc.pid}" in again.stderr
    assert "no longer running" in again.stderr and "--overwrite" in again.stderr
    done = _run_cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    ids = read_labels(out).column("id").to_numpy()
    assert len(ids) == 1_500_000 and (np.sort(ids) == np.arange(1_500_000)).all()
    assert not [f for _, _, fs in os.walk(out / "labels") for f in fs if not f.endswith(".parquet")]
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_in"] == 1_500_000
    last_label = max(os.path.getmtime(os.path.join(d, f))
                     for d, _, fs in os.walk(out) for f in fs if f != "_SUCCESS")
    assert os.path.getmtime(out / "_SUCCESS") >= last_label  # the marker is written last


def test_overwrite_deletes_nothing_until_every_check_has_passed(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 500, files=1)
    out = tmp_path / "out"
    args = ["--input", str(data), "--output", str(out), "--student", models[0], "--teacher", models[1]]
    assert _run_cli(*args).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    typo = subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "run", *args, "--overwrite",
                           "--runner", "FnApiRuner"], capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "FnApiRuner" in typo.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    subprocess.run(["chattr", "+i", str(out)], check=True)  # read-only, even for root
    try:
        ro = _run_cli(*args, "--overwrite")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert ro.returncode == 2 and "cannot write to output directory" in ro.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert read_labels(out).num_rows == 500


def test_over_the_dead_letter_budget_the_job_fails_with_its_report(tmp_path, models):
    data = tmp_path / "data"
    x = np.random.default_rng(4).normal(size=(1000, DIM)).astype(np.float32)
    x[:150, 2] = np.nan  # 15% of rows unusable, more than the default budget of 10%
    os.makedirs(data)
    pq.write_table(features_table(np.arange(1000), x), data / "a.parquet")
    out = tmp_path / "out"
    args = ["--input", str(data), "--output", str(out), "--student", models[0], "--teacher", models[1]]
    failed = _run_cli(*args)
    assert failed.returncode == 1 and "JOB FAILED" in failed.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["dead_letter_budget_exceeded"] and report["rows_dead_letter"] == 150
    assert report["status"].startswith("failed") and not (out / "_SUCCESS").exists()
    assert _run_cli(*args, "--overwrite", "--max-dead-letter-rate", "0.2").returncode == 0
    assert (out / "_SUCCESS").exists()


# ------------------------------------------------------------------ small things (point 10)

def test_threshold_must_be_a_number_and_minus_inf_parses(tmp_path, capsys, models):
    data = tmp_path / "data"
    write_dataset(data, 300, files=1)
    base = ["run", "--input", str(data), "--student", models[0], "--teacher", models[1], *RUNNER]
    assert main([*base, "--output", str(tmp_path / "a"), "--threshold", "nan"]) == 2
    assert "not NaN" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b"), "--threshold", "-inf"]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["rows_hard"] == 300 and report["threshold"] == "-inf"


def test_deferral_rate_zero_sends_no_row_beyond_the_sample(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 20000, files=2, row_group_size=2000)
    report = _cascade(data, tmp_path / "out", *models, deferral_rate=0.0, sample_rows=500)
    assert report["rows_deferred"] == 0 and report["rows_easy"] == 20000
    report = _cascade(data, tmp_path / "all", *models, deferral_rate=1.0, sample_rows=500)
    assert report["rows_hard"] == 20000


def test_an_all_empty_input_says_so(tmp_path, models):
    os.makedirs(tmp_path / "data")
    pq.write_table(features_table(np.arange(0), np.zeros((0, DIM), np.float32)),
                   tmp_path / "data" / "a.parquet")
    with pytest.raises(ValueError, match="has no rows"):
        plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                           student=ModelRef(models[0]), teacher=ModelRef(models[1])))


def test_a_shape_mismatch_is_one_short_line(tmp_path, capsys, models):
    from titans.models.architectures import MLP

    data = tmp_path / "data"
    write_dataset(data, 100, files=1)
    wide = str(tmp_path / "wide.pt")
    save_torchscript(MLP(DIM + 3, 4, (5,)), wide)
    code = main(["run", "--input", str(data), "--output", str(tmp_path / "out"), "--student",
                 models[0], "--teacher", wide, *RUNNER])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 400, err
    assert f"does not accept a float32 [batch, {DIM}] input" in err


# ------------------------------------------------------------------ launch checks before deletion (issue 16, item 2)

def _files(out) -> dict:
    """{relative path: bytes} of every file under ``out``."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_label_job(tmp_path_factory):
    """A finished `titans label` job (labels, report, _SUCCESS, student, calibration, _label/)
    over 1,200 rows, built once; each test works on its own copy."""
    from conftest import save_models
    from titans.models import student_search

    base = tmp_path_factory.mktemp("label_job")
    write_dataset(base / "data", 1200, files=2)
    _, teacher = save_models(base)
    steps, student_search.TRAIN_STEPS = student_search.TRAIN_STEPS, 300
    try:
        args = ["label", "--input", str(base / "data"), "--output", str(base / "out"),
                "--teacher", teacher, "--id-column", "id", "--sample-rows", "300"]
        assert main([*args, *RUNNER]) == 0
    finally:
        student_search.TRAIN_STEPS = steps
    assert {"_SUCCESS", "report.json", "student.pt", "calibration.json"} <= set(_files(base / "out"))
    return base, args


def _copy_of(job, tmp_path) -> tuple:
    import shutil

    base, args = job
    out = tmp_path / "out"
    shutil.copytree(base / "out", out)
    return out, [str(out) if a == str(base / "out") else a for a in args]


def test_label_overwrite_with_an_unknown_runner_leaves_the_finished_job_as_it_was(
        finished_label_job, tmp_path, capsys):
    out, args = _copy_of(finished_label_job, tmp_path)
    before = _files(out)
    code = main([*args, "--overwrite", "--runner", "NoSuchRunner"])
    captured = capsys.readouterr()
    assert code == 2 and "NoSuchRunner" in captured.err
    assert "[1/5" not in captured.out  # not a phase started
    assert _files(out) == before  # byte for byte: labels, report, _SUCCESS, student, calibration


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_label_student_device_cuda_without_a_gpu_fails_before_phase_1(
        finished_label_job, tmp_path, capsys):
    out, args = _copy_of(finished_label_job, tmp_path)
    before = _files(out)
    code = main([*args, "--overwrite", "--student-device", "cuda", *RUNNER])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and "[1/5" not in captured.out
    assert err.startswith("titans label: error: --student-device cuda: no CUDA device on this "
                          "machine") and len(err.splitlines()) == 1, err
    assert _files(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("command", ["run", "teacher-label"])
def test_overwrite_with_a_cuda_device_this_machine_lacks_deletes_nothing(
        tmp_path, models, capsys, command):
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 500, files=1)
    args = [command, "--input", str(data), "--output", str(out), "--teacher", models[1], *RUNNER]
    if command == "run":
        args += ["--student", models[0]]
    assert main(args) == 0
    before = _files(out)
    capsys.readouterr()
    code = main([*args, "--overwrite", "--teacher-device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"titans {command}: error: --teacher-device cuda: no CUDA device on "
                          f"this machine"), err
    assert _files(out) == before


def test_a_dataflow_launcher_does_not_check_the_workers_devices(models):
    """Devices are checked where the models run: not on a launcher handing the job over."""
    from titans.pipeline.job import check_devices, pipeline_options

    cuda = {"teacher": ModelRef(models[1], device="cuda")}
    check_devices(pipeline_options(["--runner", "DataflowRunner"]), cuda)  # no error
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--teacher-device cuda: no CUDA device"):
            check_devices(pipeline_options(RUNNER), cuda)


def test_demo_with_an_unknown_runner_keeps_the_previous_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "summary.json").write_text('{"previous": true}')
    (out / "run" / "_SUCCESS").write_text("{}")
    before = _files(out)
    assert main(["demo", "--output", str(out), "--runner", "NoSuchRunner"]) == 2
    assert "NoSuchRunner" in capsys.readouterr().err
    assert _files(out) == before

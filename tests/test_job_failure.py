"""A job that fails must fail (issue 20): on every runner, with exit code 1 and one line, and
without dead-lettering rows for a machine's fault; --overwrite replaces the previous output
only at the job's end. Real runs (in-process FnApiRunner), real torch models: Python model
classes (tests/fault_models.py) raise what TorchScript cannot (ConnectionError, CUDA errors)."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import CLASSES, DIM, RUNNER, features_table, read_labels, write_dataset
from fault_models import save_class_model
from titans.pipeline.cli.main import main


def _files(out) -> dict:
    """{relative path: bytes} of every file under ``out`` (the output lock aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "_titans_lock"}


def _in_place(out, sub) -> list:
    """Files of ``out/sub`` put in place (not under a temporary directory)."""
    return [p for p in (out / sub).rglob("*") if p.is_file() and ".titans-tmp" not in str(p)] \
        if (out / sub).exists() else []


def _run(tmp_path, models, out, *extra, teacher=None, command="run"):
    args = [command, "--input", str(tmp_path / "data"), "--output", str(out), "--id-column", "id",
            *(teacher or ["--teacher", models[1]]), *extra, *RUNNER]
    if command == "run":
        args += ["--student", models[0]]
    return main(args)


@pytest.fixture
def data(tmp_path):
    write_dataset(tmp_path / "data", 2000, files=2, row_group_size=500)
    return tmp_path / "data"


@pytest.mark.parametrize("error,command", [("connection", "run"), ("cuda", "teacher-label")])
def test_an_infrastructure_error_mid_job_fails_it_and_dead_letters_nothing(
        tmp_path, models, data, capsys, error, command):
    teacher = save_class_model(tmp_path, "FailsAfterLaunch", DIM, CLASSES, (16,), error=error,
                               tag=f"{tmp_path}")
    out, manifest = tmp_path / "out", tmp_path / "manifest.json"
    code = _run(tmp_path, models, out, "--skip-labeled", str(manifest), "--deferral-rate", "0.5",
                teacher=teacher, command=command) if command == "run" else \
        _run(tmp_path, models, out, "--skip-labeled", str(manifest), teacher=teacher,
             command=command)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    what = "ConnectionError: lost the connection" if error == "connection" else "CUDA error"
    assert err[-1].startswith(f"titans {command}: job failed: ") and what in err[-1], err[-3:]
    assert len(err[-1]) < 500
    # nothing dead-lettered, nothing labeled, nothing reported complete, no file recorded
    assert not _in_place(out, "dead_letter") and not _in_place(out, "labels")
    assert not (out / "_SUCCESS").exists() and not (out / "report.json").exists()
    assert not manifest.exists()


def test_a_model_failing_on_every_row_fails_the_job_instead_of_dead_lettering_them(
        tmp_path, models, data, capsys):
    teacher = save_class_model(tmp_path, "FailsAfterLaunch", DIM, CLASSES, (16,), error="broken",
                               tag=f"{tmp_path}")
    out = tmp_path / "out"
    code = _run(tmp_path, models, out, "--deferral-rate", "0.5", teacher=teacher)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "cannot score anything" in err[-1] and "each row tried alone" in err[-1]
    assert not _in_place(out, "dead_letter") and not (out / "_SUCCESS").exists()


def test_cuda_out_of_memory_on_large_batches_splits_them_and_labels_every_row(
        tmp_path, models, data):
    teacher = save_class_model(tmp_path, "OOMAbove", DIM, CLASSES, (16,), max_rows=64)
    out = tmp_path / "out"
    assert _run(tmp_path, models, out, "--deferral-rate", "1.0", "--teacher-batch-size", "500",
                teacher=teacher) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows_dead_letter"] == 0 and report["rows_hard"] == 2000
    labels = read_labels(out)
    assert labels.column("id").to_pylist() == list(range(2000))
    assert set(labels.column("source").to_pylist()) == {"teacher"}


def test_over_the_budget_the_job_fails_and_overwrite_keeps_the_complete_output(
        tmp_path, models, capsys):
    """The job's last step writes the failed report and raises (JobFailed); the command prints
    the summary and exits 1. Over a previous complete output (--overwrite) the failed run
    replaces nothing: its report goes beside it as report.failed.json."""
    data = tmp_path / "data"
    os.makedirs(data)
    x = np.random.default_rng(4).normal(size=(1000, DIM)).astype(np.float32)
    pq.write_table(features_table(np.arange(1000), x), data / "a.parquet")
    out = tmp_path / "out"
    assert _run(tmp_path, models, out) == 0
    before = _files(out)
    x[:150, 2] = np.nan  # 15% of rows unusable, more than the default budget of 10%
    pq.write_table(features_table(np.arange(1000), x), data / "a.parquet")
    capsys.readouterr()
    assert _run(tmp_path, models, out, "--overwrite") == 1
    printed = capsys.readouterr().out
    assert "JOB FAILED" in printed and "report.failed.json" in printed
    failed = json.loads((out / "report.failed.json").read_text())
    assert failed["status"].startswith("failed") and failed["rows_dead_letter"] == 150
    after = _files(out)
    assert after.pop("report.failed.json") and after == before  # byte for byte
    # a later run that completes replaces both, and leaves nothing set aside
    assert _run(tmp_path, models, out, "--overwrite", "--max-dead-letter-rate", "0.2") == 0
    names = {p.name for p in out.iterdir()}
    assert "report.failed.json" not in names and not [n for n in names if "_titans_replaced" in n]
    assert json.loads((out / "report.json").read_text())["rows_dead_letter"] == 150
    assert read_labels(out).num_rows == 850


def test_overwrite_with_a_job_that_fails_keeps_the_previous_labels_and_success(
        tmp_path, models, data, capsys):
    out = tmp_path / "out"
    assert _run(tmp_path, models, out) == 0
    before = _files(out)
    assert "_SUCCESS" in before and any(k.startswith("labels/") for k in before)
    teacher = save_class_model(tmp_path, "FailsAfterLaunch", DIM, CLASSES, (16,),
                               error="connection", tag=f"{tmp_path}")
    assert _run(tmp_path, models, out, "--overwrite", "--deferral-rate", "0.5",
                teacher=teacher) == 1
    assert "job failed" in capsys.readouterr().err
    # the previous complete output, readable, as it was (beside the failed run's temporary
    # files, which readers skip and the next --overwrite run clears)
    assert {k: v for k, v in _files(out).items() if ".titans-tmp-" not in k} == before
    assert read_labels(out).column("id").to_pylist() == list(range(2000))


# ------------------------------------------------------------------ the replacement itself

def _put(base: str, names) -> None:
    from titans.transforms.io import storage

    for name in names:
        path = storage.join(base, *name.split("/"))
        if not storage.is_url(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_bytes(path, name.encode())


def _listing(base: str) -> set:
    from titans.transforms.io import storage

    return {p[len(base) + 1:] for p in storage.list_under(base)}


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_retried_last_step_moves_the_previous_output_aside_once(tmp_path, request, where):
    from titans.pipeline.overwrite import delete_replaced, move_aside

    base = str(tmp_path / "out") if where == "local" else \
        f"{request.getfixturevalue('gcs_bucket')}/aside-{tmp_path.name}"
    old = ["_SUCCESS", "report.json", "report.png", "labels/student-00000-of-00002.parquet",
           "labels/student-00001-of-00002.parquet", "dead_letter/dead_letter-00000-of-00001.parquet",
           "labels/.titans-tmp-killed/student-1.parquet"]  # a killed run's temporary file
    mine = ["labels/.titans-tmp-new/student-2.parquet"]
    _put(base, old + mine + ["notes.txt", "_titans_lock"])
    assert move_aside(base, "r1", [f"{base}/labels/.titans-tmp-new"]) == len(old)
    assert _listing(base) == {*mine, "notes.txt", "_titans_lock", "_titans_replaced-r1/_titans_moved",
                              *(f"_titans_replaced-r1/{n}" for n in old)}
    # the new file put in place, then the step retried: nothing more is moved
    _put(base, ["labels/student-00000-of-00001.parquet"])
    assert move_aside(base, "r1", []) == 0
    assert "labels/student-00000-of-00001.parquet" in _listing(base)
    delete_replaced(base)
    assert not [n for n in _listing(base) if n.startswith("_titans_replaced")]
    # nothing to move (a first run): the move is still marked done, for a retry
    empty = f"{base}-empty"
    _put(empty, ["labels/.titans-tmp-new/student-2.parquet"])
    assert move_aside(empty, "r2", [f"{empty}/labels/.titans-tmp-new"]) == 0
    assert "_titans_replaced-r2/_titans_moved" in _listing(empty)
    assert {"notes.txt", "_titans_lock", "labels/student-00000-of-00001.parquet"} <= _listing(base)


def test_on_gcs_a_failing_overwrite_keeps_the_previous_output_and_a_good_one_replaces_it(
        tmp_path, models, gcs_bucket, capsys):
    from conftest import upload
    from titans.transforms.io import storage

    write_dataset(tmp_path / "local", 600, files=1)
    data = upload(tmp_path / "local", f"{gcs_bucket}/f1/data")
    out = f"{gcs_bucket}/f1/out"
    base = ["run", "--input", data, "--output", out, "--id-column", "id", "--student", models[0],
            *RUNNER]
    assert main([*base, "--teacher", models[1]]) == 0
    before = {p: storage.read_bytes(p) for p in storage.list_under(out) if "_titans_lock" not in p}
    teacher = save_class_model(tmp_path, "FailsAfterLaunch", DIM, CLASSES, (16,),
                               error="connection", tag=f"{tmp_path}")
    assert main([*base, *teacher, "--overwrite", "--deferral-rate", "0.5"]) == 1
    assert "ConnectionError" in capsys.readouterr().err
    after = {p: storage.read_bytes(p) for p in storage.list_under(out)
             if "_titans_lock" not in p and ".titans-tmp-" not in p}
    assert after == before and f"{out}/_SUCCESS" in after
    assert main([*base, "--teacher", models[1], "--overwrite", "--deferral-rate", "0.5"]) == 0
    names = _listing(out)
    assert not [n for n in names if n.startswith("_titans_replaced") or ".titans-tmp-" in n]
    labels = [n for n in names if n.startswith("labels/")]
    assert len(labels) == len(set(labels)) and "_SUCCESS" in names
    report = json.loads(storage.read_bytes(f"{out}/report.json"))
    assert report["rows_in"] == 600 and report["rows_easy"] + report["rows_hard"] == 600


def test_in_worker_processes_a_failed_job_still_prints_its_report_and_exits_1(
        tmp_path, models, capsys):
    """Worker processes hand the launcher only the error's text: the report is found from it."""
    data = tmp_path / "data"
    os.makedirs(data)
    x = np.random.default_rng(5).normal(size=(600, DIM)).astype(np.float32)
    x[:120, 1] = np.nan  # 20%: over the default budget of 10%
    pq.write_table(features_table(np.arange(600), x), data / "a.parquet")
    out = tmp_path / "out"
    code = main(["run", "--input", str(data), "--output", str(out), "--student", models[0],
                 "--teacher", models[1], "--runner", "DirectRunner", "--direct_running_mode",
                 "multi_processing", "--direct_num_workers", "2"])
    printed = capsys.readouterr().out
    assert code == 1 and "JOB FAILED" in printed and str(out / "report.json") in printed
    assert json.loads((out / "report.json").read_text())["rows_dead_letter"] == 120
    assert not (out / "_SUCCESS").exists() and not (out / "_titans_lock").exists()


def test_a_lost_shared_model_server_fails_the_batch_as_an_infrastructure_error(tmp_path):
    """The worker's one model copy (MultiProcessShared, as on a GPU), served by another
    process that dies mid-job: what the proxy raises goes up to the runner (a retry), not to
    the dead letter."""
    import multiprocessing
    import signal

    from fault_models import host_shared_model
    from mp_models import SharedOnAnyDevice, save_pid_model
    from titans.models.deferral import make_rule
    from titans.models.forward import is_infrastructure
    from titans.models.loading import ModelRef
    from titans.transforms.features import resolve_feature_spec
    from titans.transforms.inference import BatchFailed
    from titans.transforms.labels import LabelColumns, StudentLabels

    teacher, cls, kwargs = save_pid_model(tmp_path, DIM, CLASSES, (16,), tmp_path / "pids")
    table = features_table(np.arange(100), np.random.default_rng(0).normal(size=(100, DIM)))
    features = resolve_feature_spec(table.schema, ("features",), DIM)
    handler = SharedOnAnyDevice(ModelRef(teacher, cls, kwargs), features,
                                StudentLabels(make_rule("margin"), LabelColumns("")),
                                batch_size=64, name="teacher")
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    host = ctx.Process(target=host_shared_model, args=(handler, ready, stop))
    host.start()
    try:
        assert ready.wait(120), "the model server did not start"
        model = handler.load_model()  # this process: a client of the host's copy
        assert handler.run_inference([table], model)[0].num_rows == 100
        os.kill(host.pid, signal.SIGKILL)
        host.join(30)
        with pytest.raises(Exception) as lost:
            handler.run_inference([table], model)
    finally:
        if host.is_alive():
            os.kill(host.pid, signal.SIGKILL)
            host.join(30)
    assert is_infrastructure(lost.value) and not isinstance(lost.value, BatchFailed), \
        repr(lost.value)


def test_label_overwrite_that_fails_keeps_the_previous_label_jobs_labels(tmp_path, capsys,
                                                                        monkeypatch):
    from conftest import save_models
    from titans.models import student_search

    monkeypatch.setattr(student_search, "TRAIN_STEPS", 300)
    write_dataset(tmp_path / "data", 1200, files=2)
    _, teacher = save_models(tmp_path)
    out = tmp_path / "out"
    args = ["label", "--input", str(tmp_path / "data"), "--output", str(out), "--id-column", "id",
            "--sample-rows", "300", *RUNNER]
    assert main([*args, "--teacher", teacher]) == 0
    kept = {k: v for k, v in _files(out).items() if k.split("/")[0] in
            ("labels", "dead_letter", "report.json", "report.png", "_SUCCESS")}
    flaky = save_class_model(tmp_path, "FailsAfterLaunch", DIM, CLASSES, (32, 32),
                             error="connection", tag=f"{tmp_path}")  # big enough for a student
    capsys.readouterr()
    assert main([*args, *flaky, "--overwrite"]) == 1
    assert "titans label: job failed: ConnectionError" in capsys.readouterr().err
    now = _files(out)
    assert {k: now.get(k) for k in kept} == kept  # labels, report and _SUCCESS as they were
    assert read_labels(out).num_rows + (pq.read_table(out / "dead_letter").num_rows
                                        if (out / "dead_letter").exists() else 0) == 1200


@pytest.mark.parametrize("status", ["complete", "failed: too many dead letters"])
def test_the_last_step_retried_after_it_ended_changes_nothing(tmp_path, status):
    """A runner may retry a bundle whose attempt finished (its worker lost before the commit):
    with --overwrite, the retry must not move the new outputs aside as 'previous' ones."""
    import pyarrow as pa

    from titans.pipeline.failures import JobFailed
    from titans.pipeline.graphs.stages import JobRecord, _Finish
    from titans.transforms.io.parquet import ParquetFormat
    from titans.transforms.io.writes import Destination

    out = tmp_path / "out"
    # the previous run's (a failed one's, without _SUCCESS, is replaced by a failed run too)
    _put(str(out), ["report.json", "labels/part-00000-of-00002.parquet",
                    "labels/part-00001-of-00002.parquet"]
         + (["_SUCCESS"] if status == "complete" else []))
    table = pa.table({"id": pa.array([1, 2], pa.int64())})
    dest = Destination(str(out / "labels"), "part", ParquetFormat(table.schema))
    temp = dest.temp_path()
    os.makedirs(os.path.dirname(temp))
    pq.write_table(table, temp)
    finish = _Finish(str(out), [dest], lambda counts, wall: {"status": status, "rows_in": 2,
                                                             "rows_dead_letter": 0},
                     JobRecord(start=0.0, replace=True, run="r1"), plot=None)
    for attempt in range(2):
        if status == "complete":
            finish(None, [], [temp])
        else:
            with pytest.raises(JobFailed):
                finish(None, [], [temp])
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
            (["_SUCCESS"] if status == "complete" else []) + \
            ["labels/part-00000-of-00001.parquet", "report.json"], attempt
    assert pq.read_table(out / "labels").column("id").to_pylist() == [1, 2]


def test_a_launcher_that_does_not_wait_hands_the_lock_to_a_job_that_fails(tmp_path, models):
    """wait=False (a Dataflow launch): the failing job's last step releases the lock before it
    raises; on the in-process runner the launcher still sees the failed report."""
    from titans.models.loading import ModelRef
    from titans.pipeline.job import run_cascade
    from titans.pipeline.plan import RunConfig, plan_run

    data = tmp_path / "data"
    os.makedirs(data)
    x = np.random.default_rng(6).normal(size=(500, DIM)).astype(np.float32)
    x[:100, 0] = np.nan
    pq.write_table(features_table(np.arange(500), x), data / "a.parquet")
    out = tmp_path / "out"
    plan = plan_run(RunConfig(input=str(data), output=str(out), student=ModelRef(models[0]),
                              teacher=ModelRef(models[1])))
    report = run_cascade(plan, RUNNER, wait=False)
    assert report["status"].startswith("failed") and report["rows_dead_letter"] == 100
    assert not (out / "_titans_lock").exists() and not (out / "_SUCCESS").exists()

"""The output protocol, write by write: report.json is written once, _SUCCESS once and last.

A reader of an output waits for ``_SUCCESS`` and then reads labels/ and report.json; nothing
may be written into the output after it (nor may report.json change under the reader). Every
write titans makes goes through ``transforms.io.storage`` (whole files: ``write_bytes``, which
``write_json`` calls; streamed files: ``open_write``; files put in place: ``rename``), so
those are recorded, in order, while each command runs in-process on the in-process runner
(whose workers, the Finish step included, share these modules). The files' modification times
are checked as well: none is later than ``_SUCCESS``'s.
"""
import json
import os

import pytest

from conftest import RUNNER, write_dataset
from titans.transforms.io import storage
from titans.pipeline import output_lock
from titans.pipeline.cli.main import main


@pytest.fixture
def writes(monkeypatch):
    """Every path titans writes or renames into, in order, as absolute local paths."""
    seen: list[str] = []

    def recorded(fn, target):
        def wrapped(*args, **kwargs):
            seen.append(os.path.abspath(target(*args)))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(storage, "write_bytes", recorded(storage.write_bytes, lambda p, _: p))
    monkeypatch.setattr(storage, "open_write", recorded(storage.open_write, lambda p: p))
    monkeypatch.setattr(storage, "rename", recorded(storage.rename, lambda _, dst: dst))
    return seen


def check_protocol(out, seen: list[str]) -> dict:
    """report.json and _SUCCESS written once each, _SUCCESS the last write under ``out`` and
    the newest file there; returns the report."""
    out = os.path.abspath(out)
    report, success = os.path.join(out, "report.json"), os.path.join(out, "_SUCCESS")
    under = [p for p in seen if p.startswith(out + os.sep) and not output_lock.is_lock(p)]
    assert under.count(report) == 1, f"report.json written {under.count(report)} times"
    assert under.count(success) == 1, f"_SUCCESS written {under.count(success)} times"
    assert under[-1] == success, f"written after _SUCCESS: {under[under.index(success) + 1:]}"
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names
             if not output_lock.is_lock(os.path.join(d, f))]
    newest = max(files, key=lambda p: os.stat(p).st_mtime_ns)
    assert os.stat(newest).st_mtime_ns == os.stat(success).st_mtime_ns, newest
    return json.loads(open(report).read())


def test_titans_run_writes_the_report_once_and_success_last(tmp_path, models, writes, capsys):
    write_dataset(tmp_path / "data", 600, files=2, row_group_size=200)
    out = tmp_path / "out"
    assert main(["run", "--input", str(tmp_path / "data"), "--output", str(out), "--student",
                 models[0], "--teacher", models[1], "--deferral-rate", "0.3",
                 "--audit-rate", "0.2", *RUNNER]) == 0
    report = check_protocol(out, writes)
    printed = capsys.readouterr().out
    # what the launcher used to add after the job, now in the report the job wrote
    assert report["runner"] == "FnApiRunner" and report["status"] == "complete"
    assert report["metrics"]["student_rows"] == 600
    assert report["metrics"]["teacher_rows"] == report["rows_teacher_scored"]
    assert report["metrics"]["student_forward_calls"] >= 1
    assert report["metrics"]["teacher_forward_calls"] >= 1
    phases = report["phase_seconds"]
    assert list(phases)[-5:] == ["pipeline_construction", "runner_start", "processing",
                                 "finalisation", "report_and_plot"]
    assert abs(sum(phases.values()) - report["wall_seconds"]) < 0.05
    assert f"wall time: {report['wall_seconds']:.1f} s" in printed
    assert "where the time went: startup" in printed


def test_teacher_label_writes_the_report_once_and_success_last(tmp_path, models, writes):
    write_dataset(tmp_path / "data", 500, files=1)
    out = tmp_path / "out"
    assert main(["teacher-label", "--input", str(tmp_path / "data"), "--output", str(out),
                 "--teacher", models[1], *RUNNER]) == 0
    report = check_protocol(out, writes)
    assert report["runner"] == "FnApiRunner" and report["metrics"]["teacher_rows"] == 500
    assert abs(sum(report["phase_seconds"].values()) - report["wall_seconds"]) < 0.05


def test_titans_label_writes_the_report_once_and_success_last(tmp_path, writes, monkeypatch,
                                                              capsys):
    from titans.models import student_search
    from test_label import label_args, save_teacher, write_data

    monkeypatch.setattr(student_search, "TRAIN_STEPS", 300)  # a quick student will do here
    write_data(tmp_path / "data", n=1200, bad=12)
    out = tmp_path / "out"
    assert main(label_args(tmp_path / "data", out, save_teacher(tmp_path / "teacher.pt"))) == 0
    report = check_protocol(out, writes)
    printed = capsys.readouterr().out
    # the whole job's figures, in the report the cascade's last step wrote
    assert list(report["phases"]) == ["sample", "teacher labels", "distil", "calibrate",
                                      "cascade"]
    assert not any(p["reused"] for p in report["phases"].values())
    assert report["phases"]["cascade"]["rows"] == report["rows_cascade_in"]
    assert report["student_search"] and report["job_wall_seconds"] >= report["wall_seconds"]
    assert report["job_wall_seconds"] >= sum(p["seconds"] for p in report["phases"].values())
    assert f"wall time: {report['job_wall_seconds']:.1f} s for the whole job" in printed
    manifest = json.loads((out / "_label" / "phases.json").read_text())
    assert manifest["phases"]["cascade"]["rows"] == report["rows_cascade_in"]


def test_a_launcher_that_does_not_wait_gets_the_same_report(tmp_path, models, writes):
    """run_job(wait=False), as a Dataflow launch: nothing after p.run() touches the output,
    and the report still names the runner and holds the counters and the launcher's phases
    (the in-process runner runs the job inside p.run())."""
    from titans.models.loading import ModelRef
    from titans.pipeline.job import run_cascade
    from titans.pipeline.plan import RunConfig, plan_run

    write_dataset(tmp_path / "data", 400, files=1)
    out = tmp_path / "out"
    config = RunConfig(input=str(tmp_path / "data"), output=str(out), student=ModelRef(models[0]),
                       teacher=ModelRef(models[1]), deferral_rate=0.25)
    submitted = run_cascade(plan_run(config), RUNNER, wait=False)
    assert submitted["status"] == "submitted"
    report = check_protocol(out, writes)
    assert report["runner"] == "FnApiRunner" and report["metrics"]["student_rows"] == 400
    assert report["metrics"]["teacher_rows"] == report["rows_hard"] == 100
    assert list(report["phase_seconds"])[0] == "pipeline_construction"
    assert abs(sum(report["phase_seconds"].values()) - report["wall_seconds"]) < 0.05

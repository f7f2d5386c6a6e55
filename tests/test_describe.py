"""`titans run --describe` / `titans teacher-label --describe`: the launch checks run, the
pipeline is built for the given runner, its stages and the plan are printed as JSON, and
nothing runs, is written or deleted, or goes over the network."""
from __future__ import annotations

import json
import os
import socket

import pytest

from conftest import CLASSES, DIM, RUNNER, write_dataset
from titans.pipeline.cli.main import main

HINT = "type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver"
DATAFLOW = ["--runner", "DataflowRunner", "--project", "proj", "--region", "us-central1",
            "--temp_location", "gs://bucket/tmp"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address):
        raise OSError(f"no network in this test (tried {address})")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _describe(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*args, "--describe"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_describe_shows_stages_hints_and_plan_offline(tmp_path, models, capsys, no_network):
    data = tmp_path / "data"
    write_dataset(data, 600, files=3)
    out = tmp_path / "out"
    student, teacher = models
    d = _describe(capsys, "run", "--input", str(data), "--output", str(out), "--student",
                  student, "--teacher", teacher, "--deferral-rate", "0.25",
                  "--teacher-batch-size", "4096", "--teacher-device", "cuda",
                  "--teacher-accelerator", HINT, "--teacher-min-ram", "16GB", *DATAFLOW)
    assert d["command"] == "titans run" and d["runner"] == "DataflowRunner"
    names = [s["name"] for s in d["stages"]]
    order = ["ReadBatches", "ScoreStudent", "SplitByDeferral", "ToTeacherWorkers",
             "ScoreTeacher", "WriteStudentLabels", "WriteTeacherLabels", "Finish"]
    assert [n for n in names if n in order] == order
    stage = {s["name"]: s for s in d["stages"]}
    assert stage["ScoreTeacher"]["resource_hints"] == {"accelerator": HINT,
                                                      "min_ram_bytes": 16 * 10**9}
    assert [s["name"] for s in d["stages"] if s["resource_hints"]] == ["ScoreTeacher"]
    assert stage["ScoreTeacher"]["device"] == "cuda" and stage["ScoreTeacher"]["batch_size"] == 4096
    assert stage["ScoreTeacher"]["model"] == teacher
    assert stage["ScoreStudent"]["device"] == "cpu" and stage["ScoreStudent"]["model"] == student
    plan = d["plan"]
    assert plan["rule"] == "margin" and isinstance(plan["threshold"], float)
    assert "quantile" in plan["threshold_source"] and plan["requested_deferral_rate"] == 0.25
    assert (plan["input_files"], plan["rows"], plan["feature_dim"], plan["num_classes"]) == (
        3, 600, DIM, CLASSES)
    assert plan["output"] == str(out)
    assert not out.exists()  # nothing written


def test_describe_deletes_nothing_even_with_overwrite(tmp_path, models, capsys):
    data = tmp_path / "data"
    write_dataset(data, 300, files=1)
    out = tmp_path / "out"
    student, teacher = models
    args = ["run", "--input", str(data), "--output", str(out), "--student", student, "--teacher",
            teacher, *RUNNER]
    assert main(args) == 0
    before = sorted(os.listdir(out))
    d = _describe(capsys, *args, "--overwrite")
    assert "ToTeacherWorkers" not in [s["name"] for s in d["stages"]]  # no hint, no break
    assert sorted(os.listdir(out)) == before and (out / "_SUCCESS").exists()


def test_teacher_label_describe(tmp_path, models, capsys, no_network):
    data = tmp_path / "data"
    write_dataset(data, 300, files=2)
    d = _describe(capsys, "teacher-label", "--input", str(data), "--output", str(tmp_path / "o"),
                  "--teacher", models[1], "--teacher-accelerator", HINT, *DATAFLOW)
    assert d["command"] == "titans teacher-label"
    hinted = [s for s in d["stages"] if s["resource_hints"]]
    assert [s["name"] for s in hinted] == ["ScoreTeacher"]
    assert hinted[0]["resource_hints"]["accelerator"] == HINT
    assert d["plan"]["mode"] == "teacher-label" and d["plan"]["rows"] == 300
    assert d["plan"]["num_classes"] == CLASSES


def test_describe_fails_like_the_job_would(tmp_path, models, capsys):
    student, teacher = models
    code = main(["run", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"),
                 "--student", student, "--teacher", teacher, "--describe", *RUNNER])
    assert code == 2 and "no non-empty file matches" in capsys.readouterr().err

"""`titans run` end to end as a subprocess, and its launch-time errors."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from conftest import DIM, RUNNER, write_dataset
from titans.models.architectures import MLP
from titans.models.loading import save_torchscript
from titans.pipeline.cli import main


def test_titans_run_end_to_end(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 2000)
    student, teacher = models
    cmd = [sys.executable, "-m", "titans.pipeline.cli", "run", "--input", str(data / "*.parquet"),
           "--output", str(tmp_path / "out"), "--student", student, "--teacher", teacher,
           "--id-column", "id", "--deferral-rate", "0.2", "--batch-size", "256"] + RUNNER
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rows in: 2,000" in done.stdout and "deferral rate: 20.0%" in done.stdout

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("rows_in", "rows_easy", "rows_hard", "rows_dead_letter", "deferral_rate", "rule",
                "threshold", "wall_seconds", "rows_per_second", "teacher_rows_avoided",
                "teacher_compute_avoided_share"):
        assert key in report
    assert report["rows_in"] == 2000 and report["rows_hard"] == 400 and report["rule"] == "margin"
    labels = pq.read_table(tmp_path / "out" / "labels")
    assert labels.num_rows == 2000
    assert labels.schema.field("label").type == "int64"
    assert sorted(labels.column("id").to_pylist()) == list(range(2000))

    # a second run into the same directory is refused, then allowed with --overwrite
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, timeout=300).returncode == 0


def _run(capsys, *args):
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def setup(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 200, files=1)
    return str(data), str(tmp_path / "out"), models


def test_wrong_path(capsys, setup, tmp_path):
    _, out, (s, t) = setup
    code, err = _run(capsys, "--input", str(tmp_path / "nope"), "--output", out, "--student", s, "--teacher", t)
    assert code == 2 and "no non-empty file matches" in err


def test_missing_column(capsys, setup):
    data, out, (s, t) = setup
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", t,
                     "--feature-columns", "pixels")
    assert code == 2 and "'pixels'" in err and "--feature-columns" in err


def test_model_that_does_not_load(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a model")
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", str(bad))
    assert code == 2 and "--teacher: cannot load model" in err


def test_shape_and_class_mismatch(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    wide = str(tmp_path / "wide.pt")
    save_torchscript(MLP(DIM + 3, 4, (5,)), wide)
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", wide)
    assert code == 2 and f"does not accept a float32 [batch, {DIM}] input" in err
    three = str(tmp_path / "three.pt")
    save_torchscript(MLP(DIM, 3, (5,)), three)
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher", three)
    assert code == 2 and "must agree on the number of classes" in err


def test_state_dict_with_class(capsys, setup, tmp_path):
    data, out, (s, _) = setup
    torch.save(MLP(DIM, 4, (5,)).state_dict(), tmp_path / "sd.pt")
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s,
                     "--teacher", str(tmp_path / "sd.pt"))
    assert code == 2 and "module:Class" in err  # a state_dict needs its class
    code, err = _run(capsys, "--input", data, "--output", out, "--student", s, "--teacher",
                     str(tmp_path / "sd.pt"), "--teacher-class", "titans.models.architectures:MLP",
                     "--teacher-class-kwargs", f'{{"in_features": {DIM}, "out_features": 4, "hidden": [5]}}',
                     *RUNNER)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows_in"] == 200


def test_unknown_flag_is_an_error(capsys, setup):
    data, out, (s, t) = setup
    with pytest.raises(SystemExit):
        main(["run", "--input", data, "--output", out, "--student", s, "--teacher", t, "--thresold", "0.5"])
    assert "unrecognized arguments: --thresold" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--student", "--teacher", "--feature-columns", "--id-column",
                 "--rule", "--threshold", "--deferral-rate", "--batch-size", "--overwrite",
                 "--teacher-batch-size", "--teacher-accelerator", "--sample-rows"):
        assert flag in text

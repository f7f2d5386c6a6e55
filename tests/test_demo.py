"""`titans demo` end to end, as a user runs it: real digits, real training, the real pipeline."""
import json
import subprocess
import sys


def test_demo_meets_its_target(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "demo", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for line in ("teacher accuracy", "student accuracy", "cascade accuracy", "deferral rate",
                 "teacher calls saved"):
        assert line in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cascade_accuracy"] >= summary["teacher_accuracy"] - 0.01
    assert summary["deferral_rate"] <= 0.30
    assert summary["student_accuracy"] < summary["teacher_accuracy"]  # a cascade worth having
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["rows_in"] == 450 and report["conservation_ok"]
    assert (out / "accuracy_vs_deferral.png").stat().st_size > 10_000


def test_demo_from_tfrecord_gives_the_same_labels(tmp_path):
    runs = {}
    for fmt in ("parquet", "tfrecord"):
        out = tmp_path / fmt
        done = subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "demo", "--output",
                               str(out), "--format", fmt], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        runs[fmt] = json.loads((out / "summary.json").read_text())
        report = json.loads((out / "run" / "report.json").read_text())
        assert report["input_format"] == fmt and report["rows_in"] == 450
    assert list((tmp_path / "tfrecord" / "data" / "test").glob("*.tfrecord"))
    assert runs["tfrecord"] == runs["parquet"]

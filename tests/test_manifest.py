"""Incremental labeling (--skip-labeled MANIFEST): a rerun labels nothing, a new file alone is
labeled, a rewritten file is labeled again, a failed job records nothing, --overwrite of a
directory relabels what it deletes; describe and teacher-label honour it too."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import DIM, RUNNER, features_table, write_dataset
from titans.pipeline import manifest
from titans.pipeline.cli.main import main


@pytest.fixture
def setup(tmp_path, models):
    data = tmp_path / "data"
    write_dataset(data, 600, files=2, row_group_size=200)
    return data, str(tmp_path / "manifest.json"), models


def _run(data, out, manifest_path, models, *extra) -> int:
    student, teacher = models
    return main(["run", "--input", str(data), "--output", str(out), "--student", student,
                 "--teacher", teacher, "--id-column", "id", "--skip-labeled", manifest_path,
                 "--deferral-rate", "0.2", *extra, *RUNNER])


def _ids(out) -> list[int]:
    return sorted(pq.read_table(os.path.join(out, "labels")).column("id").to_pylist())


def _files(manifest_path) -> dict:
    return json.loads(open(manifest_path).read())["files"]


def _add_file(data, name: str, ids, seed: int = 1) -> None:
    x = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    pq.write_table(features_table(np.asarray(ids), x), data / name)


def test_reruns_label_only_new_and_changed_files(setup, tmp_path, capsys, caplog):
    data, manifest_path, models = setup
    assert _run(data, tmp_path / "out1", manifest_path, models) == 0
    assert _ids(tmp_path / "out1") == list(range(600))
    first = _files(manifest_path)
    assert sorted(first) == [str(data / "part-0.parquet"), str(data / "part-1.parquet")]
    entry = first[str(data / "part-0.parquet")]
    assert entry["size"] == os.path.getsize(data / "part-0.parquet")
    assert entry["mtime"] == os.path.getmtime(data / "part-0.parquet")
    assert entry["output"] == str(tmp_path / "out1") and entry["command"] == "run"
    capsys.readouterr()

    # the same input again: nothing to do, no job, no output directory
    assert _run(data, tmp_path / "out2", manifest_path, models) == 0
    assert "already labeled" in capsys.readouterr().out
    assert not (tmp_path / "out2").exists()
    assert _files(manifest_path) == first

    # a new file: only its rows
    _add_file(data, "part-2.parquet", range(600, 700))
    assert _run(data, tmp_path / "out3", manifest_path, models) == 0
    assert _ids(tmp_path / "out3") == list(range(600, 700))
    report = json.loads((tmp_path / "out3" / "report.json").read_text())
    assert report["rows_in"] == 100 and report["input_files"] == 1
    assert len(_files(manifest_path)) == 3

    # a rewritten file (new content, newer time): labeled again, and the log says why
    _add_file(data, "part-0.parquet", range(0, 300), seed=7)
    stat = os.stat(data / "part-0.parquet")
    os.utime(data / "part-0.parquet", (stat.st_atime, stat.st_mtime + 10))
    with caplog.at_level(logging.INFO, logger="titans"):
        assert _run(data, tmp_path / "out4", manifest_path, models) == 0
    assert "changed since it was labeled" in caplog.text
    assert _ids(tmp_path / "out4") == list(range(300))
    assert _files(manifest_path)[str(data / "part-0.parquet")]["output"] == str(tmp_path / "out4")


def test_a_failed_job_records_nothing(setup, tmp_path):
    data, manifest_path, models = setup
    assert _run(data, tmp_path / "out1", manifest_path, models) == 0
    x = np.zeros((10, DIM), np.float32)
    x[:6, 0] = np.nan  # 6 of the job's 10 rows dead-lettered: over a budget of 0.5
    pq.write_table(features_table(np.arange(600, 610), x), data / "part-9.parquet")
    assert _run(data, tmp_path / "out2", manifest_path, models,
                "--max-dead-letter-rate", "0.5") == 1
    assert not (tmp_path / "out2" / "_SUCCESS").exists()
    assert str(data / "part-9.parquet") not in _files(manifest_path)
    # so the next run takes the file again
    assert _run(data, tmp_path / "out3", manifest_path, models, "--max-dead-letter-rate",
                "1") == 0
    assert str(data / "part-9.parquet") in _files(manifest_path)


def test_overwrite_relabels_what_it_deletes_and_deletes_nothing_when_all_is_labeled(
        setup, tmp_path, capsys):
    data, manifest_path, models = setup
    out = tmp_path / "out"
    assert _run(data, out, manifest_path, models) == 0
    labels_before = sorted(os.listdir(out / "labels"))
    # everything labeled: a rerun with --overwrite (a retried day) starts nothing, keeps all
    assert _run(data, out, manifest_path, models, "--overwrite") == 0
    assert "already labeled" in capsys.readouterr().out
    assert sorted(os.listdir(out / "labels")) == labels_before and (out / "_SUCCESS").exists()
    # a late file in the day: --overwrite deletes the day's labels, so its files go again
    _add_file(data, "part-2.parquet", range(600, 700))
    assert _run(data, out, manifest_path, models, "--overwrite") == 0
    assert _ids(out) == list(range(700))


def test_teacher_label_and_describe_honour_the_manifest(setup, tmp_path, capsys):
    data, manifest_path, (_, teacher) = setup
    args = ["teacher-label", "--input", str(data), "--teacher", teacher, "--skip-labeled",
            manifest_path, *RUNNER]
    assert main([*args, "--output", str(tmp_path / "out1")]) == 0
    assert {e["command"] for e in _files(manifest_path).values()} == {"teacher-label"}
    _add_file(data, "part-2.parquet", range(600, 700))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "out2"), "--describe"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["plan"]["input_files"] == 1 and described["plan"]["rows"] == 100
    assert not (tmp_path / "out2").exists() and len(_files(manifest_path)) == 2
    assert main([*args, "--output", str(tmp_path / "out2")]) == 0
    assert len(_files(manifest_path)) == 3
    assert main([*args, "--output", str(tmp_path / "out3")]) == 0
    assert "already labeled" in capsys.readouterr().out


def test_a_manifest_that_is_not_one_is_a_launch_error(setup, tmp_path, capsys):
    data, manifest_path, models = setup
    with open(manifest_path, "w") as f:
        json.dump({"files": []}, f)
    assert _run(data, tmp_path / "out", manifest_path, models) == 2
    assert "is not a titans manifest" in capsys.readouterr().err


def test_manifest_on_gcs(tmp_path, models, gcs_bucket):
    """Sizes and update times of objects, the manifest itself an object."""
    from conftest import upload

    local = tmp_path / "data"
    write_dataset(local, 300, files=2)
    data = upload(local, f"{gcs_bucket}/manifest-test/data")
    url = f"{gcs_bucket}/manifest-test/manifest.json"
    states = manifest.file_states([f"{data}/part-0.parquet", f"{data}/part-1.parquet"])
    assert {s["size"] for s in states.values()} == {os.path.getsize(local / "part-0.parquet"),
                                                    os.path.getsize(local / "part-1.parquet")}
    assert all(s["mtime"] and s["mtime"] > 1e9 and s["generation"] for s in states.values())
    assert _run(data + "/", tmp_path / "out1", url, models) == 0
    assert _run(data + "/", tmp_path / "out2", url, models) == 0
    assert not (tmp_path / "out2").exists()


def test_files_whose_labels_were_overwritten_are_labeled_again(tmp_path, models, capsys):
    """a, b labeled into out1; c labeled into out1 with --overwrite, which deletes a's and b's
    labels; then a, b and c into out2: a and b are labeled there (they are labeled nowhere
    else), c is not (out1 still holds its labels)."""
    data = tmp_path / "data"
    os.makedirs(data)
    _add_file(data, "a.parquet", range(0, 100), seed=1)
    _add_file(data, "b.parquet", range(100, 200), seed=2)
    manifest_path = str(tmp_path / "manifest.json")
    assert _run(data, tmp_path / "out1", manifest_path, models) == 0
    _add_file(data, "c.parquet", range(200, 300), seed=3)
    assert _run(data / "c.parquet", tmp_path / "out1", manifest_path, models, "--overwrite") == 0
    assert _ids(tmp_path / "out1") == list(range(200, 300))
    capsys.readouterr()
    assert _run(data, tmp_path / "out2", manifest_path, models) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert _ids(tmp_path / "out2") == list(range(0, 200))
    files = _files(manifest_path)
    assert {files[str(data / n)]["output"] for n in ("a.parquet", "b.parquet")} == {
        str(tmp_path / "out2")}
    assert files[str(data / "c.parquet")]["output"] == str(tmp_path / "out1")


def test_labels_deleted_by_hand_are_labeled_again(setup, tmp_path):
    import shutil

    data, manifest_path, models = setup
    assert _run(data, tmp_path / "out1", manifest_path, models) == 0
    shutil.rmtree(tmp_path / "out1")
    assert _run(data, tmp_path / "out2", manifest_path, models) == 0
    assert _ids(tmp_path / "out2") == list(range(600))


@pytest.mark.parametrize("entry", ["labeled", {"mtime": 1.0, "output": "/x"}, {"size": "big"}])
def test_a_malformed_manifest_entry_is_one_line_and_exit_2(setup, tmp_path, capsys, entry):
    data, manifest_path, models = setup
    path = str(data / "part-0.parquet")
    with open(manifest_path, "w") as f:
        json.dump({"format": manifest.FORMAT, "files": {path: entry}}, f)
    assert _run(data, tmp_path / "out", manifest_path, models) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert manifest_path in err and path in err
    assert not (tmp_path / "out").exists()


def test_old_format_entries_are_still_read(setup, tmp_path, capsys):
    """Entries written before content keys (size and mtime only) still skip their files
    while their output holds a complete job."""
    data, manifest_path, models = setup
    assert _run(data, tmp_path / "out1", manifest_path, models) == 0
    old = {p: {k: e[k] for k in ("size", "mtime", "output", "command", "labeled_at")}
           for p, e in _files(manifest_path).items()}
    with open(manifest_path, "w") as f:
        json.dump({"format": manifest.FORMAT, "files": old}, f)
    capsys.readouterr()
    assert _run(data, tmp_path / "out2", manifest_path, models) == 0
    assert "already labeled" in capsys.readouterr().out
    assert not (tmp_path / "out2").exists()


def test_a_file_whose_parts_saw_different_versions_is_not_recorded(setup, tmp_path, caplog):
    """The manifest records the keys the readers took; a file read in several parts whose
    parts saw different keys changed while the job read it: it is labeled again next time."""
    data, manifest_path, models = setup
    assert _run(data, tmp_path / "out", manifest_path, models, "--batch-size", "100") == 0
    recorded = _files(manifest_path)
    a, b = str(data / "part-0.parquet"), str(data / "part-1.parquet")
    assert sorted(recorded) == [a, b]  # 300 rows a file, 200-row groups: two parts each
    record = manifest.Record(manifest_path, str(tmp_path / "out"), "run")
    os.remove(manifest_path)
    with caplog.at_level(logging.WARNING, logger="titans"):
        record({}, [(a, recorded[a]["key"]), (b, recorded[b]["key"]),
                    (a, {**recorded[a]["key"], "mtime": 1.0})])
    assert sorted(_files(manifest_path)) == [b]
    assert "1 input file(s) changed while this job read them" in caplog.text

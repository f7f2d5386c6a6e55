"""Paths are what they say (issue 16, items 5 and 6).

An input path that exists (a file or a directory) is taken literally, whatever characters its
name holds; only a path that does not exist is a glob. The run's own output is left out of
the input by its real location, so a symlinked output inside a recursive input glob is not
read back (and then deleted from under the job by --overwrite).
"""
import json
import os

import pyarrow.parquet as pq

from conftest import RUNNER, save_models, write_dataset
from titans.transforms.io import storage
from titans.pipeline.cli.main import main
from titans.transforms.io.parquet import input_pattern, match_files


def _ids(out) -> list[int]:
    ids = pq.read_table(os.path.join(out, "labels")).column("id").to_pylist()
    dead = os.path.join(out, "dead_letter")
    if os.path.isdir(dead) and any(f.endswith(".parquet") for f in os.listdir(dead)):
        ids += [json.loads(r)["id"] for r in pq.read_table(dead).column("row").to_pylist()]
    return sorted(ids)


def test_an_existing_path_with_glob_characters_is_literal(tmp_path):
    weird = tmp_path / "d[x] *?"
    write_dataset(weird, 100, files=2)
    write_dataset(tmp_path / "dx ab", 10, files=1, seed=1)  # what the name matches as a glob
    assert match_files(input_pattern(str(weird))) == sorted(str(p) for p in weird.iterdir())
    # a file: itself, not the file its name matches as a glob
    one = tmp_path / "f[1].parquet"
    os.rename(weird / "part-0.parquet", one)
    os.link(weird / "part-1.parquet", tmp_path / "f1.parquet")
    assert match_files(input_pattern(str(one))) == [str(one)]
    # a path that does not exist is still a glob
    assert match_files(input_pattern(str(tmp_path / "f[1].*"))) == [str(tmp_path / "f1.parquet")]
    assert match_files(input_pattern(str(tmp_path / "d[[]x] [*]?" / "*.parquet"))) == [
        str(weird / "part-1.parquet")]
    # storage lists and deletes the directory itself, not what its name matches
    write_dataset(tmp_path / "dx" / "labels", 10, files=1)
    assert storage.list_under(str(weird)) == [str(weird / "part-1.parquet")]
    assert storage.delete_under(str(weird)) == 1
    assert (tmp_path / "dx ab" / "part-0.parquet").exists()


def test_run_on_an_input_directory_named_with_glob_characters(tmp_path):
    data = tmp_path / "in[x] *?"
    write_dataset(data, 900, files=3)
    write_dataset(tmp_path / "inx ab", 40, files=1, seed=1)
    student, teacher = save_models(tmp_path)
    out = tmp_path / "out[1Z]"
    args = ["run", "--input", str(data), "--student", student, "--teacher", teacher,
            "--id-column", "id", *RUNNER]
    assert main([*args, "--output", str(out)]) == 0
    assert _ids(out) == list(range(900))
    # --overwrite of an output named with glob characters: neighbours untouched
    write_dataset(tmp_path / "out1" / "labels", 10, files=1)
    assert main([*args, "--output", str(out), "--overwrite"]) == 0
    assert _ids(out) == list(range(900)) and (out / "_SUCCESS").exists()
    assert (tmp_path / "out1" / "labels" / "part-0.parquet").exists()
    assert not (out / "_titans_write_probe").exists()


def test_symlinked_output_inside_a_recursive_input_glob_with_overwrite(tmp_path):
    """The output reached through a symlink, the input glob covering its real path: the
    previous run's labels are not input, so --overwrite deleting them breaks nothing."""
    tree = tmp_path / "P"
    write_dataset(tree / "data", 1200, files=3)
    (tree / "runs").mkdir()
    os.symlink(tree / "runs", tmp_path / "L")
    out = str(tmp_path / "L" / "out")  # really P/runs/out, which P/**/*.parquet covers
    student, teacher = save_models(tmp_path)
    args = ["run", "--input", str(tree / "**" / "*.parquet"), "--output", out, "--student",
            student, "--teacher", teacher, "--id-column", "id", *RUNNER]
    assert main(args) == 0
    assert _ids(out) == list(range(1200))
    assert main([*args, "--overwrite"]) == 0  # crashed: its own old labels, deleted, as input
    assert _ids(out) == list(range(1200))  # every row once
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["rows_in"] == 1200 and report["input_files"] == 3
    # and the same through the other side: input through the symlink, output by its real path
    args2 = ["run", "--input", str(tmp_path / "L" / "**" / "*.parquet"), "--output",
             str(tree / "runs" / "out"), "--student", student, "--teacher", teacher,
             "--id-column", "id", "--overwrite", *RUNNER]
    write_dataset(tree / "runs" / "more", 300, files=1, seed=2)
    assert main(args2) == 0
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["rows_in"] == 300 and report["input_files"] == 1


def test_tfrecord_input_named_with_glob_characters(tmp_path):
    import shutil

    write_dataset(tmp_path / "data", 300, files=1)
    _, teacher = save_models(tmp_path)
    first = tmp_path / "first"
    assert main(["teacher-label", "--input", str(tmp_path / "data"), "--output", str(first),
                 "--teacher", teacher, "--output-format", "tfrecord", *RUNNER]) == 0
    records = [p for p in (first / "labels").iterdir() if p.name.endswith(".tfrecord")]
    weird = tmp_path / "t[x] *?"
    weird.mkdir()
    for i, p in enumerate(records):
        shutil.copy(p, weird / f"r[{i}].tfrecord")
    for given in (weird, weird / "r[0].tfrecord"):  # the directory, and one file of it
        out = tmp_path / f"out-{given.name}"
        assert main(["teacher-label", "--input", str(given), "--output", str(out),
                     "--teacher", teacher, "--column-prefix", "again_", *RUNNER]) == 0
        report = json.loads((out / "report.json").read_text())
        expected = 300 if given == weird else None
        assert report["status"] == "complete" and report["input_format"] == "tfrecord"
        assert report["rows_in"] == expected or (expected is None and report["rows_in"] > 0)

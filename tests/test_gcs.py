"""gs:// for real: input, models, output, dead letter, report and --overwrite against a GCS
JSON API on localhost. Object stores have no directories, so everything is by prefix."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DIM, RUNNER, features_table, read_parquet_under, upload, write_dataset
from titans.transforms.io import storage


def _titans_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "run", *args],
                          capture_output=True, text=True, timeout=600)


def _ids(url: str) -> list[int]:
    labels = read_parquet_under(storage.join(url, "labels"))
    dead = read_parquet_under(storage.join(url, "dead_letter"))
    ids = labels.column("id").to_pylist()
    if dead is not None:
        ids += [json.loads(r)["id"] for r in dead.column("row").to_pylist()]
    return sorted(ids)


def test_cascade_on_gcs_end_to_end_with_overwrite(tmp_path, models, gcs_bucket):
    local = tmp_path / "data"
    write_dataset(local, 4000, files=4, row_group_size=500)
    x = np.zeros((2, DIM), np.float32)
    x[0, 1] = np.nan  # one dead-letter row
    pq.write_table(features_table(np.array([4000, 4001]), x), local / "zz-bad.parquet")
    data = upload(local, f"{gcs_bucket}/t1/data")
    student = upload_file(models[0], f"{gcs_bucket}/t1/models/student.pt")
    teacher = upload_file(models[1], f"{gcs_bucket}/t1/models/teacher.pt")
    out = f"{gcs_bucket}/t1/out"
    args = ["--input", data + "/*.parquet", "--output", out, "--student", student, "--teacher",
            teacher, "--id-column", "id", "--batch-size", "300", *RUNNER]

    first = _titans_run(*args, "--direct_num_workers", "2", "--direct_running_mode",
                        "multi_threading")
    assert first.returncode == 0, first.stderr
    assert _ids(out) == list(range(4002))
    report = json.loads(storage.read_bytes(f"{out}/report.json"))
    assert report["rows_in"] == 4002 and report["rows_dead_letter"] == 1 and report["conservation_ok"]
    assert storage.exists(f"{out}/_SUCCESS") and storage.exists(f"{out}/report.png")

    # a stale shard of another shard count, as a run with more workers would leave behind
    shard = next(p for p in storage.list_under(f"{out}/labels") if "/student-" in p)
    storage.write_bytes(f"{out}/labels/student-00007-of-00009.parquet", storage.read_bytes(shard))
    again = _titans_run(*args)
    assert again.returncode == 2 and "is not empty" in again.stderr  # objects, not directories
    done = _titans_run(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert _ids(out) == list(range(4002))  # every id once: the old shards were deleted
    assert not storage.exists(f"{out}/labels/student-00007-of-00009.parquet")


def test_teacher_label_on_gcs(tmp_path, models, gcs_bucket):
    local = tmp_path / "data"
    write_dataset(local, 600, files=2)
    data = upload(local, f"{gcs_bucket}/t2/data")
    teacher = upload_file(models[1], f"{gcs_bucket}/t2/teacher.pt")
    out = f"{gcs_bucket}/t2/out"
    done = subprocess.run([sys.executable, "-m", "titans.pipeline.cli.main", "teacher-label", "--input",
                           data + "/", "--output", out, "--teacher", teacher, *RUNNER],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    labels = read_parquet_under(f"{out}/labels")
    assert sorted(labels.column("id").to_pylist()) == list(range(600))
    assert pa.types.is_fixed_size_list(labels.schema.field("teacher_probs").type)
    assert storage.exists(f"{out}/_SUCCESS")


def upload_file(path: str, url: str) -> str:
    with open(path, "rb") as f:
        storage.write_bytes(url, f.read())
    return url


# ------------------------------------------------------------------ output paths are literal
# An output (or input directory) whose name holds glob characters is that name, nothing else:
# listing, deleting and --overwrite go by prefix, never by pattern (issue 16, item 5).

NEIGHBOURS = ("out1", "outZ", "outer", "out")


def _put(url: str, data: bytes = b"x") -> str:
    storage.write_bytes(url, data)
    return url


@pytest.mark.parametrize("n, name", [(0, "out[1Z]"), (1, "out*"), (2, "out?")])
def test_storage_takes_a_gcs_prefix_with_glob_characters_literally(gcs_bucket, n, name):
    from titans.pipeline.job import prepare_output

    base = f"{gcs_bucket}/lit{n}"
    neighbours = sorted(_put(f"{base}/{other}/{leaf}") for other in NEIGHBOURS
                        for leaf in ("labels/part-0.parquet", "report.json", "_SUCCESS"))
    neighbours.append(_put(f"{base}/{name}x/labels/part-0.parquet"))  # same prefix, other name
    out = f"{base}/{name}"
    own = sorted(_put(f"{out}/{leaf}") for leaf in ("labels/part-0.parquet",
                                                    "labels/.titans-tmp-1/a.parquet",
                                                    "dead_letter/part-0.parquet", "notes.txt"))
    assert storage.list_under(out) == own
    assert storage.list_under(f"{out}/labels") == own[1:3]
    assert storage.exists(f"{out}/notes.txt") and not storage.exists(f"{out}/labels")
    assert storage.match(storage.glob_escape(f"{out}/notes.txt")) == [(f"{out}/notes.txt", 1)]
    assert storage.match(storage.glob_escape(out) + "/labels/*.parquet") == [(own[2], 1)]
    assert storage.delete_under(f"{out}/dead_letter") == 1
    storage.delete(f"{out}/notes.txt")
    assert storage.list_under(out) == own[1:3]

    prepare_output(out, overwrite=True)  # the write probe: it deletes nothing, leaves nothing
    assert storage.list_under(out) == own[1:3]
    from titans.pipeline.overwrite import delete_replaced, move_aside

    move_aside(out, "r1", [])  # what --overwrite's last step does with the previous outputs,
    delete_replaced(out)       # then, after _SUCCESS
    assert storage.list_under(out) == []  # labels/ gone, and nothing set aside left
    everything = storage.list_under(base)
    assert sorted(everything) == sorted(neighbours), "a neighbour prefix was touched"


def test_run_with_overwrite_into_a_gcs_output_named_with_brackets(tmp_path, models, gcs_bucket):
    local = tmp_path / "data"
    write_dataset(local, 600, files=2)
    # an input directory named with glob characters (not '?': the emulator's download links
    # leave it unquoted, where GCS's are quoted; listing it is tested above)
    data = upload(local, f"{gcs_bucket}/t4/in[x] *")
    other = tmp_path / "other"
    write_dataset(other, 50, files=1, seed=1)
    upload(other, f"{gcs_bucket}/t4/inx ab")  # what the name would match as a glob
    student = upload_file(models[0], f"{gcs_bucket}/t4/models/student.pt")
    teacher = upload_file(models[1], f"{gcs_bucket}/t4/models/teacher.pt")
    neighbours = sorted(_put(f"{gcs_bucket}/t4/{other}/labels/student-00000-of-00001.parquet")
                        for other in ("out1", "outZ"))
    out = f"{gcs_bucket}/t4/out[1Z]"
    args = ["--input", data, "--output", out, "--student", student, "--teacher", teacher,
            "--id-column", "id", *RUNNER]
    first = _titans_run(*args)
    assert first.returncode == 0, first.stderr
    again = _titans_run(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert _ids(out) == list(range(600))  # every row once: the old labels were removed
    assert storage.exists(f"{out}/_SUCCESS")
    assert not storage.exists(f"{out}/_titans_write_probe")
    assert [p for p in storage.list_under(f"{gcs_bucket}/t4") if "/out1/" in p or "/outZ/" in p] \
        == neighbours

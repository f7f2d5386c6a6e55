"""One job per output directory (issue 16, item 9): the output lock, with real `titans run`
processes, a real SIGKILL, and gs:// against a GCS JSON API on localhost."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import RUNNER, read_labels, write_dataset
from titans.transforms.io import storage
from titans.pipeline import output_lock
from titans.pipeline.cli.main import main

LOCK = "_titans_lock"


def _titans(command: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "titans.pipeline.cli.main", command, *args, *RUNNER],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run_args(data, out, models, *extra) -> list[str]:
    return ["--input", str(data), "--output", str(out), "--student", models[0], "--teacher",
            models[1], "--id-column", "id", "--batch-size", "5000", *extra]


def _ids_exactly_once(out, n: int) -> None:
    ids = read_labels(out).column("id").to_numpy()
    assert len(ids) == n and (np.sort(ids) == np.arange(n)).all()


def test_two_runs_into_one_output_one_is_refused_naming_the_other(tmp_path, models):
    data, out = tmp_path / "data", tmp_path / "out"
    n = 200_000
    write_dataset(data, n, files=4, row_group_size=10_000)
    args = _run_args(data, out, models)
    procs = [_titans("run", *args), _titans("run", *args)]
    results = [(p.pid, p.wait(timeout=600), *p.communicate()) for p in procs]
    refused = [r for r in results if r[1] != 0]
    done = [r for r in results if r[1] == 0]
    assert len(refused) == 1 and len(done) == 1, [(code, err[-2000:]) for _, code, _, err in results]
    (_, code, _, err), winner = refused[0], done[0]
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("titans run: error: output") and "in use by" in line
    assert f"pid {winner[0]}" in line and "`titans run`" in line  # the holder, named
    _ids_exactly_once(out, n)
    assert json.loads((out / "_SUCCESS").read_text())["rows_in"] == n
    assert not (out / LOCK).exists()  # released when the job ended


def test_a_killed_runs_lock_refuses_a_rerun_and_yields_to_overwrite(tmp_path, models):
    data, out = tmp_path / "data", tmp_path / "out"
    n = 600_000
    write_dataset(data, n, files=3, row_group_size=20_000)
    args = _run_args(data, out, models, "--batch-size", "20000")
    proc = _titans("run", *args, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / LOCK).exists() and any(
            f.endswith(".parquet") for _, _, fs in os.walk(out) for f in fs)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (out / LOCK).exists(), "no lock was taken before the run wrote its files"
    holder = json.loads((out / LOCK).read_text())
    assert holder["pid"] == proc.pid and holder["command"] == "run"

    again = _titans("run", *args)
    _, err = again.communicate(timeout=600)
    line = err.strip().splitlines()[-1]
    assert again.returncode == 2 and f"pid {proc.pid}" in line and "no longer running" in line
    assert "--overwrite" in line

    takeover = _titans("run", *args, "--overwrite")
    _, err = takeover.communicate(timeout=600)
    assert takeover.returncode == 0, err[-3000:]
    assert "took over the output lock" in err and f"pid {proc.pid}" in err
    _ids_exactly_once(out, n)
    assert not [f for _, _, fs in os.walk(out / "labels") for f in fs if not f.endswith(".parquet")]
    assert not (out / LOCK).exists()


def test_a_live_holder_on_this_host_is_never_taken_over(tmp_path, models, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 300, files=1)
    with output_lock.acquire(str(out), "run") as lock:  # this process: alive
        code = main(["run", *_run_args(data, out, models), "--overwrite", *RUNNER])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "still running on this host" in err
        assert f"run {lock.id}" in err
        assert json.loads((out / LOCK).read_text())["id"] == lock.id  # untouched
    assert not out.exists()  # the lock made the directory; releasing it removed both


def test_the_lock_is_released_on_a_failed_launch_and_does_not_make_the_output_non_empty(
        tmp_path, models, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 300, files=1)
    assert main(["run", *_run_args(data, out, models), "--teacher", str(tmp_path / "nope.pt"),
                 *RUNNER]) == 2
    assert not out.exists()  # nothing left behind: neither lock nor directory
    assert main(["run", *_run_args(data, out, models), *RUNNER]) == 0  # a lock is no output
    assert sorted(os.listdir(out)) == ["_SUCCESS", "dead_letter", "labels", "report.json",
                                       "report.png"]


def test_label_names_resume_and_overwrite_for_a_dead_lock(tmp_path, models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock = output_lock._holder("label")
    lock["pid"], lock["pid_started"] = int(dead), None
    (out / LOCK).write_text(json.dumps(lock))
    write_dataset(tmp_path / "data", 300, files=1)
    code = main(["label", "--input", str(tmp_path / "data"), "--output", str(out), "--teacher",
                 models[1], *RUNNER])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no longer running" in err and "--overwrite or --resume" in err


def test_a_launcher_that_does_not_wait_leaves_the_release_to_the_job(tmp_path, models):
    """run_job(wait=False), as on Dataflow: the job's last step releases the lock."""
    from titans.models.loading import ModelRef
    from titans.pipeline.job import run_cascade
    from titans.pipeline.plan import RunConfig, plan_run

    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 500, files=1)
    lock = output_lock.acquire(str(out), "run")
    plan = plan_run(RunConfig(input=str(data), output=str(out), student=ModelRef(models[0]),
                              teacher=ModelRef(models[1])))
    report = run_cascade(plan, RUNNER, wait=False, lock=lock)
    assert report["status"] == "submitted"
    assert lock.handed_to_job and not lock.released  # not released by the launcher ...
    assert not (out / LOCK).exists() and (out / "_SUCCESS").exists()  # ... but by the job
    lock.release()  # the launcher's `with` block ending: nothing more to do
    assert not (out / LOCK).exists()


# ------------------------------------------------------------------ gs://

class _Requests:
    """Record the query strings of the GCS client's requests (they still go to the server)."""

    def __init__(self, session):
        self.urls, self._request = [], session.request
        session.request = self

    def __call__(self, method, url, *args, **kwargs):
        self.urls.append((method, url))
        return self._request(method, url, *args, **kwargs)


def test_gcs_lock_second_acquire_refused(gcs_bucket, monkeypatch):
    out = f"{gcs_bucket}/lock/out"
    client = storage.gcs_client()
    seen = _Requests(client._http)
    try:
        first = output_lock.acquire(out, "run")
    finally:
        client._http.request = seen._request
    creates = [u for m, u in seen.urls if m == "POST" and "/upload/" in u]
    assert creates and all("ifGenerationMatch=0" in u for u in creates)  # create-if-absent
    assert json.loads(storage.read_bytes(f"{out}/{LOCK}"))["id"] == first.id

    for overwrite in (False, True):  # alive on this host: refused either way
        with pytest.raises(output_lock.OutputLocked, match=f"run {first.id}.*still running"):
            output_lock.acquire(out, "run", overwrite=overwrite)
    assert json.loads(storage.read_bytes(f"{out}/{LOCK}"))["id"] == first.id
    first.release()
    assert not storage.exists(f"{out}/{LOCK}")

    # a holder on another host: refused, and taken over by --overwrite
    elsewhere = {**output_lock._holder("run"), "host": "launcher-vm-1", "pid": 7}
    storage.write_bytes(f"{out}/{LOCK}", json.dumps(elsewhere).encode())
    with pytest.raises(output_lock.OutputLocked, match="launcher-vm-1.*on another host"):
        output_lock.acquire(out, "run")
    with output_lock.acquire(out, "run", overwrite=True) as taken:
        assert json.loads(storage.read_bytes(f"{out}/{LOCK}"))["id"] == taken.id
    assert not storage.exists(f"{out}/{LOCK}")


def test_gcs_run_takes_and_releases_the_lock(tmp_path, models, gcs_bucket):
    local = tmp_path / "data"
    write_dataset(local, 400, files=1)
    out = f"{gcs_bucket}/lockrun/out"
    held = output_lock.acquire(out, "run")
    refused = _titans("run", *_run_args(local, out, models))
    _, err = refused.communicate(timeout=600)
    assert refused.returncode == 2 and f"run {held.id}" in err and "in use by" in err
    held.release()
    done = _titans("run", *_run_args(local, out, models))
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    assert storage.exists(f"{out}/_SUCCESS") and not storage.exists(f"{out}/{LOCK}")


def test_gcs_lock_two_creates_at_once_one_wins(gcs_bucket):
    """The race itself is closed by ifGenerationMatch=0, which only a GCS API that honours
    preconditions can show; the local one in these tests (gcp-storage-emulator) ignores them,
    so there only the sequential refusal above is tested."""
    from concurrent.futures import ThreadPoolExecutor

    probe = f"{gcs_bucket}/lockrace/probe"
    blob = output_lock._gcs(probe)[0]
    blob.upload_from_string(b"1", if_generation_match=0)
    try:
        blob.upload_from_string(b"2", if_generation_match=0)
        pytest.skip("this GCS API ignores ifGenerationMatch=0 (a second create-if-absent "
                    "succeeded): the race cannot be tested here")
    except output_lock._gcs(probe)[1]:
        pass
    path = f"{gcs_bucket}/lockrace/out/{LOCK}"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: output_lock._create(path, json.dumps(
            {**output_lock._holder("run"), "id": f"racer-{i}"}).encode()), range(4)))
    assert sum(r is not False for r in results) == 1


def test_an_unreadable_lock_yields_to_overwrite_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(b"")  # killed between creating the lock and writing it
    with pytest.raises(output_lock.OutputLocked, match="cannot be read.*--overwrite"):
        output_lock.acquire(str(out), "run")
    with output_lock.acquire(str(out), "run", overwrite=True) as lock:
        assert json.loads((out / LOCK).read_text())["id"] == lock.id
    assert not (out / LOCK).exists()

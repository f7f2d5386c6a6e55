"""The `--state DIR` store (pipeline/state): generations, the pointer commit, the lock, the
checks, the pool cap and the history, on real files, real processes killed with SIGKILL, and
the local GCS API for gs://.

The kill tests run a real writer process that stops at a named point of write_generation or
commit (the store's TITANS_STATE_PAUSE_AT hook prints a line and sleeps there), kill its
process group with SIGKILL, and compare every byte of the state before and after.
"""
from __future__ import annotations

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

from titans.models.architectures import MLP
from titans.pipeline.cli.main import main
from titans.pipeline.state import history, pointer
from titans.pipeline.state import pool as pool_rule
from titans.pipeline.state.store import (STATE_VERSION, State, StateDir, StateError,
                                         StateLocked)
from titans.transforms.io import storage
from titans.transforms.io.models import save_torchscript

from state_runs import SCHEMA, TEACHER, entry, rows, write_run

def save_student(path: str, seed: int) -> str:
    torch.manual_seed(seed)
    save_torchscript(MLP(8, 4, (16,)), path)
    return path


def snapshot(root: str) -> dict:
    """Every file below ``root`` (local or gs://) with its bytes."""
    return {p[len(root):]: storage.read_bytes(p) for p in storage.list_under(root)}


def commit_runs(sd: StateDir, tmp_path, runs: range, cap: int = 500) -> State:
    state = sd.current()
    for run in runs:
        student = save_student(str(tmp_path / f"student-{run}.pt"), run)
        state = sd.commit(write_run(sd, state, run, student, cap=cap))
    return state


# ------------------------------------------------------------------------------ round trip

def test_write_commit_read_round_trip(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        assert sd.current() is None
        s1 = save_student(str(tmp_path / "s1.pt"), 1)
        pending = write_run(sd, None, 0, s1)
        assert sd.current() is None, "written, not committed: not current yet"
        committed = sd.commit(pending)
        s2 = save_student(str(tmp_path / "s2.pt"), 2)
        committed = sd.commit(write_run(sd, sd.current(), 1, s2))

    state = StateDir(root).current()
    assert state == committed
    assert state.generation == 2 and [e["run_id"] for e in state.history] == ["run-0", "run-1"]
    # the lineage is a hash chain: each student names its parent
    lineage = state.meta["lineage"]
    assert [e["kept"] for e in lineage] == ["cold", "challenger"]
    assert lineage[0]["parent_sha256"] is None
    assert lineage[1]["parent_sha256"] == lineage[0]["student_sha256"]
    # readable without titans: current.json -> state.json -> TorchScript, Parquet, JSON
    ptr = json.load(open(os.path.join(root, "current.json")))
    assert ptr["generation"] == 2 and ptr["state_version"] == STATE_VERSION
    folder = os.path.join(root, ptr["folder"])
    meta = json.load(open(os.path.join(folder, "state.json")))
    assert meta["teacher"] == TEACHER and meta["feature_schema"] == json.loads(json.dumps(SCHEMA))
    assert meta["student"]["config"] == {"hidden": [16]}
    x = torch.randn(5, 8)
    loaded = torch.jit.load(os.path.join(folder, meta["student"]["file"]))
    assert torch.equal(loaded(x), torch.jit.load(s2)(x))
    pool = pq.read_table(os.path.join(folder, meta["pool"]["file"]))
    assert pool.num_rows == meta["pool"]["rows"] == 400 and meta["pool"]["runs"] == 2
    assert pool.equals(state.read_pool())
    expected = pa.concat_tables([rows(0, 200), rows(1, 200)])
    assert pool.sort_by("row_id").equals(expected.sort_by("row_id"))
    assert json.load(open(os.path.join(folder, "history.json"))) == state.history
    assert open(os.path.join(root, "history.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the generation before is kept, nothing older
    assert len(StateDir(root).generations()) == 2


def test_pool_cap_zero_keeps_no_rows(tmp_path):
    sd = StateDir(str(tmp_path / "state"))
    with sd.lock():
        state = sd.commit(write_run(sd, None, 0, save_student(str(tmp_path / "s.pt"), 0), cap=0))
    assert state.pool_path is None and state.read_pool() is None
    assert state.meta["pool"]["rows"] == 0
    assert not any(p.endswith(".parquet") for p in storage.list_under(state.root))


def test_writing_needs_the_lock_and_a_base(tmp_path):
    sd = StateDir(str(tmp_path / "state"))
    student = save_student(str(tmp_path / "s.pt"), 0)
    with pytest.raises(RuntimeError, match="lock"):
        write_run(sd, None, 0, student)
    with sd.lock():
        sd.commit(write_run(sd, None, 0, student))
        # a second cold write over a current generation is refused without --state-reset
        with pytest.raises(StateError, match="--state-reset"):
            write_run(sd, None, 1, student)


def test_a_commit_on_a_generation_that_is_no_longer_current_is_refused(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(1))
        base = sd.current()
        pending = write_run(sd, base, 1, base.student_path)
        sd.commit(write_run(sd, base, 1, base.student_path))  # another commit got there first
        before = snapshot(root)
        with pytest.raises(StateError, match="changed while this run wrote generation 2"):
            sd.commit(pending)
        assert snapshot(root) == before, "the refused generation's folder is left behind"


def test_a_reset_replaces_the_lineage_only_when_it_commits(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        old = commit_runs(sd, tmp_path, range(2))
    fresh_student = save_student(str(tmp_path / "fresh.pt"), 7)
    with sd.lock():  # a --state-reset run that fails before its commit
        sd.reset()
        assert sd.current() is None
        write_run(sd, None, 0, fresh_student)
    assert StateDir(root).current() == old
    sd = StateDir(root)
    with sd.lock():  # one that succeeds
        sd.reset()
        fresh = sd.commit(write_run(sd, None, 0, fresh_student))
        assert sd.current() == fresh
        assert fresh.generation == 1 and len(fresh.history) == 1
        assert fresh.meta["lineage"][0]["parent_sha256"] is None
        assert set(sd.generations()) == {old.folder, fresh.folder}, "the old one kept one run"
        sd.commit(write_run(sd, fresh, 1, fresh_student))
        assert old.folder not in sd.generations()


# ------------------------------------------------------------------------------ kill -9

WRITER = r"""
import sys
sys.path.insert(0, sys.argv[4])
from state_runs import StateDir, write_run
root, student, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = StateDir(root)
with sd.lock():
    sd.commit(write_run(sd, sd.current(), run, student))
print("committed", flush=True)
"""


def start_writer(root: str, student: str, run: int, pause_at: str | None):
    env = dict(os.environ)
    env.pop(pointer.PAUSE_ENV, None)
    if pause_at:
        env[pointer.PAUSE_ENV] = pause_at
    return subprocess.Popen([sys.executable, "-c", WRITER, root, student, str(run),
                             os.path.dirname(__file__)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_at(root: str, student: str, run: int, point: str) -> None:
    """Start a writer, wait until it is paused at ``point``, SIGKILL its process group."""
    proc = start_writer(root, student, run, point)
    deadline = time.time() + 120
    try:
        while True:
            line = proc.stderr.readline()
            if f"titans-state-paused {point}" in line:
                break
            assert line or proc.poll() is None, f"the writer ended before {point}: " + \
                proc.stderr.read()
            assert time.time() < deadline, f"the writer never reached {point}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def finish(proc) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "committed" in out, err


@pytest.mark.parametrize("point", ["write:student", "write:pool", "write:state",
                                   "commit:pointer"])
def test_kill_9_while_writing_or_committing_leaves_the_state_as_it_was(tmp_path, point):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(2))
    before, current = snapshot(root), StateDir(root).current()
    student = save_student(str(tmp_path / "next.pt"), 9)

    kill_at(root, student, 2, point)
    assert StateDir(root).current() == current
    left = snapshot(root)
    assert {k: v for k, v in left.items() if k in before} == before, "a committed file changed"
    assert set(left) - set(before) <= {k for k in left if "/gen-000003-" in k or
                                       k.endswith("_titans_lock") or ".tmp-" in k}

    # the rerun takes the dead run's lock over and commits what an unbroken run commits
    finish(start_writer(root, student, 2, None))
    after = StateDir(root).current()
    assert after.generation == 3 and after.meta["lineage"][-1]["run_id"] == "run-2"
    assert after.read_pool().equals(
        pool_rule.cap(pa.concat_tables([current.read_pool(), rows(2, 200)]), 500))
    assert [e["run_id"] for e in after.history] == ["run-0", "run-1", "run-2"]
    assert len(StateDir(root).generations()) == 2, "the killed run's folder was not collected"
    assert not [k for k in snapshot(root) if ".tmp-" in k], "a temporary file was left"
    assert not os.path.exists(os.path.join(root, "_titans_lock"))


def test_kill_9_after_the_pointer_is_replaced_leaves_the_new_generation(tmp_path):
    """The pointer's replacement is the commit: once it is done, the new state is whole."""
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(1))
    kill_at(root, save_student(str(tmp_path / "next.pt"), 9), 1, "commit:done")
    state = StateDir(root).current()
    assert state.generation == 2 and state.read_pool().num_rows == 400


# ------------------------------------------------------------------------------ the lock

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(1))
    proc = start_writer(root, save_student(str(tmp_path / "next.pt"), 9), 1, "write:pool")
    try:
        assert "titans-state-paused write:pool" in proc.stderr.readline()
        with pytest.raises(StateLocked) as e:
            StateDir(root).lock()
        message = str(e.value)
        assert "\n" not in message and f"pid {proc.pid}" in message and "still running" in message
        assert root in message
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with StateDir(root).lock():  # the holder is gone now: taken over
        pass


def test_two_writers_started_together_one_is_refused(tmp_path):
    """Whichever takes the lock first holds it (paused in its write) while the other asks."""
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        state = commit_runs(sd, tmp_path, range(1))
    student = save_student(str(tmp_path / "next.pt"), 9)
    procs = [start_writer(root, student, 1, "write:student") for _ in range(2)]
    try:
        deadline = time.time() + 120
        while sum(p.poll() is not None for p in procs) < 1 and time.time() < deadline:
            time.sleep(0.1)
        [loser] = [p for p in procs if p.poll() is not None]
        [winner] = [p for p in procs if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 1 and "StateLocked" in err, err
        assert "is in use by `titans label` (run " in err and f"pid {winner.pid}," in err
        assert "titans-state-paused write:student" in winner.stderr.readline()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert StateDir(root).current() == state


def test_a_lock_held_from_another_host_is_not_taken_over(tmp_path):
    root = str(tmp_path / "state")
    os.makedirs(root)
    holder = {"id": "0123456789abcdef", "command": "label", "host": "worker-7", "pid": 42,
              "started": "2026-12-07T03:00:00Z"}
    with open(os.path.join(root, "_titans_lock"), "w") as f:
        json.dump(holder, f)
    with pytest.raises(StateLocked, match="another host.*delete .*_titans_lock") as e:
        StateDir(root).lock()
    assert "worker-7" in str(e.value) and "\n" not in str(e.value)
    assert json.load(open(os.path.join(root, "_titans_lock"))) == holder


# ------------------------------------------------------------------------------ compatibility

def test_another_teacher_or_schema_is_refused_with_one_line(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        state = commit_runs(sd, tmp_path, range(1))
    sd.check_compatible(state, TEACHER["sha256"], dict(SCHEMA))  # the same: accepted
    sd.check_compatible(state, TEACHER["sha256"], {"classes": 4, **{"features": SCHEMA["features"]}})
    with pytest.raises(StateError) as e:
        sd.check_compatible(state, "cd" * 32, SCHEMA)
    assert "another teacher" in str(e.value) and "--state-reset" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(StateError) as e:
        sd.check_compatible(state, TEACHER["sha256"], {**SCHEMA, "features": "list<float>"})
    assert "feature schema" in str(e.value) and "features" in str(e.value)
    assert "--state-reset" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ damage

def _damage(root: str, name: str) -> str:
    """Flip a byte in the file ``name`` of the current generation (or current.json)."""
    folder = json.load(open(os.path.join(root, "current.json")))["folder"]
    missing = name.startswith("missing ")
    name = name.split()[-1]
    path = os.path.join(root, name) if name == "current.json" else os.path.join(root, folder, name)
    if missing:
        os.remove(path)
        return path
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize("name", ["pool.parquet", "state.json", "student.pt", "history.json",
                                  "current.json", "missing pool.parquet", "missing state.json"])
def test_a_damaged_file_is_one_line_naming_it_and_nothing_is_overwritten(tmp_path, capsys,
                                                                           name):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(2))
    path = _damage(root, name)
    before = snapshot(root)
    with pytest.raises(StateError) as e:
        StateDir(root).current()
    message = str(e.value)
    assert path in message and "\n" not in message and "--state-reset" in message
    assert main(["state", root]) == 2
    err = capsys.readouterr().err
    assert path in err and err.count("\n") == 1
    assert snapshot(root) == before

    # --state-reset starts over: the damaged generation stays until the fresh one is committed
    sd = StateDir(root)
    with sd.lock():
        sd.reset()
        assert sd.current() is None
        pending = write_run(sd, None, 5, save_student(str(tmp_path / "fresh.pt"), 5))
        with pytest.raises(StateError):
            StateDir(root).current()  # not committed yet: the old (damaged) one is current
        fresh = sd.commit(pending)
    assert StateDir(root).current() == fresh
    assert fresh.generation == 1 and [e["kept"] for e in fresh.meta["lineage"]] == ["cold"]
    assert [e["run_id"] for e in fresh.history] == ["run-5"]


def test_a_newer_state_version_is_refused(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(1))
    ptr = json.load(open(os.path.join(root, "current.json")))
    ptr["state_version"] = STATE_VERSION + 1
    open(os.path.join(root, "current.json"), "w").write(json.dumps(ptr))
    with pytest.raises(StateError, match="newer than this titans reads.*--state-reset"):
        StateDir(root).current()


# ------------------------------------------------------------------------------ the pool cap

def test_quotas_keep_every_run_and_favour_recent_ones():
    rng = np.random.default_rng(0)
    for _ in range(300):
        runs = int(rng.integers(1, 40))
        counts = rng.integers(0, 400, runs)
        cap = int(rng.integers(1, 3000))
        keep = pool_rule.quotas(counts, cap)
        assert keep.sum() == min(cap, counts.sum())
        assert (keep <= counts).all()
        if runs <= cap:  # every run with rows keeps some, at least its share of half the cap
            floor = max(1, cap // (2 * runs))
            assert (keep >= np.minimum(counts, floor)).all()
        # recency: a run keeps more than its floor only if every newer run is kept whole
        for r in range(runs):
            if keep[r] > min(counts[r], max(1, cap // (2 * runs))):
                assert (keep[r + 1:] == counts[r + 1:]).all()
    assert list(pool_rule.quotas([100, 100, 100, 100], 200)) == [25, 25, 50, 100]
    assert list(pool_rule.quotas([10, 10, 10], 2)) == [0, 1, 1]  # more runs than rows: newest


def test_cap_is_a_uniform_repeatable_subset_of_each_run():
    pool = pa.concat_tables([rows(r, 1000) for r in range(4)])
    capped = pool_rule.cap(pool, 1000)
    assert capped.equals(pool_rule.cap(pool, 1000))
    assert set(capped.column("row_id").to_pylist()) <= set(pool.column("row_id").to_pylist())
    per_run = dict(zip(*np.unique(capped.column("run_index").to_numpy(), return_counts=True)))
    assert per_run == {0: 125, 1: 125, 2: 125, 3: 625}
    kept = capped.filter(pa.compute.equal(capped.column("run_index"), 0))
    ids = kept.column("row_id").to_numpy() % 1_000_000
    assert ids.min() < 100 and ids.max() > 900, "not spread over the run"
    assert (np.diff(capped.column("row_id").to_numpy()) > 0).all(), "order kept"
    with pytest.raises(ValueError, match="run_index int64"):
        pool_rule.cap(pool.drop(["run_index"]), 10)
    nulls = pool.set_column(1, "run_index", pa.array([None] * pool.num_rows, pa.int64()))
    with pytest.raises(ValueError, match="run_index \\(has nulls\\)"):
        pool_rule.cap(nulls, 10)


def test_state_stays_bounded_by_the_cap_over_many_generations(tmp_path):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    student = save_student(str(tmp_path / "s.pt"), 0)
    sizes, state = [], None
    with sd.lock():
        for run in range(30):
            state = sd.commit(write_run(sd, state, run, student, new_rows=300, cap=1200))
            sizes.append(sum(len(v) for v in snapshot(root).values()))
            assert len(sd.generations()) <= 2
    pool = state.read_pool()
    assert pool.num_rows == 1200
    runs, counts = np.unique(pool.column("run_index").to_numpy(), return_counts=True)
    assert list(runs) == list(range(30)), "every run represented"
    assert counts[-1] == 300 and counts[-2] == 300, "recent runs kept whole"
    assert counts[0] == 1200 // (2 * 30)
    assert max(sizes[10:]) < 1.25 * sizes[9], f"the state grows: {sizes}"
    assert sizes[-1] - sizes[9] < 20 * 4096, "more than the history's ~1 KB a run"


# ------------------------------------------------------------------------------ history

def test_history_table_and_plot(tmp_path, capsys):
    runs = [entry(r) for r in range(3)]
    runs[2]["drift"]["shifted"] = True
    runs[2]["student"] = {"sha256": "f" * 64, "kept": "champion"}
    runs[2]["guarantee"] = "disagreement <= 5% with probability >= 90%"
    runs[2].update(mode="warm", sample_rows=1234, job_wall_seconds=41.6, audit_disagreement=0.004)
    runs[1].update(mode="warm", sample_rows=500, predicted_deferral=0.04)  # 50 hard of 500 rows
    text = history.table(runs)
    lines = text.splitlines()
    header = lines[0].split()
    for column in ("mode", "drawn", "dis.", "seconds", "pred.", "deferred"):
        assert column in header
    assert "4.0%" in lines[2] and "10.0%" in lines[2]  # predicted, then what was deferred
    assert "warm" in lines[3] and "1,234" in lines[3] and "0.4%" in lines[3]
    assert lines[3].rstrip().endswith("42") and lines[2].rstrip().endswith("3")  # wall / phases
    assert lines[0].split()[:3] == ["run", "run", "id"] and len(lines) == 6
    assert lines[4] == "every run: eps 0.05, delta 0.1" and "eps" not in header
    assert "SHIFT" in lines[3] and "champion" in lines[3] and "ffffffff" in lines[3]
    assert "25.0%" in lines[2] and "158" in lines[1]
    assert lines[-1] == "guarantee of run 3: disagreement <= 5% with probability >= 90%"
    assert history.table([]) == "(no runs recorded)"
    assert history.table([{"run_id": "x"}]).splitlines()[0].split() == ["run", "run", "id"]
    runs[0]["rule"], runs[2]["rule"] = "max_prob", "margin"  # each rule named on the plot
    history.plot(runs, str(tmp_path / "h.png"))
    assert open(tmp_path / "h.png", "rb").read(4) == b"\x89PNG"


def test_titans_state_prints_the_history_and_draws_history_png(tmp_path, capsys):
    root = str(tmp_path / "state")
    sd = StateDir(root)
    with sd.lock():
        commit_runs(sd, tmp_path, range(3))
    os.remove(os.path.join(root, "history.png"))
    assert main(["state", root]) == 0
    out = capsys.readouterr().out
    assert "generation 3" in out and "pool: 500 rows from 3 run(s), cap 500" in out
    assert history.table(StateDir(root).current().history) in out
    assert os.path.exists(os.path.join(root, "history.png"))
    assert main(["state", str(tmp_path / "nothing")]) == 2
    assert "holds no state yet" in capsys.readouterr().err


# ------------------------------------------------------------------------------ gs://

def test_a_gs_state_against_the_local_gcs_api(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/states/{tmp_path.name}"
    sd = StateDir(root)
    with sd.lock():
        assert sd.current() is None
        state = commit_runs(sd, tmp_path, range(3), cap=500)
        assert len(sd.generations()) == 2
        assert sd.current() == state
        # a pointer changed behind the run's back (a taken-over lock): the commit is refused
        pending = write_run(sd, state, 3, state.student_path)
        storage.write_bytes(f"{root}/current.json", storage.read_bytes(f"{root}/current.json"))
        with pytest.raises(StateError, match="changed while this run wrote"):
            sd.commit(pending)
    state = StateDir(root).current()
    assert state.generation == 3 and state.read_pool().num_rows == 500
    assert storage.read_bytes(f"{root}/history.png")[:4] == b"\x89PNG"
    storage.delete(f"{root}/history.png")
    assert main(["state", root]) == 0  # `titans state gs://...` draws it again
    assert storage.read_bytes(f"{root}/history.png")[:4] == b"\x89PNG"

    proc = start_writer(root, save_student(str(tmp_path / "next.pt"), 9), 3, "commit:pointer")
    try:
        assert "titans-state-paused commit:pointer" in proc.stderr.readline()
        with pytest.raises(StateLocked, match="still running"):
            StateDir(root).lock()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert StateDir(root).current() == state
    finish(start_writer(root, str(tmp_path / "next.pt"), 3, None))  # takes the dead lock over
    state = StateDir(root).current()
    assert state.generation == 4 and len(StateDir(root).generations()) == 2

    blob = [p for p in storage.list_under(root) if p.endswith("pool.parquet")
            and state.folder in p][0]
    data = bytearray(storage.read_bytes(blob))
    data[100] ^= 0xFF
    storage.write_bytes(blob, bytes(data))
    with pytest.raises(StateError, match=f"{blob}.*damaged"):
        StateDir(root).current()
    student = f"{root}/{state.folder}/student.pt"
    storage.delete(student)
    with pytest.raises(StateError, match=f"{student} is damaged \\(missing\\)"):
        StateDir(root).current()

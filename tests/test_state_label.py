"""`titans label --state DIR` (issue 18): real small runs of the whole command on Parquet
days, the real FnApiRunner, real torch students and the real state store.

Each day is a new partition of rows (ids never repeat across days; feature 0 is id / 10**6,
so a row's id can be read back from any array of the models' input). The teacher is a plain
state_dict MLP. The tests spy on (wrap, not replace) the fine-tune and the calibration to
read which rows each one saw.
"""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import RUNNER, features_table
from titans.models import continual as mc
from titans.models.architectures import MLP
from titans.pipeline.cli.main import main
from titans.pipeline.label import calibrate as calibrate_phase
from titans.pipeline.state.store import StateDir

DIM, CLASSES = 8, 4
KWARGS = json.dumps({"in_features": DIM, "out_features": CLASSES, "hidden": [32, 32]})
ROWS = 2400


@pytest.fixture(autouse=True)
def short_training(monkeypatch):
    """Fewer steps than the command's (cold search 10,000 per candidate, fine-tune 2,000):
    these tiny students converge in far fewer, and each test runs several whole jobs."""
    from titans.models import student_search

    monkeypatch.setattr(student_search, "TRAIN_STEPS", 600)
    monkeypatch.setattr(mc, "FINE_TUNE_STEPS", 300)


def write_day(directory, day: int, n: int = ROWS, shift: float = 0.0, bad: int = 0) -> np.ndarray:
    """Day ``day``'s rows in two Parquet files: ids day*10,000 + 1.., features N(shift, 1)
    but feature 0 = id / 10**6 (ids readable from the models' input, and near 0 on every
    day: the days differ only in their rows). Returns the ids."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(100 + day)
    ids = day * 10_000 + np.arange(1, n + 1)
    x = (rng.normal(size=(n, DIM)) + shift).astype(np.float32)
    x[:, 0] = ids / 1e6
    x[:bad, 3] = np.nan  # rows the dead letter takes
    for i, part in enumerate(np.array_split(np.arange(n), 2)):
        pq.write_table(features_table(ids[part], x[part]),
                       os.path.join(directory, f"part-{i}.parquet"), row_group_size=400)
    return ids


def save_teacher(path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = MLP(DIM, CLASSES, (32, 32))
    with torch.no_grad():  # feature 0 (the id) must not decide the class
        model.net[0].weight[:, 0] = 0
    torch.save(model.state_dict(), path)
    return str(path)


def ids_of(x: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(x).reshape(len(x), -1)[:, 0] * 1e6).astype(np.int64)


def label_day(tmp_path, day: int, teacher: str, state, *extra) -> int:
    return main(["label", "--input", str(tmp_path / f"day{day}"),
                 "--output", str(tmp_path / f"out{day}"), "--teacher", teacher,
                 "--teacher-class", "titans.models.architectures:MLP",
                 "--teacher-class-kwargs", KWARGS, "--id-column", "id",
                 "--max-disagreement", "0.05", "--state", str(state), *extra, *RUNNER])


@pytest.fixture
def spies(monkeypatch):
    """The ids each warm fine-tune trained on and each calibration calibrated on."""
    seen = {"train": [], "cal": []}
    fine_tune, cal_run = mc.fine_tune, calibrate_phase.run

    def spy_fine_tune(student, x_pool, p_pool, x_today, p_today, **kw):
        seen["train"].append(np.concatenate([ids_of(x_pool) if len(x_pool) else
                                             np.zeros(0, np.int64), ids_of(x_today)]))
        return fine_tune(student, x_pool, p_pool, x_today, p_today, **kw)

    def spy_calibrate(c, s, split, student, jd):
        seen["cal"].append(ids_of(s.x[split.cal]))
        return cal_run(c, s, split, student, jd)

    monkeypatch.setattr(mc, "fine_tune", spy_fine_tune)
    monkeypatch.setattr(calibrate_phase, "run", spy_calibrate)
    return seen


def report_of(tmp_path, day: int) -> dict:
    return json.loads((tmp_path / f"out{day}" / "report.json").read_text())


def test_three_runs_warm_start_and_fresh_calibration(tmp_path, spies, capsys):
    teacher = save_teacher(tmp_path / "teacher.pt")
    state = tmp_path / "state"
    days = {d: write_day(tmp_path / f"day{d}", d) for d in (1, 2, 3)}
    for d in days:
        assert label_day(tmp_path, d, teacher, state) == 0
    printed = capsys.readouterr().out
    assert "drift: yesterday's student" in printed and "generation 3 committed" in printed

    reports = {d: report_of(tmp_path, d) for d in days}
    for d, r in reports.items():  # every row exactly once, every run
        assert r["status"] == "complete" and r["conservation_ok"] and r["rows_in"] == ROWS
    # warm runs draw a smaller fresh sample than the cold start, sized on a prediction from
    # the previous run's held-out rows (the cold run's own validation and calibration rows)
    assert reports[2]["rows_sample_drawn"] < reports[1]["rows_sample_drawn"]
    assert "predicts" in printed and "of the other rows deferred" in printed

    # the student's hash chain: each warm run's parent is the student the run before kept
    history = reports[3]["state"]["history"]
    assert [h["mode"] for h in history] == ["cold", "warm", "warm"]
    assert history[0]["predicted_deferral"] is None
    assert all(0 < h["predicted_deferral"] < 1 for h in history[1:])
    assert history[0]["student"]["parent_sha256"] is None
    for before, after in zip(history, history[1:]):
        assert after["student"]["parent_sha256"] == before["student"]["sha256"]
        assert after["student"]["kept"] in ("champion", "challenger")
    current = StateDir(str(state)).current()
    assert current.generation == 3 and len(current.history) == 3
    assert [e["student_sha256"] for e in current.meta["lineage"]] == \
        [h["student"]["sha256"] for h in history]
    assert (state / "history.png").stat().st_size > 0
    # drift is measured on warm runs, in the report and in the history
    assert reports[2]["state"]["drift"]["fresh_agreement"] > 0.5
    assert history[2]["drift"]["ks_pvalue"] is not None  # the pool held run 2's held-out rows

    # calibration on today's fresh rows only, never trained on: not in the same run's
    # fine-tune (pool + today's share), not from another day, not a hard row
    assert len(spies["train"]) == 2 and len(spies["cal"]) == 3
    for run, (train, cal) in enumerate(zip(spies["train"], spies["cal"][1:]), start=2):
        assert cal.size > 100 and not np.isin(cal, train).any()
        assert np.isin(cal, days[run]).all()
        assert np.isin(train, days[run - 1]).any()  # the pool: yesterday's rows trained on
    # the pool holds teacher-labelled rows of every run: sample and hard, with their run id
    pool = current.read_pool()
    assert set(pool.column("origin").to_pylist()) == {"sample", "hard"}
    assert len(set(pool.column("run_id").to_pylist())) == 3
    # the run's Continual goes into the cascade's last step: pickled without the pool it read
    import pickle

    from titans.pipeline.label.continual import Continual

    cont = Continual(StateDir(str(state)), current, {}, {}, 10_000)
    assert cont.pool().num_rows == pool.num_rows and cont.student() is cont.student()
    assert len(pickle.dumps(cont)) < pool.nbytes / 10  # nor yesterday's student (TorchScript)
    assert pickle.loads(pickle.dumps(cont)).pool().num_rows == pool.num_rows  # read again


def test_pool_rows_zero_other_teacher_refused_failed_run_leaves_state(tmp_path, spies, capsys):
    teacher = save_teacher(tmp_path / "teacher.pt")
    other = save_teacher(tmp_path / "other.pt", seed=1)
    state = tmp_path / "state"
    for d in (1, 2, 3):
        write_day(tmp_path / f"day{d}", d, bad=50 if d == 3 else 0)
    assert label_day(tmp_path, 1, teacher, state, "--state-pool-rows", "0") == 0
    first = StateDir(str(state)).current()
    assert first.generation == 1 and first.pool_path is None  # no input rows kept

    # a state written for another teacher: one line naming --state-reset, nothing written
    capsys.readouterr()
    assert label_day(tmp_path, 2, other, state, "--state-pool-rows", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another teacher" in err[0] and "--state-reset" in err[0]
    assert not (tmp_path / "out2" / "report.json").exists()
    assert StateDir(str(state)).current().generation == 1

    # warm start from the student alone: the fine-tune sees today's rows only
    assert label_day(tmp_path, 2, teacher, state, "--state-pool-rows", "0") == 0
    assert len(spies["train"]) == 1 and np.isin(spies["train"][0], 20_000 + np.arange(ROWS + 1)).all()
    second = StateDir(str(state)).current()
    assert second.generation == 2 and second.pool_path is None
    assert second.history[1]["student"]["parent_sha256"] == first.history[0]["student"]["sha256"]

    # a run that fails (its dead-letter budget) leaves the state exactly as it was
    before = sorted(p.name for p in state.rglob("*") if p.is_file())
    assert label_day(tmp_path, 3, teacher, state, "--state-pool-rows", "0",
                     "--max-dead-letter-rate", "0") == 1
    assert StateDir(str(state)).current().generation == 2
    assert sorted(p.name for p in state.rglob("*") if p.is_file() and p.name != "_titans_lock") \
        == [n for n in before if n != "_titans_lock"]


def test_state_flags_checked_before_anything_runs(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher.pt")
    write_day(tmp_path / "day1", 1, n=200)
    base = ["label", "--input", str(tmp_path / "day1"), "--output", str(tmp_path / "out"),
            "--teacher", teacher, "--teacher-class", "titans.models.architectures:MLP",
            "--teacher-class-kwargs", KWARGS, *RUNNER]
    assert main(base + ["--state-reset"]) == 2
    assert "--state-reset needs --state" in capsys.readouterr().err
    assert main(base + ["--state", str(tmp_path / "s"), "--state-pool-rows", "-1"]) == 2
    assert "--state-pool-rows must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------ models/continual, no Beam

def test_fine_tune_warm_start_learns_and_stays_within_its_budget():
    rng = np.random.default_rng(0)
    teacher = MLP(DIM, CLASSES, (16,))
    x_old, x_new = rng.normal(size=(600, DIM)), rng.normal(2.0, 1.0, size=(300, DIM))
    with torch.no_grad():
        p_old, p_new = (torch.softmax(teacher(torch.tensor(v, dtype=torch.float32)), -1).numpy()
                        for v in (x_old, x_new))
    student = MLP(DIM, CLASSES, (8,))
    before = mc.score(student, x_new, p_new.argmax(1), mc.Target(bar=0.01))
    done = mc.fine_tune(student, np.zeros((0, DIM)), np.zeros((0, CLASSES)), x_new, p_new,
                        steps=400)  # an empty pool (--state-pool-rows 0): today's rows alone
    assert done["steps"] == 400 and done["rows_pool"] == 0
    after = mc.score(student, x_new, p_new.argmax(1), mc.Target(bar=0.01))
    assert after.val_agreement > before.val_agreement + 0.2
    timed = mc.fine_tune(student, x_old, p_old, x_new, p_new, steps=10 ** 6, seconds=0.5)
    assert timed["steps"] < 10 ** 6 and timed["seconds"] < 5
    assert mc.champion_challenger(before, after, 300) == "challenger"
    assert mc.champion_challenger(after, before, 300) == "champion"
    assert mc.champion_challenger(after, after, 300) == "champion"  # a tie keeps yesterday's


def test_drift_flags_a_shift_and_not_a_stationary_day():
    rng = np.random.default_rng(0)
    same = mc.drift(rng.random(2000) < 0.9, 0.9, rng.random(1000), rng.random(1000))
    assert not same.shifted and same.ks_pvalue > 0.001
    moved = mc.drift(rng.random(2000) < 0.9, 0.9, rng.random(1000) ** 3, rng.random(1000))
    assert moved.shifted and moved.ks_pvalue < 1e-6
    worse = mc.drift(rng.random(2000) < 0.8, 0.9, rng.random(1000), None)  # no pool: no KS
    assert worse.shifted and worse.ks_statistic is None and worse.agreement_drop > 0.05


def test_a_second_run_on_a_held_state_is_refused_naming_the_holder(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher.pt")
    write_day(tmp_path / "day1", 1, n=200)
    store = StateDir(str(tmp_path / "state"))
    with store.lock():  # another run holds the state (this process, alive)
        assert label_day(tmp_path, 1, teacher, tmp_path / "state") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by" in err[0] and str(os.getpid()) in err[0]
    assert not (tmp_path / "out1").exists()  # refused before the output was touched


def _fine_tunes_of_a_16_unit_student(monkeypatch) -> list[dict]:
    """The cold start picks a 16-unit MLP; each fine-tune's steps, share of today's rows and
    hidden widths are recorded in the list returned."""
    calls = []
    fine_tune = mc.fine_tune

    def spy(student, *args, **kw):
        calls.append({"steps": kw.get("steps"), "today_share": kw.get("today_share"),
                      "hidden": [m.out_features for m in student.modules()
                                 if isinstance(m, torch.nn.Linear)][:-1]})
        return fine_tune(student, *args, **kw)

    monkeypatch.setattr(mc, "fine_tune", spy)
    from titans.models import student_search  # the cold start's student: one hidden layer
    monkeypatch.setattr(student_search, "candidate_architectures", lambda *a: [(16,)])
    return calls


def test_a_stationary_warm_day_fine_tunes_a_challenger_one_size_up(tmp_path, monkeypatch,
                                                                   capsys):
    """No shift: the fine-tune keeps the stationary step budget, on yesterday's student widened
    (within --student-budget): the pool has outgrown the width chosen on day 1's sample."""
    calls = _fine_tunes_of_a_16_unit_student(monkeypatch)
    teacher = save_teacher(tmp_path / "teacher.pt")
    for d in (1, 2):
        write_day(tmp_path / f"day{d}", d)
        assert label_day(tmp_path, d, teacher, tmp_path / "state", "--student-budget", "1.0") == 0
    printed = capsys.readouterr().out
    assert "-> SHIFT" not in printed and "widened to 32 units" in printed
    assert calls[-1]["steps"] == mc.FINE_TUNE_STEPS and calls[-1]["hidden"] == [32]
    assert calls[-1]["today_share"] is None  # the stationary draw of today's rows
    kept = report_of(tmp_path, 2)["state"]["history"][-1]["student"]
    assert kept["arch"] == ("32" if kept["kept"] == "challenger" else "16")


def test_a_shifted_day_fine_tunes_a_wider_challenger_for_longer(tmp_path, monkeypatch, capsys):
    """Day 2's rows moved (features N(2, 1) instead of N(0, 1)): the drift line calls a shift,
    and the fine-tune gets the shifted stream's share of today's rows and its larger step
    budget, on a challenger one size up (within --student-budget) when the student has a
    hidden layer to widen; champion / challenger still decides, on today's rows."""
    calls = _fine_tunes_of_a_16_unit_student(monkeypatch)
    teacher = save_teacher(tmp_path / "teacher.pt")
    state = tmp_path / "state"
    write_day(tmp_path / "day1", 1)
    write_day(tmp_path / "day2", 2, shift=2.0)
    for d in (1, 2):
        assert label_day(tmp_path, d, teacher, state, "--student-budget", "1.0") == 0
    printed = capsys.readouterr().out
    assert "-> SHIFT" in printed
    assert calls[-1]["steps"] == mc.FINE_TUNE_STEPS * mc.SHIFT_STEPS_FACTOR
    assert calls[-1]["today_share"] == mc.SHIFT_TODAY_SHARE
    report = report_of(tmp_path, 2)
    facts = json.loads((tmp_path / "out2" / "_label" / "phases.json").read_text())
    training = json.dumps(facts)
    assert report["state"]["history"][0]["student"]["arch"] == "16"
    assert '"grown_to": "32"' in training and "widened to 32 units" in printed
    assert calls[-1]["hidden"] == [32]  # the challenger fine-tuned is the wider one
    kept = report["state"]["history"][-1]["student"]
    assert kept["kept"] in ("champion", "challenger")
    assert kept["arch"] == ("32" if kept["kept"] == "challenger" else "16")


def test_rows_that_look_shifted_at_launch_get_the_fixed_sample_not_a_prediction(tmp_path,
                                                                                capsys):
    """Yesterday's held-out rows predict today's deferral only if today's rows look like them:
    the student's scores on the rows read at launch are KS-tested first (no teacher call)."""
    teacher = save_teacher(tmp_path / "teacher.pt")
    state = tmp_path / "state"
    write_day(tmp_path / "day1", 1)
    write_day(tmp_path / "day2", 2, shift=4.0)
    for d in (1, 2):
        assert label_day(tmp_path, d, teacher, state) == 0
    printed = capsys.readouterr().out
    assert "read at launch look shifted" in printed and "predicts" not in printed
    history = report_of(tmp_path, 2)["state"]["history"]
    assert history[-1]["predicted_deferral"] is None and history[-1]["drift"]["shifted"]
    assert report_of(tmp_path, 2)["conservation_ok"]

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


def write_day(directory, day: int, n: int = ROWS, shift: float = 0.0) -> np.ndarray:
    """Day ``day``'s rows in two Parquet files: ids day*10,000 + 1.., features N(shift, 1)
    but feature 0 = id / 10**6 (ids readable from the models' input, and near 0 on every
    day: the days differ only in their rows). Returns the ids."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(100 + day)
    ids = day * 10_000 + np.arange(1, n + 1)
    x = (rng.normal(size=(n, DIM)) + shift).astype(np.float32)
    x[:, 0] = ids / 1e6
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
    # warm runs draw a smaller fresh sample than the cold start
    assert reports[2]["rows_sample_drawn"] < reports[1]["rows_sample_drawn"]
    assert reports[3]["rows_sample_drawn"] == reports[2]["rows_sample_drawn"]

    # the student's hash chain: each warm run's parent is the student the run before kept
    history = reports[3]["state"]["history"]
    assert [h["mode"] for h in history] == ["cold", "warm", "warm"]
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

"""The learning side of `titans label --state` (issue 18): how the warm start is fine-tuned on
the pool's hard rows, how yesterday's student is kept or replaced, the fine-tune's time cap
from the history, and the pool read once per run. Real torch models, the real state store on
disk; no mocks."""
import os

import numpy as np
import pytest
import torch

from titans.models import continual as mc
from titans.models import losses
from titans.models.architectures import MLP
from titans.models.student_search import Candidate
from titans.pipeline.state.store import StateDir
from titans.transforms.io.models import save_torchscript

from state_runs import write_run

DIM, CLASSES = 8, 4


def _rebuilt(probs: np.ndarray) -> np.ndarray:
    """Probabilities as the pool keeps them for hard rows: the teacher's label and confidence,
    the rest spread evenly (pipeline.label.state_commit.pool_rows)."""
    label, conf = probs.argmax(1), probs.max(1)
    p = np.repeat(((1 - conf) / (CLASSES - 1))[:, None], CLASSES, 1).astype(np.float32)
    p[np.arange(len(label)), label] = conf
    return p


def test_hard_rows_fitted_at_t1_bring_the_student_closer_to_the_teacher():
    """300 sample rows with the teacher's probabilities and 900 hard rows with rebuilt ones:
    at T=4 the loss weighs the rebuilt rows' made-up even tail as much as the sample rows'
    real one; at T=1 it is dominated by the label and confidence, which are the teacher's."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    teacher = MLP(DIM, CLASSES, (32,))

    def probs(x):
        with torch.no_grad():
            return torch.softmax(2 * teacher(torch.from_numpy(x)), -1).numpy()

    xs, xh, xe = (rng.normal(size=(n, DIM)).astype(np.float32) for n in (300, 900, 2000))
    x, p = np.concatenate([xs, xh]), np.concatenate([probs(xs), _rebuilt(probs(xh))])
    hard = np.r_[np.zeros(len(xs), bool), np.ones(len(xh), bool)]
    kl = {}
    for name, mask in (("T=1", hard), ("T=4", None)):
        torch.manual_seed(0)
        student = MLP(DIM, CLASSES, (32,))
        mc.fine_tune(student, x, p, np.zeros((0, DIM)), np.zeros((0, CLASSES)),
                     pool_hard=mask, steps=600, seed=0)
        with torch.no_grad():
            logits = student(torch.from_numpy(xe))
        kl[name] = float(losses.student_disagreement(logits, torch.from_numpy(probs(xe))).mean())
    assert kl["T=1"] < 0.95 * kl["T=4"], kl  # 0.019 vs 0.021 when written


def _cand(smooth: float, kl: float | None) -> Candidate:
    c = Candidate((), 0.0, 0.0, 0, 0.0)
    c.objective, c.smooth, c.kl = smooth, smooth, kl
    return c


def test_champion_challenger_on_kl_with_a_deferral_veto():
    n = 300
    step = 1.0 / n
    # clearly fewer teacher rows: the challenger, whatever its KL
    assert mc.champion_challenger(_cand(0.30, 0.1), _cand(0.25, 0.2), n) == "challenger"
    # the same deferral within noise: the one closer to the teacher
    assert mc.champion_challenger(_cand(0.30, 0.10), _cand(0.30, 0.08), n) == "challenger"
    assert mc.champion_challenger(_cand(0.30, 0.08), _cand(0.30, 0.10), n) == "champion"
    # closer to the teacher but needing more rows than the slack allows: yesterday's
    worse = 0.30 + (mc.KL_SLACK + 1) * step
    assert mc.champion_challenger(_cand(0.30, 0.10), _cand(worse, 0.05), n) == "champion"
    # ties keep yesterday's student; without KL the deferral alone decides
    assert mc.champion_challenger(_cand(0.30, 0.10), _cand(0.30, 0.10), n) == "champion"
    assert mc.champion_challenger(_cand(0.30, None), _cand(0.30, 0.01), n) == "champion"


def test_score_measures_kl_to_the_teacher_on_the_validation_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, DIM)).astype(np.float32)
    teacher = MLP(DIM, CLASSES, (16,))
    with torch.no_grad():
        p = torch.softmax(teacher(torch.from_numpy(x)), -1).numpy()
    target = mc.Target(bar=0.01)
    same = mc.score(teacher, x, p.argmax(1), target, teacher_val_probs=p)
    other = mc.score(MLP(DIM, CLASSES, (16,)), x, p.argmax(1), target, teacher_val_probs=p)
    assert abs(same.kl) < 1e-5 and other.kl > 0.01
    assert mc.score(teacher, x, p.argmax(1), target).kl is None


def test_fine_tune_seconds_is_bounded_by_the_cold_runs_distil_phase():
    history = [{"mode": "cold", "phase_seconds": {"distil": 3.0}},
               {"mode": "warm", "phase_seconds": {"distil": 0.5}}]
    assert mc.fine_tune_seconds(history) == mc.COLD_DISTIL_SHARE * 3.0
    assert mc.fine_tune_seconds([]) == mc.FINE_TUNE_SECONDS  # no cold run recorded
    assert mc.fine_tune_seconds([{"mode": "cold", "phase_seconds": {"distil": 10 ** 6}}]) \
        == mc.FINE_TUNE_SECONDS
    # and the fine-tune stops at its cap: 10**6 steps in at most about the cap
    student = MLP(DIM, CLASSES, (8,))
    x = np.random.default_rng(2).normal(size=(100, DIM)).astype(np.float32)
    done = mc.fine_tune(student, x, np.full((100, CLASSES), 0.25, np.float32), x[:10],
                        np.full((10, CLASSES), 0.25, np.float32), steps=10 ** 6,
                        seconds=mc.fine_tune_seconds([{"mode": "cold",
                                                       "phase_seconds": {"distil": 0.4}}]))
    assert done["steps"] < 10 ** 6 and done["seconds"] < 2.0


def test_the_fine_tune_ends_when_the_cold_runs_distil_phase_ended():
    """A warm run's fine-tune must end, counted from the job's start, when the cold run's
    distil phase ended (its wall time less calibrate and cascade), less the warm tail."""
    import time

    from titans.pipeline.label.continual import Continual, _fine_tune_budget

    cold = {"mode": "cold", "job_wall_seconds": 5.0,
            "phase_seconds": {"distil": 3.0, "calibrate": 0.2, "cascade": 0.8}}
    history = [cold, {"mode": "warm", "job_wall_seconds": 4.0, "phase_seconds": {}}]
    assert mc.fine_tune_end(history) == pytest.approx(5.0 - 1.0 - mc.WARM_TAIL_SECONDS)
    assert mc.fine_tune_end([{"mode": "cold", "phase_seconds": {"distil": 3.0}}]) is None
    assert mc.fine_tune_end([]) is None

    class Base:  # the State a warm run starts from: only its history matters here
        pass

    base = Base()
    base.history = history
    cont = Continual(store=None, base=base, teacher={}, schema={}, pool_rows=0)
    now = time.time()
    # no job start known: the distil-phase cap alone (0.6 x 3.0 s)
    assert _fine_tune_budget(cont, now) == pytest.approx(mc.COLD_DISTIL_SHARE * 3.0, abs=0.05)
    cont.job_start = now - 3.0  # 3 s into the job: 0.7 s left before the deadline
    assert _fine_tune_budget(cont, now) == pytest.approx(5.0 - 1.0 - mc.WARM_TAIL_SECONDS - 3.0,
                                                         abs=0.05)
    cont.job_start = now - 10.0  # past it: no fine-tune
    assert _fine_tune_budget(cont, now) == 0.0


def test_the_pool_is_read_once_per_run(tmp_path):
    """current() reads and checks the pool; read_pool() parses those bytes: the file is not
    read again (on gs:// a second download of the whole pool)."""
    root = str(tmp_path / "state")
    sd = StateDir(root)
    student = str(tmp_path / "s.pt")
    save_torchscript(MLP(8, 4, (16,)), student, {"arch": "MLP 8-16-4"})
    with sd.lock():
        sd.commit(write_run(sd, None, 0, student))
    state = StateDir(root).current()
    expected_rows = state.meta["pool"]["rows"]
    os.remove(state.pool_path)  # gone after current(): read_pool must not need the file
    pool = state.read_pool()
    assert pool.num_rows == expected_rows == 200
    assert state.read_pool() is pool


def test_a_pickled_state_leaves_its_pool_behind(tmp_path):
    """The cascade's last step carries the run's State (for the history entry) and Beam
    pickles it into every bundle: the pool read into it must not travel along."""
    import pickle

    root = str(tmp_path / "state")
    sd = StateDir(root)
    student = str(tmp_path / "s.pt")
    save_torchscript(MLP(8, 4, (16,)), student, {"arch": "MLP 8-16-4"})
    with sd.lock():
        sd.commit(write_run(sd, None, 0, student, new_rows=5000, cap=5000))
    state = StateDir(root).current()
    pool = state.read_pool()
    size = os.path.getsize(state.pool_path)
    data = pickle.dumps(state)
    assert len(data) < size / 4, (len(data), size)
    copy = pickle.loads(data)
    assert copy == state and copy.read_pool().equals(pool)  # read again from its file


def _vector_student(hidden, seed=0):
    from titans.models.distill import build_student

    rng = np.random.default_rng(seed)
    return build_student(hidden, DIM, CLASSES, rng.normal(size=DIM), 0.5 + rng.random(DIM),
                         seed=seed)


def test_widen_keeps_the_function_and_grow_stays_within_the_budget():
    """After a shift the challenger is yesterday's student one size up: the same answers at
    the start (so the fine-tune starts where the champion is), every hidden layer wider,
    and never more FLOPs per row than the --student-budget allows."""
    from titans.models.student_search import flops_per_row

    x = np.random.default_rng(2).normal(size=(64, DIM)).astype(np.float32)
    student = _vector_student("6,5")
    wide, arch = mc.widen(student, 2.0, noise=0.0)
    assert arch == "12,10"
    with torch.no_grad():
        a, b = student(torch.from_numpy(x)), wide(torch.from_numpy(x))
    assert torch.allclose(a, b, atol=1e-5)
    # with the default noise the copies part, and the answers stay close
    noisy, _ = mc.widen(student, 2.0, seed=1)
    with torch.no_grad():
        assert (noisy(torch.from_numpy(x)).argmax(1) == a.argmax(1)).float().mean() > 0.9
    f0 = flops_per_row(student, x[:8])[0]
    assert mc.vector_flops(student) == f0 and mc.vector_flops(MLP(DIM, CLASSES, (4,))) is None
    grown = mc.grow(student, 10 * f0)
    assert grown is not None and grown[1] == "12,10" and grown[2] <= 10 * f0
    assert grown[2] == flops_per_row(grown[0], x[:8])[0]  # the formula is the counter's count
    tight = mc.grow(student, 1.6 * f0)  # room for less than 2x: as wide as fits
    assert tight is not None and tight[2] <= 1.6 * f0 and tight[1] != "12,10"
    assert tight[2] == flops_per_row(tight[0], x[:8])[0]
    assert mc.grow(student, 1.1 * f0) is None  # no room: no challenger one size up
    assert mc.widen(_vector_student("linear"), 2.0) is None


def test_champion_challenger_counts_a_wider_challengers_compute():
    """A wider challenger runs on every row: it must save more teacher rows than its own
    extra FLOPs (in teacher units), as in the cold search's objective."""
    n = 300
    champ = _cand(0.30, 0.10)
    champ.cost = 0.03
    cheap_gain = _cand(0.28, 0.08)   # two points fewer rows, four points more compute
    cheap_gain.cost = 0.07
    assert mc.champion_challenger(champ, cheap_gain, n) == "champion"
    big_gain = _cand(0.22, 0.08)     # eight points fewer rows
    big_gain.cost = 0.07
    assert mc.champion_challenger(champ, big_gain, n) == "challenger"


def test_the_fine_tunes_loss_is_kd_at_t4_and_hard_rows_at_t1():
    """The fine-tune computes each row's softened target once (not per step): its loss is
    still losses.kd_per_example's, at TEMPERATURE for sample rows and at T=1 for hard rows."""
    torch.manual_seed(3)
    student = MLP(DIM, CLASSES, (8,))
    x = np.repeat(np.random.default_rng(3).normal(size=(1, DIM)).astype(np.float32), 40, 0)
    p = np.repeat(np.array([[0.7, 0.2, 0.06, 0.04]], np.float32), 40, 0)
    with torch.no_grad():
        logits = student(torch.from_numpy(x[:1]))
    for hard, temperature in ((False, mc.TEMPERATURE), (True, 1.0)):
        done = mc.fine_tune(student, x, p, np.zeros((0, DIM)), np.zeros((0, CLASSES)),
                            pool_hard=np.full(40, hard), steps=1, lr=0.0)
        want = float(losses.kd_per_example(logits, torch.from_numpy(p[:1]), temperature)[0])
        assert abs(done["final_loss"] - want) < 1e-4, (hard, done["final_loss"], want)

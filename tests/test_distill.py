"""The training loop: seeded, learns on digits, and gives modules the pipeline can load."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from titans.models.architectures import MLP
from titans.models.deferral import DeferHead, make_rule
from titans.models.distill import distill, make_student, train_supervised
from titans.transforms.io.models import load_model_file, save_torchscript


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    """Digits split 1200 / 597 with a small supervised teacher's probabilities for every row."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(X))
    tr, va = perm[:1200], perm[1200:]
    teacher = make_student("64", 64, 10, seed=0)
    hist = train_supervised(teacher, X[tr], y[tr], epochs=15, lr=3e-3, batch_size=64, seed=0,
                            val=(X[va], y[va]), progress=False)
    assert hist[-1]["val_accuracy"] > 0.9, hist[-1]
    with torch.no_grad():
        P = torch.softmax(teacher(torch.from_numpy(X)), dim=-1).numpy()
    return {"X": X, "y": y, "P": P, "tr": tr, "va": va}


def test_make_student_outputs_and_validation():
    assert make_student("linear", 5, 3, "kd")(torch.zeros(2, 5)).shape == (2, 3)
    assert make_student((8, 4), 5, 3, "defer")(torch.zeros(2, 5)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown distillation method"):
        make_student("8", 5, 3, "selective")


def test_same_seed_same_weights_different_seed_different(digits):
    d = digits
    X, P = d["X"][d["tr"][:300]], d["P"][d["tr"][:300]]

    def run(seed, method="easy"):
        s = make_student("8", 64, 10, method, seed=seed)
        hist = distill(s, X, P, method=method, epochs=3, batch_size=32, seed=seed, progress=False)
        return s.state_dict(), hist

    (a, ha), (b, hb), (c, _) = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ha == hb
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_leaves_the_callers_random_state_alone(digits):
    d = digits
    X, P = d["X"][:200], d["P"][:200]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(before)
    s = make_student("8", 64, 10, "kd", seed=0)
    distill(s, X, P, epochs=2, seed=0, progress=False)
    train_supervised(make_student("8", 64, 10, seed=0), X, d["y"][:200], epochs=1, seed=0,
                     progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected_next)


def test_dropout_training_is_seeded_too(digits):
    """Dropout draws from torch's global generator: the same seed still gives the same weights,
    however the caller's generator was left."""
    d = digits
    X, P = d["X"][:200], d["P"][:200]

    def run(caller_seed):
        torch.manual_seed(0)
        s = MLP(64, 10, (16,), dropout=0.5)
        torch.manual_seed(caller_seed)
        distill(s, X, P, epochs=2, seed=5, progress=False)
        return s.state_dict()

    a, b = run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kd_and_easy_students_learn_the_teacher(digits):
    d = digits
    tr, va = d["tr"], d["va"]
    for method in ("kd", "easy"):
        s = make_student("linear", 64, 10, method, seed=0)
        hist = distill(s, d["X"][tr], d["P"][tr], labels=d["y"][tr], method=method, epochs=8,
                       seed=0, val=(d["X"][va], d["P"][va], d["y"][va]), progress=False)
        last = hist[-1]
        assert [h["epoch"] for h in hist] == list(range(8))
        assert last["val_agreement"] > 0.85, (method, last)  # chance is 0.1
        assert last["val_accuracy"] > 0.85, (method, last)
        assert hist[-1]["train_loss"] < hist[0]["train_loss"]
        if method == "easy":
            # ceil(0.2 * 1200) rows hard, re-estimated every epoch
            assert last["downweighted_share"] == pytest.approx(240 / 1200)


def test_defer_student_defers_where_it_disagrees_with_the_teacher(digits):
    d = digits
    tr, va = d["tr"], d["va"]
    s = make_student("linear", 64, 10, "defer", seed=0)
    hist = distill(s, d["X"][tr], d["P"][tr], method="defer", target_deferral=0.2, epochs=15,
                   seed=0, val=(d["X"][va], d["P"][va], None), progress=False)
    assert hist[-1]["val_accuracy"] is None
    assert hist[-1]["val_agreement"] > 0.85
    with torch.no_grad():
        probs, score = DeferHead()(s(torch.from_numpy(d["X"][va])))
    assert probs.shape == (len(va), 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(va)), atol=1e-5)
    disagree = (probs.argmax(dim=1).numpy() != d["P"][va].argmax(axis=1))
    assert 0 < disagree.sum() < len(va)
    # rows where the student disagrees with the teacher get higher defer scores (AUC well above 0.5)
    pos, neg = score.numpy()[disagree], score.numpy()[~disagree]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc > 0.75, auc


def test_scripted_student_saves_and_loads(tmp_path, digits):
    d = digits
    s = make_student("8", 64, 10, "defer", seed=0)
    distill(s, d["X"][:200], d["P"][:200], method="defer", epochs=1, seed=0, progress=False)
    path = str(tmp_path / "student.pt")
    save_torchscript(s, path, {"method": "defer"})
    loaded = load_model_file(path)
    x = torch.from_numpy(d["X"][:50])
    with torch.no_grad():
        assert torch.equal(loaded(x), s(x))
    probs, score = make_rule("defer_head")(loaded(x))
    assert probs.shape == (50, 10) and score.shape == (50,)


def test_distill_validates_its_inputs(digits):
    d = digits
    s = make_student("linear", 64, 10, "kd")
    with pytest.raises(ValueError, match="needs 11"):
        distill(s, d["X"][:10], d["P"][:10], method="defer", epochs=1, progress=False)
    with pytest.raises(ValueError, match="probabilities"):
        distill(s, d["X"][:10], d["P"][:10] * 2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="labels must be integers"):
        distill(s, d["X"][:10], d["P"][:10], labels=np.zeros(10, dtype=np.float32), epochs=1, progress=False)


# ------------------------------------------------------------------ titans label's students

def test_build_student_bakes_standardisation_into_a_loadable_file(tmp_path):
    """The saved student reads raw rows: mean and std travel in the TorchScript file, made of
    allowlisted ops (load_model_file refuses anything else without --trust-model-code)."""
    from titans.models.distill import build_student, feature_stats

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 5)) * [1, 10, 100, 0.1, 0] + [0, 5, -300, 2, 7]).astype(np.float32)
    mean, std = feature_stats(X)
    s = build_student("8", 5, 3, mean, std, seed=0)
    plain = make_student("8", 5, 3, seed=0)  # same seeded initialisation as make_student
    z = (X - mean) / np.where(std > 0, std, 1.0)  # the constant column is only shifted
    with torch.no_grad():
        want = plain(torch.from_numpy(z.astype(np.float32)))
        assert torch.allclose(s(torch.from_numpy(X)), want, atol=1e-4)
    save_torchscript(s.eval(), str(tmp_path / "s.pt"), {"arch": "8"})
    loaded = load_model_file(str(tmp_path / "s.pt"))
    with torch.no_grad():
        assert torch.allclose(loaded(torch.from_numpy(X)), want, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        build_student("8", 4, 3, mean, std)


def test_distill_together_gives_each_student_what_it_would_get_alone(digits):
    """One data pass and one AdamW for all: each student's weights equal those of the same
    schedule run on it alone (AdamW's state is per parameter), so sharing costs no quality."""
    from titans.models.distill import distill_together

    d = digits
    X, P, val = d["X"][d["tr"]], d["P"][d["tr"]], (d["X"][d["va"]], d["P"][d["va"]].argmax(1))
    kw = dict(val=val, epochs=10, batch_size=128, lr=2e-2, temperature=4.0, seed=3)
    both = [make_student("linear", 64, 10, seed=0), make_student("16", 64, 10, seed=1)]
    runs = distill_together(both, X, P, **kw)
    alone = make_student("16", 64, 10, seed=1)
    run_alone = distill_together([alone], X, P, **kw)[0]
    assert runs[1] == run_alone
    for a, b in zip(both[1].state_dict().values(), alone.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert runs[1]["val_agreement"] > 0.8 and runs[1]["stopped"] == "schedule"
    with torch.no_grad():  # the weights kept are the best epoch's: their agreement is reported
        pred = both[1](torch.from_numpy(val[0])).argmax(1).numpy()
    assert np.mean(pred == val[1]) == pytest.approx(runs[1]["val_agreement"])


def test_distill_together_stops_early_and_at_the_deadline(digits):
    from titans.models.distill import distill_together

    d = digits
    X, P, val = d["X"][d["tr"]], d["P"][d["tr"]], (d["X"][d["va"]], d["P"][d["va"]].argmax(1))
    kw = dict(val=val, batch_size=256, lr=1e-2, temperature=4.0)
    run = distill_together([make_student("linear", 64, 10, seed=0)], X, P, epochs=200,
                           patience=2, **kw)[0]
    assert run["stopped"] == "converged" and run["best_epoch"] + 2 <= run["epochs"] < 200
    late = distill_together([make_student("linear", 64, 10, seed=0)], X, P, epochs=200,
                            deadline=0.0, **kw)[0]  # already past: one epoch, then stop
    assert late == {**late, "stopped": "time budget", "epochs": 1, "best_epoch": 1}

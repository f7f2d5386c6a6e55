"""The learned deferral rule: learns who is wrong, round-trips exactly, pickles for Beam."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from titans.models.deferral import make_rule
from titans.models.learned_deferral import LearnedDeferral, deferral_features
from titans.transforms.io.models import load_learned_deferral, save_learned_deferral


def auc(score, positive):
    """P(score of a random positive > score of a random negative), ties count half."""
    pos, neg = score[positive], score[~positive]
    return (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()


def synthetic(n, seed, k=10):
    """Logits of an over-confident student: its most peaked rows are the ones it gets wrong.

    Wrong with probability 0.8 when the top probability is above 0.6, else 0.1; confidence rules
    rank these rows last, so only a rule that learns the direction from data can do well.
    """
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(n, k)) * rng.uniform(0.5, 4.0, size=(n, 1))
    top = torch.softmax(torch.tensor(logits), dim=-1).max(dim=-1).values.numpy()
    wrong = rng.random(n) < np.where(top > 0.6, 0.8, 0.1)
    return torch.tensor(logits, dtype=torch.float32), wrong


@pytest.fixture(scope="module")
def fitted():
    logits, wrong = synthetic(2000, seed=0)
    probs = torch.softmax(logits, dim=-1).numpy()
    return LearnedDeferral().fit(probs, wrong, seed=0)


def test_features_are_sorted_topk_margin_and_entropy():
    p = torch.tensor([[0.1, 0.6, 0.3]])
    f = deferral_features(p)[0].tolist()
    ent = -(0.1 * np.log(0.1) + 0.6 * np.log(0.6) + 0.3 * np.log(0.3)) / np.log(3)
    assert f == pytest.approx([0.6, 0.3, 0.1, 0.3, ent], rel=1e-5)
    assert deferral_features(torch.full((2, 8), 1 / 8)).shape == (2, 7)  # k = min(K, 5)


def test_learned_rule_ranks_wrong_rows_first_on_fresh_data(fitted):
    logits, wrong = synthetic(2000, seed=1)
    probs, score = fitted(logits)
    assert probs.shape == (2000, 10) and score.shape == (2000,)
    assert ((score >= 0) & (score <= 1)).all()
    learned_auc = auc(score.numpy(), wrong)
    assert learned_auc > 0.8, learned_auc  # random is 0.5
    _, max_prob_score = make_rule("max_prob")(logits)
    # confidence ranks this student's mistakes last; the learned rule must find the direction
    assert auc(max_prob_score.numpy(), wrong) < 0.3


def test_save_load_round_trip_gives_identical_scores(tmp_path, fitted):
    path = str(tmp_path / "learned.json")
    save_learned_deferral(fitted, path)
    assert json.loads(open(path).read())["format"].startswith("titans.learned_deferral")
    loaded = make_rule("learned", load_learned_deferral(path))
    assert isinstance(loaded, LearnedDeferral) and loaded.name == "learned"
    logits, _ = synthetic(300, seed=2)
    assert torch.equal(loaded(logits)[1], fitted(logits)[1])
    assert loaded.describe()["features"] == ["p_top1", "p_top2", "p_top3", "p_top4", "p_top5",
                                             "margin", "norm_entropy"]


def test_reads_the_first_format(tmp_path, fitted):
    """titans.learned_deferral/1 files (fitted before scikit-learn did it) still load: the
    same numbers under the key "std" instead of "scale"."""
    old = fitted.to_dict()
    assert old.pop("format") == "titans.learned_deferral/2"
    old = {"format": "titans.learned_deferral/1", "std": old.pop("scale"), **old}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    logits, _ = synthetic(50, seed=6)
    assert torch.equal(load_learned_deferral(str(path))(logits)[1], fitted(logits)[1])
    assert torch.equal(make_rule("learned", path.read_bytes())(logits)[1], fitted(logits)[1])


def test_scoring_a_saved_model_needs_no_scikit_learn(tmp_path, fitted):
    path = str(tmp_path / "learned.json")
    save_learned_deferral(fitted, path)
    code = ("import sys, torch\n"
            "from titans.models.deferral import make_rule\n"
            "from titans.transforms.io.models import load_learned_deferral\n"
            f"rule = make_rule('learned', load_learned_deferral({path!r}))\n"
            "print(rule(torch.randn(4, 10))[1].shape, 'sklearn' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch.Size([4])", "False"]


def test_logistic_fit_minimises_the_documented_objective():
    """mean BCE + l2 * ||w||^2 on the standardised features: its gradient vanishes at the fit."""
    logits, wrong = synthetic(500, seed=7)
    probs = torch.softmax(logits, dim=-1)
    model = LearnedDeferral(l2=1e-2, max_iter=1000).fit(probs.numpy(), wrong, seed=0)
    z = ((deferral_features(probs) - model.mean) / model.scale).double()
    (w, b), = model.layers
    w, b = w.double().requires_grad_(), b.double().requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        (z @ w.T + b).squeeze(-1), torch.tensor(wrong, dtype=torch.float64)) + 1e-2 * (w ** 2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_pickles_for_beam(fitted):
    copy = pickle.loads(pickle.dumps(fitted))
    logits, _ = synthetic(100, seed=3)
    assert torch.equal(copy(logits)[1], fitted(logits)[1])


def test_tiny_mlp_variant_fits_and_is_seeded():
    logits, wrong = synthetic(1000, seed=4)
    probs = torch.softmax(logits, dim=-1).numpy()
    a = LearnedDeferral(hidden=(4,)).fit(probs, wrong, seed=0)
    b = LearnedDeferral(hidden=(4,)).fit(probs, wrong, seed=0)
    test_logits, test_wrong = synthetic(1000, seed=5)
    assert torch.equal(a(test_logits)[1], b(test_logits)[1])
    assert auc(a(test_logits)[1].numpy(), test_wrong) > 0.8


def test_clear_errors(tmp_path, fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        LearnedDeferral()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="fitted for 10 classes"):
        fitted(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="wrong on 0 of"):
        LearnedDeferral().fit(np.full((5, 3), 1 / 3), np.zeros(5, dtype=bool))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a learned deferral model"):
        load_learned_deferral(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        load_learned_deferral(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="cannot read learned deferral model 'upload'"):
        LearnedDeferral.from_bytes(b"{not json", where="upload")
    with pytest.raises(TypeError, match="not str"):  # titans.models reads no path
        make_rule("learned", str(bad))

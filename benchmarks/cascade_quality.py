"""Cascade quality on real data that ships offline: which student and which deferral rule keep the
teacher's accuracy at the lowest deferral rate, and does the Learn-then-Test guarantee hold?

    python benchmarks/cascade_quality.py [--seeds 3] [--resplits 100] [--n-cal 500] [--copies 20] [--out DIR]

Datasets (scikit-learn's bundled 8x8 digits; nothing is downloaded):
  digits-shifted  every image moved by one pixel along each axis with probability 1/2 (training
                  images: 4 shifted copies each; held-out images: one). A linear student cannot
                  model translation and an MLP teacher can, so there is a real gap to cascade over.
  digits          the plain images: a linear student is already close to the teacher.

Per seed: a teacher MLP(256,256) trained on labels; linear students (64*10+10 weights) trained
as plain (CE on labels), kd, easy and defer, the last three from the teacher's probabilities only
(no labels, as in the pipeline). Held-out images are split into a calibration half (fits the
learned rule) and a test half (the accuracy tables). Cascade accuracy is against the true labels;
a row is sent to the teacher iff its score is above the threshold for the deferral rate
(titans.models.calibration.cascade_curve).

The Learn-then-Test guarantee (ltt_threshold, no labels: loss = 1[easy and student != teacher],
delta = 0.1) is checked two ways per seed:
  resplit    a population of held-out rows; each resplit draws --n-cal calibration rows from it
             without replacement, chooses the threshold on them, and measures the loss on all the
             other rows (the test set). For digits-shifted the population is --copies independently
             shifted copies of every held-out image (~18,000 rows, never a training image), so the
             test set has thousands of rows and P(test loss > eps) estimates P(risk > eps). Plain
             digits has only ~720 held-out rows and no label-preserving way to make more (shifting
             them would change the distribution the models are judged on), so there the resplit is
             complementary halves (~360 test rows, noisy) and is secondary.
  bootstrap  the population is the seed's held-out rows (calibration + test halves); calibration rows
             are drawn i.i.d. with replacement and the threshold's true risk is computed on the
             whole population: exactly LTT's promise for that empirical distribution. This is
             the primary check for plain digits.
Draws within one seed share one population, so they are not independent populations: the
violation rate is P(risk > eps) for that seed's population, and the seeds give a few populations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from titans.models.calibration import cascade_curve, ltt_threshold
from titans.models.deferral import RULES, DeferHead
from titans.models.distill import distill, make_student, train_supervised
from titans.models.learned_deferral import LearnedDeferral
from titans.models.loading import count_parameters
from titans.transforms.io.models import save_plot

RATES = (0.05, 0.10, 0.20, 0.30)
CURVE_RATES = np.round(np.linspace(0.0, 1.0, 101), 10)
METHODS = ("plain", "kd", "easy", "defer")
CONFIDENCE = ("max_prob", "margin", "entropy")
TEACHER = dict(arch="256,256", epochs=30, lr=1e-3, batch_size=64, weight_decay=1e-4)
STUDENT = dict(arch="linear", epochs=20, lr=1e-2, batch_size=64, weight_decay=1e-4)
DISTILL = dict(temperature=2.0, target_deferral=0.2)
LTT_EPS = (0.01, 0.02, 0.05)
LTT_DELTA = 0.1
LTT_PAIRS = (("kd", "max_prob"), ("easy", "max_prob"), ("defer", "defer_head"))


# ----------------------------------------------------------------------------- data

def _shift(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Each image moved by -1/0/+1 pixel along each axis (with probability p per axis), zero fill."""
    n = len(images)
    pad = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    dx = rng.integers(-1, 2, n) * (rng.random(n) < p)
    dy = rng.integers(-1, 2, n) * (rng.random(n) < p)
    return np.stack([pad[i, 1 + dy[i]:9 + dy[i], 1 + dx[i]:9 + dx[i]] for i in range(n)])


def load_dataset(name: str, seed: int, copies: int = 20) -> dict:
    """Train / calibration / test splits by image, as float32 features in [0, 1] and int64 labels.

    Also "pop", the population for the LTT resplit check: for digits-shifted, `copies` independently
    shifted copies of every held-out (calibration or test) image, labelled with the image's label and
    drawn from a separate seeded generator so that train / cal / test are exactly as without it; for
    digits, the calibration + test rows themselves (no new rows can be made without changing the
    distribution).
    """
    digits = load_digits()
    images, y = digits.images / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    if name == "digits":
        tr, ca, te = np.split(perm, [int(0.6 * len(y)), int(0.8 * len(y))])
        X = images.reshape(len(y), -1)
        parts = {"train": (X[tr], y[tr]), "cal": (X[ca], y[ca]), "test": (X[te], y[te])}
        parts["pop"] = (np.concatenate([X[ca], X[te]]), np.concatenate([y[ca], y[te]]))
    elif name == "digits-shifted":
        tr, held = np.split(perm, [len(y) // 2])
        ca, te = np.split(held, [len(held) // 2])
        x_tr = np.concatenate([_shift(images[tr], rng) for _ in range(4)]).reshape(-1, 64)
        parts = {"train": (x_tr, np.tile(y[tr], 4)),
                 "cal": (_shift(images[ca], rng).reshape(-1, 64), y[ca]),
                 "test": (_shift(images[te], rng).reshape(-1, 64), y[te])}
        if np.intersect1d(tr, held).size:  # by construction; the population must never hold a training image
            raise AssertionError("held-out images overlap the training images")
        pop_rng = np.random.default_rng([seed, 1])  # its own stream: the splits above do not move
        parts["pop"] = (np.concatenate([_shift(images[held], pop_rng) for _ in range(copies)]).reshape(-1, 64),
                        np.tile(y[held], copies))
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return {k: (X.astype(np.float32), yy) for k, (X, yy) in parts.items()}


# ----------------------------------------------------------------------------- one seed

def _logits(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X))


def run_seed(name: str, seed: int, copies: int = 20) -> dict:
    """Train everything for one seed; return accuracies, curves and the arrays the LTT checks need."""
    data = load_dataset(name, seed, copies)
    (x_tr, y_tr), (x_ca, y_ca), (x_te, y_te) = data["train"], data["cal"], data["test"]
    d, k = x_tr.shape[1], 10

    teacher = make_student(TEACHER["arch"], d, k, seed=seed)
    train_supervised(teacher, x_tr, y_tr, seed=seed, progress=False,
                     **{key: v for key, v in TEACHER.items() if key != "arch"})
    probs = {part: torch.softmax(_logits(teacher, data[part][0]), dim=-1).numpy()
             for part in ("train", "cal", "test", "pop")}
    t_pred = {part: p.argmax(axis=1) for part, p in probs.items()}
    out = {"teacher_acc": float((t_pred["test"] == y_te).mean()), "teacher_params": count_parameters(teacher),
           "sizes": {part: len(v[1]) for part, v in data.items()}, "students": {}}
    x_pop = data["pop"][0]

    hyper = {key: v for key, v in STUDENT.items() if key != "arch"}
    for method in METHODS:
        student = make_student(STUDENT["arch"], d, k, "kd" if method == "plain" else method, seed=seed)
        if method == "plain":
            train_supervised(student, x_tr, y_tr, seed=seed, progress=False, **hyper)
        else:
            distill(student, x_tr, probs["train"], method=method, seed=seed, progress=False,
                    **DISTILL, **hyper)
        per_part = {}
        for part, X in (("cal", x_ca), ("test", x_te), ("pop", x_pop)):
            logits = _logits(student, X)
            p = torch.softmax(logits[:, :k], dim=-1)
            scores = {rule: RULES[rule]().score(p).numpy() for rule in CONFIDENCE}
            if method == "defer":
                scores["defer_head"] = DeferHead()(logits)[1].numpy()
            per_part[part] = {"probs": p, "pred": p.argmax(dim=1).numpy(), "scores": scores}
        cal, test = per_part["cal"], per_part["test"]
        wrong_cal = cal["pred"] != t_pred["cal"]  # what the cascade can fix: disagreement with the teacher
        try:
            learned = LearnedDeferral().fit(cal["probs"].numpy(), wrong_cal, seed=seed)
            for part in ("cal", "test"):
                per_part[part]["scores"]["learned"] = learned.score(per_part[part]["probs"]).numpy()
        except ValueError as e:  # e.g. a student that agrees with the teacher on every cal row
            print(f"  [{name} seed {seed} {method}] learned rule skipped: {e}", file=sys.stderr)
        curves = {rule: cascade_curve(s, test["pred"], t_pred["test"], y_te, rates=CURVE_RATES)
                  for rule, s in test["scores"].items()}
        out["students"][method] = {
            "acc": float((test["pred"] == y_te).mean()),
            "agreement": float((test["pred"] == t_pred["test"]).mean()),
            "params": count_parameters(student),
            "curves": curves,
            "ltt_pool": {rule: (np.concatenate([cal["scores"][rule], test["scores"][rule]]),
                                np.concatenate([cal["pred"], test["pred"]]))
                         for rule in test["scores"] if rule != "learned"},  # learned saw the cal rows
            "ltt_pop": {rule: (s, per_part["pop"]["pred"]) for rule, s in per_part["pop"]["scores"].items()},
        }
    out["ltt_teacher"] = np.concatenate([t_pred["cal"], t_pred["test"]])
    out["ltt_labels"] = np.concatenate([y_ca, y_te])
    out["pop_teacher"], out["pop_labels"] = t_pred["pop"], data["pop"][1]
    out["plot"] = {"y_test": y_te, "t_pred_test": t_pred["test"]}
    return out


# ----------------------------------------------------------------------------- guarantee

def ltt_checks(runs: list[dict], resplits: int, n_cal: int, seed: int = 1234) -> list[dict]:
    """Learn then Test (no labels, delta = LTT_DELTA), checked two ways on each seed's held-out rows.

    resplit:   population = run["ltt_pop"] (digits-shifted: many shifted copies of the held-out
               images; digits: the held-out rows). Each draw takes min(n_cal, population // 2)
               calibration rows without replacement, chooses the threshold on them, and measures on
               all the other rows the loss the guarantee is about, 1[easy and student != teacher]
               (= accuracy lost vs the teacher), plus the accuracy drop vs the labels.
    bootstrap: population = the held-out rows, calibration + test halves (run["ltt_pool"]); the same
               number of calibration rows drawn i.i.d. with replacement; the threshold's risk on the
               whole population is its true risk under that empirical distribution.
    Every (method, rule, eps) sees the same draws (one generator per seed, restarted), so rows of
    the table differ only by what they choose.
    """
    rows = []
    for method, rule in LTT_PAIRS:
        for eps in LTT_EPS:
            keys = ("viol", "loss", "defer", "acc_drop", "boot_viol", "boot_risk", "boot_defer")
            stats = {key: [] for key in keys}
            per_seed, boot_per_seed = [], []
            for i, run in enumerate(runs):
                rng = np.random.default_rng([seed, i])
                scores, s_pred = run["students"][method]["ltt_pop"][rule]
                t_pred, y = run["pop_teacher"], run["pop_labels"]
                disagree, s_right, t_right = s_pred != t_pred, s_pred == y, t_pred == y
                n = len(scores)
                m = min(n_cal, n // 2)
                b_scores, b_pred = run["students"][method]["ltt_pool"][rule]
                b_teacher = run["ltt_teacher"]
                b_disagree = b_pred != b_teacher
                nb = len(b_scores)
                seed_viol, seed_boot_viol = [], []
                for _ in range(resplits):
                    is_cal = np.zeros(n, dtype=bool)
                    is_cal[rng.choice(n, m, replace=False)] = True
                    r = ltt_threshold(scores[is_cal], s_pred[is_cal], t_pred[is_cal], max_accuracy_loss=eps,
                                      delta=LTT_DELTA)
                    te = ~is_cal
                    easy = scores[te] <= r["threshold"]
                    test_loss = float((easy & disagree[te]).mean())  # the guarantee's loss, on the test rows
                    cascade_right = np.where(easy, s_right[te], t_right[te])
                    seed_viol.append(test_loss > eps)
                    stats["loss"].append(test_loss)
                    stats["defer"].append(float(1.0 - easy.mean()))
                    stats["acc_drop"].append(float(t_right[te].mean() - cascade_right.mean()))

                    boot = rng.integers(0, nb, m)
                    r = ltt_threshold(b_scores[boot], b_pred[boot], b_teacher[boot], max_accuracy_loss=eps,
                                      delta=LTT_DELTA)
                    true_risk = float(((b_scores <= r["threshold"]) & b_disagree).mean())
                    seed_boot_viol.append(true_risk > eps)
                    stats["boot_risk"].append(true_risk)
                    stats["boot_defer"].append(float((b_scores > r["threshold"]).mean()))
                stats["viol"] += seed_viol
                stats["boot_viol"] += seed_boot_viol
                per_seed.append(float(np.mean(seed_viol)))
                boot_per_seed.append(float(np.mean(seed_boot_viol)))
            rows.append({"method": method, "rule": rule, "eps": eps, "n_cal": m, "n_pop": n, "n_boot_pop": nb,
                         "draws": len(stats["loss"]), "per_seed_viol": per_seed,
                         "boot_per_seed_viol": boot_per_seed,
                         **{k: float(np.mean(v)) for k, v in stats.items()}})
    return rows


# ----------------------------------------------------------------------------- report

def pm(values, scale=1.0, digits=4) -> str:
    v = np.asarray(values, dtype=float) * scale
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {sd:.{digits}f}"


def acc_at(curve: dict, rate: float) -> float:
    return curve["accuracy"][int(np.argmin(np.abs(CURVE_RATES - rate)))]


def report(name: str, runs: list[dict], ltt_rows: list[dict]) -> str:
    lines = []
    sizes = runs[0]["sizes"]
    lines.append(f"## {name}: {sizes['train']} train / {sizes['cal']} calibration / {sizes['test']} test rows, "
                 f"{len(runs)} seeds (mean ± std over seeds)\n")
    lines.append("| model | parameters | test accuracy | agreement with teacher |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| teacher MLP(256,256) | {runs[0]['teacher_params']} | {pm([r['teacher_acc'] for r in runs])} | 1 |")
    for m in METHODS:
        st = [r["students"][m] for r in runs]
        lines.append(f"| student {m} (linear) | {st[0]['params']} | {pm([s['acc'] for s in st])} | "
                     f"{pm([s['agreement'] for s in st])} |")
    lines.append("")
    lines.append("Cascade accuracy (vs labels) at a deferral rate, and area under accuracy vs deferral (0 to 1):\n")
    lines.append("| method | rule | " + " | ".join(f"@{int(r * 100)}%" for r in RATES) + " | AUC |")
    lines.append("|---|---|" + "---:|" * (len(RATES) + 1))
    for m in METHODS:
        for rule in runs[0]["students"][m]["curves"]:
            curves = [r["students"][m]["curves"][rule] for r in runs if rule in r["students"][m]["curves"]]
            cells = [pm([acc_at(c, rate) for c in curves]) for rate in RATES]
            lines.append(f"| {m} | {rule} | " + " | ".join(cells) + f" | {pm([c['auc'] for c in curves])} |")
    lines.append("")
    lines += verdict(runs)
    lines.append("")
    lines += ltt_report(runs, ltt_rows)
    return "\n".join(lines)


def ltt_report(runs: list[dict], ltt_rows: list[dict]) -> list[str]:
    """The LTT table and the guarantee verdict; the primary check is the one with the large test set."""
    first = ltt_rows[0]
    n_seeds, draws = len(runs), first["draws"]
    per_seed_draws = draws // n_seeds
    big = first["n_pop"] > first["n_boot_pop"]  # a population of extra rows exists (digits-shifted)
    # one-sided Monte Carlo slack: 2 standard errors of a frequency delta estimated from `draws` draws
    slack = 2 * np.sqrt(LTT_DELTA * (1 - LTT_DELTA) / draws)
    seed_slack = 2 * np.sqrt(LTT_DELTA * (1 - LTT_DELTA) / per_seed_draws)

    def mark(rate: float, sl: float) -> str:
        return "yes" if rate <= LTT_DELTA else "within MC slack" if rate <= LTT_DELTA + sl else "NO"

    def against_delta(rate: float, sl: float) -> str:
        if rate <= LTT_DELTA:
            return f"<= delta = {LTT_DELTA}"
        if rate <= LTT_DELTA + sl:
            return f"> delta = {LTT_DELTA} but within the {sl:.3f} Monte Carlo slack"
        return f"ABOVE delta = {LTT_DELTA} + {sl:.3f} Monte Carlo slack"

    def seeds(values) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    lines = [f"LTT guarantee (loss = 1[easy and student != teacher], i.e. accuracy lost vs the teacher, no "
             f"labels; delta = {LTT_DELTA}; binomial p-values; {first['n_cal']} calibration rows; {draws} draws "
             f"per row = {n_seeds} seeds x {per_seed_draws}; a violation is loss > eps).\n"]
    if big:
        lines.append(f"PRIMARY, resplit: population = {first['n_pop']} rows, {first['n_pop'] // first['n_boot_pop']} "
                     f"independently shifted copies of each of the {first['n_boot_pop']} held-out images (no "
                     f"training image, shifted or not); each draw takes {first['n_cal']} calibration rows without "
                     f"replacement and measures the loss on the other {first['n_pop'] - first['n_cal']} rows, so "
                     f"the test set's own noise is small and the violation rate estimates P(risk > eps).")
        lines.append(f"SECONDARY, bootstrap: population = the {first['n_boot_pop']} held-out rows (calibration + "
                     f"test halves, one shifted copy of each held-out image); {first['n_cal']} calibration rows "
                     f"drawn i.i.d. with replacement; true risk = loss on the whole population.")
    else:
        lines.append(f"PRIMARY, bootstrap: population = the {first['n_boot_pop']} held-out rows (calibration + "
                     f"test); {first['n_cal']} calibration rows drawn i.i.d. with replacement; true risk = loss on "
                     f"the whole population, exactly what LTT promises for that distribution. Plain digits has no "
                     f"larger held-out population: shifting its images would change the distribution the models are "
                     f"judged on, so the trick used for digits-shifted is not applied here.")
        lines.append(f"SECONDARY, resplit: complementary halves of the same {first['n_pop']} rows ({first['n_cal']} "
                     f"calibration, {first['n_pop'] - first['n_cal']} test); the test half is small, so its own "
                     f"sampling noise inflates P(test loss > eps) and this rate is not a check of the guarantee.")
    lines.append("Draws within one seed share that seed's population; 'per seed' gives each population's rate "
                 f"(MC slack for {per_seed_draws} draws: {seed_slack:.3f}).\n")
    lines.append("| method | rule | eps | resplit: P(test loss > eps) | " + ("resplit: per seed | " if big else "")
                 + "resplit: mean test loss | resplit: mean deferral | resplit: accuracy drop vs labels | "
                 "bootstrap: P(true risk > eps) | " + ("" if big else "bootstrap: per seed | ")
                 + "bootstrap: mean true risk | bootstrap: mean deferral |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in ltt_rows:
        res = f"{r['viol']:.3f}" + (f" ({mark(r['viol'], slack)}) | {seeds(r['per_seed_viol'])}" if big else "")
        boot = f"{r['boot_viol']:.3f}" + ("" if big else f" ({mark(r['boot_viol'], slack)}) | "
                                                         f"{seeds(r['boot_per_seed_viol'])}")
        lines.append(f"| {r['method']} | {r['rule']} | {r['eps']} | {res} | {r['loss']:.4f} | {r['defer']:.3f} | "
                     f"{r['acc_drop']:+.4f} | {boot} | {r['boot_risk']:.4f} | {r['boot_defer']:.3f} |")
    worst_res = max(r["viol"] for r in ltt_rows)
    worst_boot = max(r["boot_viol"] for r in ltt_rows)
    worst_seed = max(max(r["per_seed_viol" if big else "boot_per_seed_viol"]) for r in ltt_rows)
    seed_note = (f"Worst single seed ({per_seed_draws} draws): {worst_seed:.2f}, "
                 f"{against_delta(worst_seed, seed_slack)}.")
    lines.append("")
    if big:
        lines.append(f"Guarantee check (primary, resplit of the {first['n_pop']}-row population): the chosen threshold "
                     f"broke its accuracy target (test loss > eps) in at most {worst_res:.3f} of draws over all "
                     f"(method, rule, eps) rows: {against_delta(worst_res, slack)}. "
                     f"{seed_note} Secondary, bootstrap on the "
                     f"{first['n_boot_pop']} held-out rows: at most {worst_boot:.3f}.")
    else:
        lines.append(f"Guarantee check (primary, bootstrap on the {first['n_boot_pop']} held-out rows): "
                     f"P(true risk > eps) is at most {worst_boot:.3f} over all (method, rule, eps) rows: "
                     f"{against_delta(worst_boot, slack)}. {seed_note} "
                     f"Secondary, complementary halves ({first['n_pop'] - first['n_cal']} test rows): test loss > eps "
                     f"in at most {worst_res:.3f} of splits, a figure that mixes the guarantee with the small test "
                     f"half's own noise.")
    return lines


def verdict(runs: list[dict]) -> list[str]:
    """easy vs kd at equal deferral, rule by rule: mean difference, std over seeds, seeds won."""
    lines = ["easy − kd, cascade accuracy at equal deferral (percentage points, mean ± std over seeds; "
             "seeds where easy is higher):\n",
             "| rule | " + " | ".join(f"@{int(r * 100)}%" for r in RATES) + " | AUC |",
             "|---|" + "---:|" * (len(RATES) + 1)]
    diffs, wins = [], 0
    rules = [r for r in runs[0]["students"]["kd"]["curves"] if all(
        r in run["students"]["kd"]["curves"] and r in run["students"]["easy"]["curves"] for run in runs)]
    for rule in rules:
        cells = []
        for rate in list(RATES) + ["auc"]:
            d = np.array([(run["students"]["easy"]["curves"][rule]["auc"] - run["students"]["kd"]["curves"][rule]["auc"])
                          if rate == "auc" else
                          acc_at(run["students"]["easy"]["curves"][rule], rate) - acc_at(run["students"]["kd"]["curves"][rule], rate)
                          for run in runs]) * 100
            won = int((d > 0).sum())
            cells.append(f"{pm(d, digits=2)} ({won}/{len(d)})")
            if rate != "auc":
                diffs.append(d.mean())
                wins += d.mean() > 0
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    diffs = np.array(diffs)
    lines.append("")
    lines.append(f"Verdict: easy beats kd on the mean in {wins} of {len(diffs)} (rule, deferral rate) cells; "
                 f"mean difference {diffs.mean():+.2f} pp (range {diffs.min():+.2f} to {diffs.max():+.2f} pp). "
                 + ("easy is better than kd here." if diffs.mean() > 0 and wins > len(diffs) / 2 else
                    "easy does NOT beat kd here." if diffs.mean() < 0 else "no clear difference."))
    return lines


def plot(run: dict, path: str, name: str = "digits-shifted") -> None:
    """Seed-0 curves of the first dataset, with one LTT operating point (kd/max_prob, eps = 0.02) marked."""
    chosen = {"plain/max_prob": run["students"]["plain"]["curves"]["max_prob"]}
    for m, rule in (("kd", "max_prob"), ("kd", "learned"), ("easy", "max_prob"), ("defer", "defer_head")):
        if rule in run["students"][m]["curves"]:
            chosen[f"{m}/{rule}"] = run["students"][m]["curves"][rule]
    scores, s_pred = run["students"]["kd"]["ltt_pool"]["max_prob"]
    n_cal = len(scores) - len(run["plot"]["y_test"])  # the pool is the cal rows, then the test rows
    r = ltt_threshold(scores[:n_cal], s_pred[:n_cal], run["ltt_teacher"][:n_cal], max_accuracy_loss=0.02,
                      delta=LTT_DELTA)
    hard = scores[n_cal:] > r["threshold"]
    cascade = np.where(hard, run["plot"]["t_pred_test"], s_pred[n_cal:])
    op = (float(hard.mean()), float((cascade == run["plot"]["y_test"]).mean()), "LTT kd/max_prob eps=0.02")
    save_plot(path, chosen, operating_point=op, teacher_accuracy=run["teacher_acc"],
              student_accuracy=run["students"]["kd"]["acc"], title=f"{name}, seed 0, test rows")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3,
                    help="independent seeds (data split, training, population); each trains a teacher and four "
                         "students per dataset. Tables show mean ± std over seeds (default: 3)")
    ap.add_argument("--resplits", type=int, default=100,
                    help="LTT draws per seed for every (method, rule, eps): each draw is one calibration/test "
                         "resplit and one bootstrap calibration set (default: 100)")
    ap.add_argument("--n-cal", type=int, default=500,
                    help="calibration rows per LTT draw, capped at half the resplit population so the test set "
                         "is at least as large (plain digits: capped to ~360) (default: 500)")
    ap.add_argument("--copies", type=int, default=20,
                    help="digits-shifted only: independently shifted copies of each held-out image in the resplit "
                         "population (default: 20, i.e. ~18,000 rows); training images are never used")
    ap.add_argument("--datasets", default="digits-shifted,digits",
                    help="comma-separated datasets to run, from: digits-shifted, digits (default: both)")
    ap.add_argument("--out", metavar="DIR",
                    help="directory to write cascade_quality.md (the printed tables) and cascade_quality.png "
                         "(seed-0 curves of the first dataset); nothing is written without it")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.resplits < 1:
        ap.error("--seeds and --resplits must be >= 1")
    if args.n_cal < 1 or args.copies < 1:
        ap.error("--n-cal and --copies must be >= 1")
    unknown = set(args.datasets.split(",")) - {"digits-shifted", "digits"}
    if unknown:
        ap.error(f"unknown dataset(s) {', '.join(sorted(unknown))}; choose from digits-shifted, digits")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on a small machine
    start = time.time()
    sections, first_run, first_name = [], None, None
    for name in args.datasets.split(","):
        runs = []
        for seed in range(args.seeds):
            t0 = time.time()
            runs.append(run_seed(name, seed, args.copies))
            print(f"[{name}] seed {seed} trained in {time.time() - t0:.1f}s", file=sys.stderr)
        first_run, first_name = first_run or runs[0], first_name or name
        section = report(name, runs, ltt_checks(runs, args.resplits, args.n_cal))
        print(section + "\n", flush=True)
        sections.append(section)
    footer = (f"Students: {STUDENT}; teacher: {TEACHER}; distillation: {DISTILL}. "
              f"Total time {time.time() - start:.0f}s on {os.cpu_count()} CPU cores (torch threads = 1).")
    print(footer)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cascade_quality.md"), "w") as f:
            f.write("# Cascade quality\n\n" + "\n\n".join(sections) + "\n\n" + footer + "\n")
        plot(first_run, os.path.join(args.out, "cascade_quality.png"), first_name)
        print(f"wrote {args.out}/cascade_quality.md and cascade_quality.png")


if __name__ == "__main__":
    main()

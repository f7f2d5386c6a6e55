"""Cascade quality on real data that ships offline: which student and which deferral rule keep the
teacher's accuracy at the lowest deferral rate, and does the Learn-then-Test guarantee hold?

    python benchmarks/cascade_quality.py [--seeds 3] [--resplits 100] [--out DIR]

Datasets (scikit-learn's bundled 8x8 digits; nothing is downloaded):
  digits-shifted  every image moved by one pixel along each axis with probability 1/2 (training
                  images: 4 shifted copies each; held-out images: one). A linear student cannot
                  model translation and an MLP teacher can, so there is a real gap to cascade over.
  digits          the plain images: a linear student is already close to the teacher.

Per seed: a teacher MLP(256,256) trained on labels; linear students (64*10+10 weights) trained
as plain (CE on labels), kd, easy and defer, the last three from the teacher's probabilities only
(no labels, as in the pipeline). Held-out images are split into a calibration half (fits the
learned rule, sets LTT thresholds) and a test half (all reported figures). Cascade accuracy is
against the true labels; a row is sent to the teacher iff its score is above the threshold for
the deferral rate (titans.models.calibration.cascade_curve).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from titans.models.calibration import cascade_curve, ltt_threshold, plot_curves
from titans.models.deferral import RULES, DeferHead
from titans.models.distill import distill, make_student, train_supervised
from titans.models.learned_deferral import LearnedDeferral
from titans.models.loading import count_parameters

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


def load_dataset(name: str, seed: int) -> dict:
    """Train / calibration / test splits by image, as float32 features in [0, 1] and int64 labels."""
    digits = load_digits()
    images, y = digits.images / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    if name == "digits":
        tr, ca, te = np.split(perm, [int(0.6 * len(y)), int(0.8 * len(y))])
        X = images.reshape(len(y), -1)
        parts = {"train": (X[tr], y[tr]), "cal": (X[ca], y[ca]), "test": (X[te], y[te])}
    elif name == "digits-shifted":
        tr, held = np.split(perm, [len(y) // 2])
        ca, te = np.split(held, [len(held) // 2])
        x_tr = np.concatenate([_shift(images[tr], rng) for _ in range(4)]).reshape(-1, 64)
        parts = {"train": (x_tr, np.tile(y[tr], 4)),
                 "cal": (_shift(images[ca], rng).reshape(-1, 64), y[ca]),
                 "test": (_shift(images[te], rng).reshape(-1, 64), y[te])}
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return {k: (X.astype(np.float32), yy) for k, (X, yy) in parts.items()}


# ----------------------------------------------------------------------------- one seed

def _logits(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X))


def run_seed(name: str, seed: int) -> dict:
    """Train everything for one seed; return accuracies, curves and the cal/test arrays LTT needs."""
    data = load_dataset(name, seed)
    (x_tr, y_tr), (x_ca, y_ca), (x_te, y_te) = data["train"], data["cal"], data["test"]
    d, k = x_tr.shape[1], 10

    teacher = make_student(TEACHER["arch"], d, k, seed=seed)
    train_supervised(teacher, x_tr, y_tr, seed=seed, progress=False,
                     **{key: v for key, v in TEACHER.items() if key != "arch"})
    probs = {part: torch.softmax(_logits(teacher, data[part][0]), dim=-1).numpy()
             for part in ("train", "cal", "test")}
    t_pred = {part: p.argmax(axis=1) for part, p in probs.items()}
    out = {"teacher_acc": float((t_pred["test"] == y_te).mean()), "teacher_params": count_parameters(teacher),
           "sizes": {part: len(v[1]) for part, v in data.items()}, "students": {}}

    hyper = {key: v for key, v in STUDENT.items() if key != "arch"}
    for method in METHODS:
        student = make_student(STUDENT["arch"], d, k, "kd" if method == "plain" else method, seed=seed)
        if method == "plain":
            train_supervised(student, x_tr, y_tr, seed=seed, progress=False, **hyper)
        else:
            distill(student, x_tr, probs["train"], method=method, seed=seed, progress=False,
                    **DISTILL, **hyper)
        per_part = {}
        for part, X in (("cal", x_ca), ("test", x_te)):
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
        }
    out["ltt_teacher"] = np.concatenate([t_pred["cal"], t_pred["test"]])
    out["ltt_labels"] = np.concatenate([y_ca, y_te])
    out["plot"] = {"y_test": y_te, "t_pred_test": t_pred["test"]}
    return out


# ----------------------------------------------------------------------------- guarantee

def ltt_resplits(runs: list[dict], resplits: int, seed: int = 1234) -> list[dict]:
    """Learn then Test, checked two ways on each seed's held-out rows (calibration + test halves).

    split:     the rows are cut into random halves; the threshold is chosen on one and its
               accuracy loss vs the teacher measured on the other (what a user would see). The
               halves are complements, so a lucky calibration half means an unlucky test half:
               this frequency can exceed delta even when the guarantee holds.
    bootstrap: the held-out rows are the population; a calibration set of the same size is drawn
               from it i.i.d. (with replacement) and the chosen threshold's risk is computed on the
               whole population, which is its true risk. This is exactly what LTT promises:
               P(true risk > eps) <= delta.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for method, rule in LTT_PAIRS:
        for eps in LTT_EPS:
            stats = {key: [] for key in ("split_viol", "loss", "defer", "acc_drop", "boot_viol", "boot_defer")}
            for run in runs:
                scores, s_pred = run["students"][method]["ltt_pool"][rule]
                t_pred, y = run["ltt_teacher"], run["ltt_labels"]
                disagree = s_pred != t_pred
                n = len(scores)
                n_cal = n // 2
                for _ in range(resplits):
                    perm = rng.permutation(n)
                    ca, te = perm[:n_cal], perm[n_cal:]
                    r = ltt_threshold(scores[ca], s_pred[ca], t_pred[ca], max_accuracy_loss=eps, delta=LTT_DELTA)
                    hard = scores[te] > r["threshold"]
                    cascade = np.where(hard, t_pred[te], s_pred[te])
                    test_loss = float((cascade != t_pred[te]).mean())  # accuracy lost vs the teacher
                    stats["split_viol"].append(test_loss > eps)
                    stats["loss"].append(test_loss)
                    stats["defer"].append(float(hard.mean()))
                    stats["acc_drop"].append(float((t_pred[te] == y[te]).mean() - (cascade == y[te]).mean()))

                    boot = rng.integers(0, n, n_cal)
                    r = ltt_threshold(scores[boot], s_pred[boot], t_pred[boot], max_accuracy_loss=eps,
                                      delta=LTT_DELTA)
                    true_risk = float(((scores <= r["threshold"]) & disagree).mean())
                    stats["boot_viol"].append(true_risk > eps)
                    stats["boot_defer"].append(float((scores > r["threshold"]).mean()))
            rows.append({"method": method, "rule": rule, "eps": eps, "n_cal": n_cal,
                         "draws": len(stats["loss"]), **{k: float(np.mean(v)) for k, v in stats.items()}})
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
    first = ltt_rows[0]
    lines.append(f"LTT guarantee (risk = accuracy loss vs the teacher, delta = {LTT_DELTA}, binomial p-values, "
                 f"{first['n_cal']} calibration rows, {first['draws']} draws = {len(runs)} seeds x "
                 f"{first['draws'] // len(runs)}). split: threshold from a random half of the held-out rows, "
                 f"loss measured on the other half. bootstrap: calibration rows drawn i.i.d. from the held-out "
                 f"rows, true risk computed on all of them.\n")
    lines.append("| method | rule | eps | split: P(test loss > eps) | split: mean test loss | split: mean deferral | "
                 "split: accuracy drop vs labels | bootstrap: P(true risk > eps) | bootstrap: mean deferral |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in ltt_rows:
        lines.append(f"| {r['method']} | {r['rule']} | {r['eps']} | {r['split_viol']:.3f} | {r['loss']:.4f} | "
                     f"{r['defer']:.3f} | {r['acc_drop']:+.4f} | {r['boot_viol']:.3f} | {r['boot_defer']:.3f} |")
    worst_boot = max(r["boot_viol"] for r in ltt_rows)
    worst_split = max(r["split_viol"] for r in ltt_rows)
    # one-sided Monte Carlo slack: 2 standard errors of a frequency delta estimated from `draws` draws
    slack = 2 * np.sqrt(LTT_DELTA * (1 - LTT_DELTA) / first["draws"])
    lines.append("")
    lines.append(f"Guarantee check: P(true risk > eps) is at most {worst_boot:.3f} over all rows "
                 f"({'within' if worst_boot <= LTT_DELTA + slack else 'ABOVE'} delta = {LTT_DELTA} "
                 f"+ {slack:.3f} Monte Carlo slack). On complementary halves the test-half loss exceeded eps in "
                 f"at most {worst_split:.3f} of splits ({'<=' if worst_split <= LTT_DELTA else '>'} delta); that "
                 f"figure mixes the guarantee with the test half's own sampling noise.")
    return "\n".join(lines)


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


def plot(run: dict, path: str) -> None:
    """Seed-0 curves of the main dataset, with one LTT operating point (kd/max_prob, eps = 0.02) marked."""
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
    plot_curves(chosen, path, operating_point=op, teacher_accuracy=run["teacher_acc"],
                student_accuracy=run["students"]["kd"]["acc"], title="digits-shifted, seed 0, test rows")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--resplits", type=int, default=100, help="calibration/test resplits per seed for LTT")
    ap.add_argument("--datasets", default="digits-shifted,digits")
    ap.add_argument("--out", help="directory for cascade_quality.md and cascade_quality.png")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.resplits < 1:
        ap.error("--seeds and --resplits must be >= 1")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on a small machine
    start = time.time()
    sections, first_run = [], None
    for name in args.datasets.split(","):
        runs = []
        for seed in range(args.seeds):
            t0 = time.time()
            runs.append(run_seed(name, seed))
            print(f"[{name}] seed {seed} trained in {time.time() - t0:.1f}s", file=sys.stderr)
        first_run = first_run or runs[0]
        section = report(name, runs, ltt_resplits(runs, args.resplits))
        print(section + "\n", flush=True)
        sections.append(section)
    footer = (f"Students: {STUDENT}; teacher: {TEACHER}; distillation: {DISTILL}. "
              f"Total time {time.time() - start:.0f}s on {os.cpu_count()} CPU cores (torch threads = 1).")
    print(footer)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cascade_quality.md"), "w") as f:
            f.write("# Cascade quality\n\n" + "\n\n".join(sections) + "\n\n" + footer + "\n")
        plot(first_run, os.path.join(args.out, "cascade_quality.png"))
        print(f"wrote {args.out}/cascade_quality.md and cascade_quality.png")


if __name__ == "__main__":
    main()

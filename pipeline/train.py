"""`titans distill` and `titans calibrate`: train a student, then choose its deferral rule and threshold.

Both read their Parquet data into memory with pyarrow (``titans.pipeline.datasets``); the
cascade over the full dataset is `titans run`. Each command is a pair of functions the CLI
registers: ``add_*_parser(subparsers)`` and ``run_*(args) -> exit code``. Anything wrong with
the inputs is a ValueError that says what to fix, printed as ``titans COMMAND: error: ...``
with exit code 2.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import pyarrow as pa
import torch

from titans.models.calibration import (BOUNDS, cascade_curve, ltt_threshold, plot_curves,
                                       save_calibration)
from titans.models.storage import absolute, write_bytes
from titans.models.deferral import CONFIDENCE_RULES, DeferHead, make_rule, threshold_for_rate
from titans.models.distill import METHODS, distill, make_student
from titans.models.learned_deferral import LearnedDeferral
from titans.models.loading import save_torchscript
from titans.models.architectures import parse_hidden
from titans.pipeline.datasets import (Dataset, check_labels, check_output_path, predict,
                                      read_dataset)
from titans.pipeline.flags import add_model_flags, feature_columns, model_ref
from titans.pipeline.plan import load_checked
from titans.transforms.features import FeatureSpec, feature_matrix, is_list_type

IN_MEMORY_NOTE = ("The data is read into memory with pyarrow: fine for the millions of rows a "
                  "student needs; labeling a dataset at scale is done by `titans teacher-label` "
                  "and `titans run`.")
RULE_CHOICES = ("max_prob", "margin", "entropy", "defer_head", "learned")
REPORT_RATES = (0.05, 0.10, 0.20, 0.30)


# =========================================================================== shared

def _run(command: str, body, args: argparse.Namespace) -> int:
    try:
        body(args)
    except ValueError as e:  # edge checks: say what to fix, no traceback
        print(f"titans {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _data_flags(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, required=True, metavar="PATTERN",
                   help=f"the {what}: Parquet file, directory (its *.parquet files) or glob; local "
                        f"or a URL such as gs://bucket/data/*.parquet. Files are conformed to the "
                        f"first file's schema")
    p.add_argument("--feature-columns", default="features", metavar="COL[,COL...]",
                   help="one vector column (list or fixed-size list of numbers) or several numeric "
                        "columns concatenated in order, as for `titans run` (default: %(default)s); "
                        "rows with a null, NaN or wrong-length feature vector are dropped and counted")
    p.add_argument("--label-column", metavar="COL",
                   help="integer class ids 0..K-1 in the teacher's class order (optional); rows "
                        "with a null label are dropped")


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) row indices: a seeded random ``fraction`` of the rows goes second."""
    perm = np.random.default_rng(seed).permutation(n)
    n_second = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_second = min(max(n_second, 1), n - 1)
    return np.sort(perm[n_second:]), np.sort(perm[:n_second])


def _take(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


# =========================================================================== distill

def add_distill_parser(subparsers) -> argparse.ArgumentParser:

    p = subparsers.add_parser(
        "distill", allow_abbrev=False,
        help="train a small student from a teacher (its model or its stored probabilities)",
        description="Distill a student MLP from a teacher's probabilities and save it as "
                    "TorchScript for `titans run`. Give exactly one of --teacher (run it over the "
                    "training rows) or --teacher-probs (a column of K probabilities per row, as "
                    "`titans teacher-label` writes it). A seeded --val-fraction of the rows is held "
                    "out for the per-epoch validation line. " + IN_MEMORY_NOTE)
    _data_flags(p, "--train", "training set")
    add_model_flags(p, "teacher", required=False)
    p.add_argument("--teacher-probs", metavar="COL",
                   help="column holding the teacher's class probabilities (list of K floats per "
                        "row, e.g. teacher_probs from `titans teacher-label`), instead of --teacher")
    p.add_argument("--out", required=True, metavar="STUDENT.pt",
                   help="where to save the student (TorchScript; local path or URL)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="kd: Hinton distillation; easy: kd that down-weights the share "
                        "--target-deferral of rows the cascade sends to the teacher anyway; "
                        "defer: K+1 outputs, the last means 'ask the teacher' (use it with "
                        "--rule defer_head)")
    p.add_argument("--student-arch", default="16", metavar="WIDTHS",
                   help="hidden layer widths of the student MLP, e.g. 64,64, or 'linear' "
                        "(default: %(default)s)")
    p.add_argument("--target-deferral", type=float, default=0.2, metavar="R",
                   help="share of rows the cascade will send to the teacher, used by easy and "
                        "defer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="rows per training step (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=2.0, metavar="T",
                   help="softening temperature of kd/easy (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of cross-entropy on --label-column in kd/easy; the rest is the "
                        "distillation term; unused without labels (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of rows held out for validation, seeded (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the split, the initialisation and the shuffles: the same seed and "
                        "data give identical weights (default: %(default)s)")
    return p


def run_distill(args: argparse.Namespace) -> int:
    return _run("distill", _distill, args)


def _distill(args) -> None:
    _check_distill_args(args)
    check_output_path(args.out, "--out")
    extra = {args.teacher_probs: "--teacher-probs"} if args.teacher_probs else {}
    ds = read_dataset(args.train, feature_columns(args.feature_columns), args.label_column, extra)
    print(ds.describe())
    if args.teacher_probs:
        probs = probs_from_column(ds.extra[args.teacher_probs], args.teacher_probs)
    else:
        teacher = load_checked("teacher", model_ref(args, "teacher"), ds.features.dim)
        probs = torch.softmax(predict(teacher, ds.x), dim=-1).numpy()
        if probs.shape[1] < 2:
            raise ValueError(f"--teacher {args.teacher!r} has {probs.shape[1]} output; a "
                             f"classifier needs at least 2 classes")
    k = probs.shape[1]
    check_labels(ds.labels, k, args.label_column)
    train, val = _split(len(ds.x), args.val_fraction, args.seed)
    student = make_student(args.student_arch, ds.features.dim, k, args.method, seed=args.seed)
    history = distill(
        student, ds.x[train], probs[train], labels=_take(ds.labels, train), method=args.method,
        target_deferral=args.target_deferral, temperature=args.temperature, alpha=args.alpha,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        val=(ds.x[val], probs[val], _take(ds.labels, val)) if len(val) else None, progress=True)
    final = {k_: v for k_, v in history[-1].items() if k_ != "epoch"}
    metadata = {
        "method": args.method, "arch": args.student_arch,
        "feature_columns": list(ds.features.columns), "feature_dim": ds.features.dim,
        "num_classes": k, "outputs": k + (args.method == "defer"),
        "target_deferral": args.target_deferral, "seed": args.seed,
        "teacher": absolute(args.teacher) if args.teacher else f"column {args.teacher_probs}",
        "label_column": args.label_column, "train_rows": len(train), "val_rows": len(val),
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "temperature": args.temperature, "alpha": args.alpha, "final": final,
    }
    save_student(student, args.out, metadata)
    _print_distill_summary(args, len(train), len(val), k, final)


def _check_distill_args(a) -> None:
    if bool(a.teacher) == bool(a.teacher_probs):
        raise ValueError("give exactly one of --teacher MODEL (run the teacher over the training "
                         "rows) or --teacher-probs COL (its stored probabilities)"
                         + (", not both" if a.teacher else ""))
    if a.teacher_probs and (a.teacher_class or a.teacher_class_kwargs):
        raise ValueError("--teacher-class/--teacher-class-kwargs go with --teacher, not "
                         "--teacher-probs")
    parse_hidden(a.student_arch)  # ValueError with the expected form
    checks = [
        (0.0 <= a.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {a.val_fraction}"),
        (0.0 <= a.target_deferral <= 1.0,
         f"--target-deferral must be in [0, 1], got {a.target_deferral}"),
        (a.epochs >= 1, f"--epochs must be at least 1, got {a.epochs}"),
        (a.batch_size >= 1, f"--batch-size must be at least 1, got {a.batch_size}"),
        (a.lr > 0, f"--lr must be > 0, got {a.lr}"),
        (a.temperature > 0, f"--temperature must be > 0, got {a.temperature}"),
        (0.0 <= a.alpha <= 1.0, f"--alpha must be in [0, 1], got {a.alpha}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def probs_from_column(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """A list column of K probabilities per row -> float32 [rows, K]; ValueError if it is not one."""
    flag = f"--teacher-probs {name!r}"
    t = column.type
    if not is_list_type(t) \
            or not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise ValueError(f"{flag} must be a list of K probabilities per row (as `titans "
                         f"teacher-label` writes it), but it is {t}")
    first = column.drop_null().slice(0, 1).to_pylist()
    k = len(first[0]) if first else 0
    if k < 2:
        raise ValueError(f"{flag} must hold at least 2 probabilities per row; its first row "
                         f"has {k}")
    probs, reasons = feature_matrix(pa.table({name: column}), FeatureSpec((name,), k, vector=True))
    if reasons is not None:
        bad = [r for r in reasons if r is not None]
        raise ValueError(f"{flag}: {len(bad):,} row(s) do not hold {k} finite numbers like the "
                         f"first row (first problem: {bad[0]}); every row needs the teacher's "
                         f"K probabilities")
    sums = probs.sum(axis=1, dtype=np.float64)
    wrong = np.flatnonzero((probs < 0).any(axis=1) | (np.abs(sums - 1.0) > 1e-3))
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"{flag} must hold probabilities (non-negative, summing to 1 per row), "
                         f"but {wrong.size:,} row(s) do not (e.g. a row summing to {sums[i]:.4g}); "
                         f"if it holds logits, store their softmax")
    return probs


def save_student(student: torch.nn.Module, path: str, metadata: dict) -> None:
    """TorchScript with metadata, written to a local path or any URL Beam/fsspec can write."""
    buf = io.BytesIO()
    save_torchscript(student, buf, metadata)
    write_bytes(path, buf.getvalue())


def _print_distill_summary(args, n_train: int, n_val: int, k: int, final: dict) -> None:
    print(f"student: MLP {args.student_arch} -> {k + (args.method == 'defer')} outputs, method "
          f"{args.method}, trained on {n_train:,} rows, validated on {n_val:,}")
    if n_val:
        line = f"final validation: agreement with the teacher {_pct(final.get('val_agreement'))}"
        if final.get("val_accuracy") is not None:
            line += f", accuracy {_pct(final['val_accuracy'])}"
        if args.method == "defer":
            line += f", defer output wins on {_pct(final.get('val_defer_rate'))} of rows"
        print(line)
    print(f"saved: {args.out} (TorchScript)")
    if args.method == "defer":
        print("use it with --rule defer_head (titans calibrate / titans run): its last output "
              "is the deferral score")
    else:
        print("next: titans calibrate --student ... to choose the deferral rule and threshold")


# =========================================================================== calibrate

def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:

    p = subparsers.add_parser(
        "calibrate", allow_abbrev=False,
        help="choose the deferral rule and threshold on a labeled or unlabeled calibration set",
        description="Run the student and the teacher on a calibration set, compare every "
                    "deferral rule (accuracy vs deferral curves), and write the chosen rule and "
                    "threshold to CAL.json for `titans run`. The rows are split in two seeded "
                    "random halves: the `learned` rule is fitted on one half (saved as "
                    "<CAL stem>.learned.json), and every rule's curve and threshold is computed "
                    "on the other, so the rules are compared on the same rows and the LTT "
                    "guarantee holds (n_fit_rows / n_calibration_rows in CAL.json). A student "
                    "with K+1 outputs (--method defer) has no learned rule and uses every row. "
                    "Without "
                    "--label-column, accuracy means agreement with the teacher. "
                    + IN_MEMORY_NOTE)
    _data_flags(p, "--input", "calibration set (rows like those the cascade will label)")
    add_model_flags(p, "student")
    add_model_flags(p, "teacher")
    p.add_argument("--out", required=True, metavar="CAL.json",
                   help="calibration file to write. Local paths inside it (student, teacher, "
                        "deferral_model) are made absolute, so `titans run --calibration` works "
                        "from any directory; URLs are kept as given")
    p.add_argument("--rule", choices=RULE_CHOICES,
                   help="the operating rule (default: margin, or defer_head for a student with "
                        "K+1 outputs, which only defer_head can run); learned is skipped, with a "
                        "note, when the student is never or always wrong on the fitting half")
    p.add_argument("--plot", metavar="CURVE.png",
                   help="plot every rule's curve with the operating point (PNG or SVG)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--deferral-rate", type=float, metavar="R",
                     help="budget: the threshold sends this share of the held-out rows to the "
                          "teacher; no accuracy guarantee")
    how.add_argument("--max-accuracy-loss", type=float, metavar="EPS",
                     help="Learn then Test: the cheapest threshold whose accuracy loss against "
                          "the teacher is <= EPS with probability >= 1 - --delta (against the "
                          "teacher's answers when there are no labels)")
    how.add_argument("--target-accuracy", type=float, metavar="A",
                     help="Learn then Test: the cheapest threshold whose cascade accuracy is >= A "
                          "with probability >= 1 - --delta; needs --label-column")
    p.add_argument("--delta", type=float, metavar="D",
                   help="LTT: allowed probability that the guarantee fails (default: 0.1)")
    p.add_argument("--bound", choices=BOUNDS,
                   help="LTT: p-values from the exact binomial tail or Hoeffding-Bentkus "
                        "(default: binomial)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the split into halves and the learned rule's fit (default: "
                        "%(default)s)")
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    return _run("calibrate", _calibrate, args)


def _calibrate(args) -> None:
    method = _check_calibrate_args(args)
    check_output_path(args.out, "--out")
    if args.plot:
        check_output_path(args.plot, "--plot")
    ds = read_dataset(args.input, feature_columns(args.feature_columns), args.label_column)
    print(ds.describe())
    if len(ds.x) < 2:
        raise ValueError(f"the calibration set has {len(ds.x)} usable row(s); it needs at least 2 "
                         f"(in practice thousands) to be split into halves")
    s_logits, t_pred, k = _run_models(args, ds)
    check_labels(ds.labels, k, args.label_column)
    class_probs = torch.softmax(s_logits[:, :k], dim=-1)
    s_pred = class_probs.argmax(dim=-1).numpy()
    if s_logits.shape[1] > k:  # defer student: no learned rule, so no rows are set aside for it
        held, fit = np.arange(len(ds.x)), np.arange(0)
    else:
        held, fit = _split(len(ds.x), 0.5, args.seed)
    scores, learned, skipped = rule_scores(s_logits, class_probs, s_pred, t_pred, ds.labels, fit,
                                           args.seed)
    rule = _operating_rule(args.rule, s_logits.shape[1] - k, scores, skipped)

    h = {"scores": scores[rule][held], "student_pred": s_pred[held], "teacher_pred": t_pred[held],
         "labels": _take(ds.labels, held)}
    curves = {name: cascade_curve(s[held], h["student_pred"], h["teacher_pred"], h["labels"])
              for name, s in scores.items()}
    threshold, guarantee = _threshold(args, method, h)
    learned_path = os.path.splitext(args.out)[0] + ".learned.json" if learned else None
    data = _calibration_record(args, ds, rule, method, threshold, guarantee, curves, h, k,
                               s_logits.shape[1], len(fit), learned_path)
    if learned:
        learned.save(learned_path)
    save_calibration(args.out, data)
    _print_calibration(args, data, curves, skipped)
    if args.plot:
        plot_curves(curves, args.plot,
                    operating_point=(data["deferral_rate"], data["cascade_accuracy"],
                                     f"{rule}, {method}"),
                    teacher_accuracy=data.get("teacher_accuracy"),
                    student_accuracy=data.get("student_accuracy"),
                    title=f"cascade {'accuracy' if ds.labels is not None else 'agreement with the teacher'}"
                          f" on {len(held):,} calibration rows")
        print(f"plot: {args.plot}")


def _check_calibrate_args(a) -> str:
    """'budget' or 'ltt', after checking the flags that choose the threshold."""
    given = [f for f, v in (("--deferral-rate", a.deferral_rate),
                            ("--max-accuracy-loss", a.max_accuracy_loss),
                            ("--target-accuracy", a.target_accuracy)) if v is not None]
    if len(given) != 1:
        raise ValueError("choose how the threshold is set with exactly one of --deferral-rate R "
                         "(budget), --max-accuracy-loss EPS or --target-accuracy A (guaranteed)"
                         + (f"; got {' and '.join(given)}" if given else ""))
    if a.deferral_rate is not None:
        if not 0.0 <= a.deferral_rate <= 1.0:
            raise ValueError(f"--deferral-rate must be in [0, 1], got {a.deferral_rate}")
        if a.delta is not None or a.bound is not None:
            raise ValueError("--delta and --bound go with --max-accuracy-loss or "
                             "--target-accuracy; --deferral-rate gives no guarantee")
        return "budget"
    if a.target_accuracy is not None:
        if not a.label_column:
            raise ValueError("--target-accuracy needs --label-column: without labels the "
                             "cascade's accuracy is unknown (use --max-accuracy-loss, which is "
                             "relative to the teacher)")
        if not 0.0 < a.target_accuracy < 1.0:
            raise ValueError(f"--target-accuracy must be in (0, 1), got {a.target_accuracy}")
    elif not 0.0 < a.max_accuracy_loss < 1.0:
        raise ValueError(f"--max-accuracy-loss must be in (0, 1), got {a.max_accuracy_loss}")
    if a.delta is not None and not 0.0 < a.delta < 1.0:
        raise ValueError(f"--delta must be in (0, 1), got {a.delta}")
    return "ltt"


def _run_models(args, ds: Dataset) -> tuple[torch.Tensor, np.ndarray, int]:
    """(student logits, teacher argmax, K) on every row; the student may have K or K+1 outputs."""
    student = load_checked("student", model_ref(args, "student"), ds.features.dim)
    teacher = load_checked("teacher", model_ref(args, "teacher"), ds.features.dim)
    s_logits, t_logits = predict(student, ds.x), predict(teacher, ds.x)
    k, outputs = t_logits.shape[1], s_logits.shape[1]
    if outputs not in (k, k + 1) or k < 2:
        raise ValueError(f"the student has {outputs} outputs but the teacher has {k} classes: "
                         f"the student needs {k} outputs (or {k + 1} when trained with "
                         f"`titans distill --method defer`), in the teacher's class order")
    return s_logits, t_logits.argmax(dim=-1).numpy(), k


def rule_scores(s_logits: torch.Tensor, class_probs: torch.Tensor, s_pred: np.ndarray,
                t_pred: np.ndarray, labels: np.ndarray | None, fit: np.ndarray,
                seed: int) -> tuple[dict[str, np.ndarray], LearnedDeferral | None, str | None]:
    """(every applicable rule's score on every row, the fitted learned rule or None, why it
    was skipped or None).

    Confidence rules score the student's K class probabilities. A K+1-output student adds
    defer_head; `learned` (K-output students only) is fitted on the ``fit`` rows, to predict
    where the student disagrees with the label (or the teacher without labels).
    """
    scores = {name: make_rule(name).score(class_probs).numpy() for name in CONFIDENCE_RULES}
    if s_logits.shape[1] > class_probs.shape[1]:
        scores["defer_head"] = DeferHead()(s_logits)[1].numpy()
        return scores, None, None
    wrong = s_pred[fit] != (t_pred[fit] if labels is None else labels[fit])
    try:
        learned = LearnedDeferral().fit(class_probs[fit], wrong, seed=seed)
    except ValueError as e:
        return scores, None, str(e)
    scores["learned"] = learned.score(class_probs).numpy()
    return scores, learned, None


def _operating_rule(asked: str | None, extra_outputs: int, scores: dict, skipped: str | None) -> str:
    if extra_outputs:
        if asked not in (None, "defer_head"):
            raise ValueError(f"the student has K+1 outputs (trained with --method defer), which "
                             f"`titans run` reads with --rule defer_head only; drop --rule "
                             f"{asked} or pass --rule defer_head")
        return "defer_head"
    rule = asked or "margin"
    if rule == "defer_head":
        raise ValueError("--rule defer_head needs a student with K+1 outputs (trained with "
                         "`titans distill --method defer`); this one has K; choose another --rule")
    if rule not in scores:
        raise ValueError(f"--rule learned: the learned deferral model could not be fitted "
                         f"({skipped}); choose another --rule")
    return rule


def _threshold(args, method: str, h: dict) -> tuple[float, dict | None]:
    if method == "budget":
        return threshold_for_rate(h["scores"], args.deferral_rate), None
    kwargs = {"delta": 0.1 if args.delta is None else args.delta,
              "bound": args.bound or "binomial"}
    if args.target_accuracy is not None:
        kwargs["target_accuracy"] = args.target_accuracy
    else:
        kwargs["max_accuracy_loss"] = args.max_accuracy_loss
    guarantee = ltt_threshold(h["scores"], h["student_pred"], h["teacher_pred"], h["labels"],
                              **kwargs)
    return guarantee["threshold"], guarantee


def _calibration_record(args, ds: Dataset, rule, method, threshold, guarantee, curves, h, k,
                        outputs, n_fit, learned_path) -> dict:
    hard = h["scores"] > threshold
    cascade = np.where(hard, h["teacher_pred"], h["student_pred"])
    truth = h["teacher_pred"] if h["labels"] is None else h["labels"]
    data = {
        "rule": rule, "threshold": float(threshold), "method": method,
        "deferral_rate": float(hard.mean()), "guarantee": guarantee, "curves": curves,
        "requested": {"deferral_rate": args.deferral_rate} if method == "budget" else
        {"max_accuracy_loss": args.max_accuracy_loss, "target_accuracy": args.target_accuracy,
         "delta": guarantee["delta"], "bound": guarantee["bound"]},
        "student": absolute(args.student), "teacher": absolute(args.teacher),
        "input": args.input, "feature_columns": list(ds.features.columns),
        "label_column": args.label_column, "num_classes": k, "student_outputs": outputs,
        "seed": args.seed, "n_rows": len(ds.x), "n_fit_rows": n_fit,
        "n_calibration_rows": len(h["scores"]),
        "accuracy_reference": "labels" if h["labels"] is not None else "teacher",
        "cascade_accuracy": float((cascade == truth).mean()),
        "cascade_agreement_with_teacher": float((cascade == h["teacher_pred"]).mean()),
    }
    if h["labels"] is not None:
        data["teacher_accuracy"] = float((h["teacher_pred"] == h["labels"]).mean())
        data["student_accuracy"] = float((h["student_pred"] == h["labels"]).mean())
    if learned_path:
        data["deferral_model"] = absolute(learned_path)
    if outputs > k:
        data["comparison_only_rules"] = list(CONFIDENCE_RULES)
    return data


def _print_calibration(args, data: dict, curves: dict, skipped: str | None) -> None:
    n, ref = data["n_calibration_rows"], data["accuracy_reference"]
    what = "accuracy vs labels" if ref == "labels" else "agreement with the teacher (no labels)"
    if skipped:
        print(f"note: rule learned skipped: {skipped}")
    aside = (f", the other {data['n_fit_rows']:,} set aside to fit the learned rule"
             if data["n_fit_rows"] else "")
    print(f"curves on {n:,} rows{aside}; cascade {what}:")
    print(curve_table(curves, data["rule"], data.get("comparison_only_rules", ())))
    if ref == "labels":
        print(f"teacher alone: {_pct(data['teacher_accuracy'])}   student alone: "
              f"{_pct(data['student_accuracy'])}")
    t = data["threshold"]
    print(f"operating point: rule {data['rule']}, threshold {t:.6g} ({data['method']}): "
          f"{data['deferral_rate']:.1%} of the calibration rows to the teacher, cascade "
          f"{_pct(data['cascade_accuracy'])} ({'accuracy' if ref == 'labels' else 'agreement'})")
    if data["method"] == "budget":
        print("budget mode: no accuracy guarantee (use --max-accuracy-loss or --target-accuracy "
              "for one)")
    else:
        print(f"guarantee: {data['guarantee']['guarantee']}")
        if ref == "teacher":
            print("without --label-column the guarantee is relative to the teacher's answers, "
                  "not to the truth")
    print(f"calibration: {args.out}" + (f"  learned rule: {data['deferral_model']}"
                                        if "deferral_model" in data else ""))


def curve_table(curves: dict, chosen: str, comparison_only=()) -> str:
    """rule, AUC and cascade accuracy at 5/10/20/30% deferral, one line per rule."""
    head = f"  {'rule':<12}{'AUC':>8}" + "".join(f"{f'@{r:.0%}':>9}" for r in REPORT_RATES)
    lines = [head]
    for name, c in curves.items():
        at = [np.interp(r, c["deferral_rate"], c["accuracy"]) for r in REPORT_RATES]
        mark = " <- operating rule" if name == chosen else \
            " (comparison only)" if name in comparison_only else ""
        lines.append(f"  {name:<12}{c['auc']:>8.4f}" + "".join(f"{a:>9.2%}" for a in at) + mark)
    return "\n".join(lines)

"""`titans calibrate`: run the student and the teacher on a calibration set, score every
deferral rule, choose the operating rule and threshold, write CAL.json for `titans run`.

The flags are in ``titans.pipeline.cli.flags``; curves, Learn then Test and CAL.json in
``titans.models.calibration``, its files written by ``titans.transforms.io.models``. Anything
wrong with the inputs is a ValueError that says what to fix, printed as
``titans calibrate: error: ...`` with exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch

from titans.models import defaults as train_defaults
from titans.models.calibration import calibration_record, cascade_curve, ltt_threshold
from titans.models.deferral import (CONFIDENCE_RULES, DeferHead, make_rule,
                                    threshold_for_rate)
from titans.models.forward import forward_in_chunks
from titans.models.learned_deferral import LearnedDeferral
from titans.transforms.io.models import save_calibration, save_learned_deferral, save_plot
from titans.transforms.io.storage import absolute
from titans.pipeline import defaults
from titans.pipeline.cli.console import print_calibration
from titans.pipeline.commands.datasets import (data_features, Dataset, check_labels, check_output_path, read_dataset,
                                      split_rows)
from titans.pipeline.cli.values import model_ref
from titans.pipeline.model_checks import load_checked


@dataclasses.dataclass
class HeldOut:
    """The calibration rows every curve and threshold is computed on (not the rows the
    learned rule was fitted on), with the operating rule's scores."""
    scores: np.ndarray
    student_pred: np.ndarray
    teacher_pred: np.ndarray
    labels: np.ndarray | None

    @property
    def truth(self) -> np.ndarray:
        """What accuracy is measured against: the labels, or the teacher without them."""
        return self.teacher_pred if self.labels is None else self.labels


@dataclasses.dataclass
class Calibration:
    """What `titans calibrate` decided, before it becomes the CAL.json record."""
    rule: str
    method: str                   # 'budget' or 'ltt'
    threshold: float
    guarantee: dict | None        # the ltt_threshold result, for 'ltt'
    curves: dict[str, dict]       # rule -> cascade_curve on the held-out rows
    held: HeldOut
    num_classes: int
    student_outputs: int          # K, or K + 1 for a defer student
    n_fit_rows: int               # rows the learned rule was fitted on
    learned_path: str | None      # where the learned rule is saved, if it was fitted


def run_calibrate(args: argparse.Namespace) -> int:
    _calibrate(args)
    return 0


def _calibrate(args) -> None:
    method = _check_calibrate_args(args)
    check_output_path(args.out, "--out")
    if args.plot:
        check_output_path(args.plot, "--plot")
    ds = read_dataset(args.input, data_features(args), args.label_column, fmt=args.format)
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
        held, fit = split_rows(len(ds.x), 0.5, args.seed)
    scores, learned, skipped = rule_scores(s_logits, class_probs, s_pred, t_pred, ds.labels, fit,
                                           args.seed)
    rule = _operating_rule(args.rule, s_logits.shape[1] - k, scores, skipped)

    labels = None if ds.labels is None else ds.labels[held]
    h = HeldOut(scores[rule][held], s_pred[held], t_pred[held], labels)
    curves = {name: cascade_curve(s[held], h.student_pred, h.teacher_pred, h.labels)
              for name, s in scores.items()}
    threshold, guarantee = _threshold(args, method, h)
    cal = Calibration(rule, method, threshold, guarantee, curves, h, k, s_logits.shape[1],
                      len(fit), os.path.splitext(args.out)[0] + ".learned.json" if learned else None)
    data = _calibration_record(args, ds, cal)
    if learned:
        save_learned_deferral(learned, cal.learned_path)
    save_calibration(args.out, data)
    print_calibration(args, data, skipped)
    if args.plot:
        save_plot(args.plot, curves,
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
    student = load_checked("student", model_ref(args, "student"), ds.features)
    teacher = load_checked("teacher", model_ref(args, "teacher"), ds.features)
    s_logits = forward_in_chunks(student, ds.x, defaults.BATCH_SIZE)
    t_logits = forward_in_chunks(teacher, ds.x, defaults.BATCH_SIZE)
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
    rule = asked or defaults.RULE
    if rule == "defer_head":
        raise ValueError("--rule defer_head needs a student with K+1 outputs (trained with "
                         "`titans distill --method defer`); this one has K; choose another --rule")
    if rule not in scores:
        raise ValueError(f"--rule learned: the learned deferral model could not be fitted "
                         f"({skipped}); choose another --rule")
    return rule


def _threshold(args, method: str, h: HeldOut) -> tuple[float, dict | None]:
    if method == "budget":
        return threshold_for_rate(h.scores, args.deferral_rate), None
    kwargs = {"delta": train_defaults.DELTA if args.delta is None else args.delta,
              "bound": args.bound or train_defaults.BOUND}
    if args.target_accuracy is not None:
        kwargs["target_accuracy"] = args.target_accuracy
    else:
        kwargs["max_accuracy_loss"] = args.max_accuracy_loss
    guarantee = ltt_threshold(h.scores, h.student_pred, h.teacher_pred, h.labels, **kwargs)
    return guarantee["threshold"], guarantee


def _calibration_record(args, ds: Dataset, cal: Calibration) -> dict:
    """The CAL.json record (``titans.models.calibration.calibration_record`` builds it)."""
    h = cal.held
    data = calibration_record(
        cal.rule, cal.threshold, cal.method, h.scores, h.student_pred, h.teacher_pred, h.labels,
        guarantee=cal.guarantee, curves=cal.curves,
        requested={"deferral_rate": args.deferral_rate} if cal.method == "budget" else
        {"max_accuracy_loss": args.max_accuracy_loss, "target_accuracy": args.target_accuracy,
         "delta": cal.guarantee["delta"], "bound": cal.guarantee["bound"]},
        num_classes=cal.num_classes, student_outputs=cal.student_outputs, n_rows=len(ds.x),
        n_fit_rows=cal.n_fit_rows, student=absolute(args.student), teacher=absolute(args.teacher),
        input=args.input, feature_columns=list(ds.features.columns),
        label_column=args.label_column, seed=args.seed)
    if cal.learned_path:
        data["deferral_model"] = absolute(cal.learned_path)
    if cal.student_outputs > cal.num_classes:
        data["comparison_only_rules"] = list(CONFIDENCE_RULES)
    return data

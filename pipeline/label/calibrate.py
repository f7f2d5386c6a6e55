"""Phase 4, calibrate: Learn then Test on the calibration rows against the teacher's labels
(no ground truth needed), or a deferral-rate budget -> DIR/calibration.json, the record
`titans calibrate` writes (``models.calibration.calibration_record``), which `titans run
--calibration` reads.

The guarantee: the calibration rows are a uniformly random part of a uniformly random sample
of the input, and the student never saw them, so they are exchangeable with the rows outside
the sample; with probability >= 1 - delta over that draw, the share of rows outside the
sample whose label differs from the teacher's is <= EPS (relative to the teacher, not to the
truth).
"""
from __future__ import annotations

import numpy as np
import torch

from titans.models.calibration import calibration_record, cascade_curve, ltt_threshold
from titans.models.deferral import CONFIDENCE_RULES, make_rule, threshold_for_rate
from titans.models.forward import forward_in_chunks
from titans.transforms.io import storage
from titans.transforms.io.models import load_model_file, save_calibration


def calibrate(scores: np.ndarray, student_pred: np.ndarray, teacher_pred: np.ndarray, *,
              eps: float | None, delta: float, deferral_rate: float | None) -> tuple[float, dict | None]:
    """(threshold, LTT result or None) on the calibration rows: the cheapest threshold whose
    disagreement with the teacher is certified <= eps at level delta, or the rate's quantile."""
    if eps is None:
        return threshold_for_rate(scores, deferral_rate), None
    result = ltt_threshold(scores, student_pred, teacher_pred, None, max_accuracy_loss=eps,
                           delta=delta)
    return result["threshold"], result


def guarantee_text(c, ltt: dict | None, n_sample: int) -> str:
    if ltt is None:
        return (f"no guarantee: --deferral-rate {c.deferral_rate:g} sends about that share of the "
                f"rows outside the sample to the teacher")
    if not ltt["certified"]:
        return (f"nothing certified with {ltt['n']:,} calibration rows at EPS {c.eps:g}, delta "
                f"{c.level:g}: every row outside the sample goes to the teacher (raise "
                f"--sample-rows)")
    return (f"with probability >= {1 - c.level:g} over the draw of the {n_sample:,}-row sample, "
            f"at most {c.eps:g} of the rows outside the sample get a label that differs from the "
            f"teacher's; the sample rows carry the teacher's own labels (relative to the teacher, "
            f"not to the truth; the sample is a uniform random draw from the same rows)")


def run(c, s, split, student: dict, jd) -> dict:
    """Calibrate the student on the calibration rows and write calibration.json; the facts
    phases.json and report.json keep."""
    job = c.job
    model = load_model_file(jd.student, "cpu")
    logits = forward_in_chunks(model, s.x[split.cal], job.batch_size)
    probs = torch.softmax(logits, dim=-1)
    s_pred, t_pred = probs.argmax(dim=-1).numpy(), s.teacher_pred[split.cal]
    rule = student["rule"]
    all_scores = {name: make_rule(name).score(probs).numpy() for name in CONFIDENCE_RULES}
    scores = all_scores[rule]
    threshold, ltt = calibrate(scores, s_pred, t_pred, eps=c.eps, delta=c.level,
                               deferral_rate=c.deferral_rate)
    text = guarantee_text(c, ltt, len(s.x))
    record = calibration_record(
        rule, threshold, "budget" if ltt is None else "ltt", scores, s_pred, t_pred,
        guarantee=ltt,
        curves={name: cascade_curve(v, s_pred, t_pred) for name, v in all_scores.items()},
        requested=({"deferral_rate": c.deferral_rate} if ltt is None else
                   {"max_accuracy_loss": c.eps, "target_accuracy": None, "delta": c.level,
                    "bound": ltt["bound"]}),
        num_classes=probs.shape[1], student_outputs=probs.shape[1], n_rows=len(split.cal),
        student=storage.absolute(jd.student), teacher=storage.absolute(job.teacher.path),
        input=job.input, feature_columns=list(model_columns(job)), label_column=None,
        seed=job.seed, titans_label={"guarantee": text, "sample_rows": len(s.x)})
    save_calibration(jd.calibration, record)
    return {"rule": rule, "threshold": float(threshold), "deferral_rate": record["deferral_rate"],
            "certified": None if ltt is None else ltt["certified"], "guarantee_text": text,
            "calibration_disagreement": 1.0 - record["cascade_agreement_with_teacher"]}


def model_columns(job) -> tuple[str, ...]:
    """The columns the models read: the image column, the token column, or --feature-columns."""
    if job.image is not None:
        return (job.image.column,)
    return (job.tokens.column,) if job.tokens is not None else tuple(job.feature_columns)


__all__ = ["calibrate", "guarantee_text", "run"]

"""Choosing and judging the deferral threshold: arrays in, numbers out.

A row is *hard* (goes to the teacher) iff its deferral score > threshold, as in
``titans.models.deferral``. Three ways to look at a threshold:
  * ``cascade_curve``: cascade accuracy at every deferral rate (the budget view),
  * ``ltt_threshold``: the cheapest threshold whose accuracy loss is certified (Learn then Test),
  * ``binomial_interval``: a confidence interval for an audited agreement rate.

CAL.json (``calibration_to_bytes`` / ``calibration_from_bytes``; ``titans.transforms.io.models``
writes and reads the file) records the chosen rule and threshold::

    {"rule": "max_prob", "threshold": 0.12 | "-inf", "method": "budget" | "ltt",
     "deferral_rate": 0.2, "guarantee": {...ltt_threshold result...} | null,
     "curves": {"max_prob": {"deferral_rate": [...], "threshold": [...], "accuracy": [...], "auc": 0.98}},
     "deferral_model": "path/to/learned.json"          (only for rule "learned")}

JSON has no infinities, so -inf (defer every row) and +inf are written as the strings "-inf"
and "inf" wherever a number is expected, and read back as floats.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np

from titans.models.defaults import BOUND, BOUNDS, DELTA
from titans.models.deferral import threshold_for_rate

CAL_METHODS = ("budget", "ltt")
REQUIRED_KEYS = ("rule", "threshold", "method", "deferral_rate")


class CalibrationError(ValueError):
    """A calibration artifact is missing something or holds a value of the wrong kind."""


# --------------------------------------------------------------------------- curves

def cascade_curve(scores, student_pred, teacher_pred, labels=None,
                  rates=np.linspace(0.0, 1.0, 101)) -> dict:
    """Cascade accuracy at each target deferral rate: dict of lists + ``auc``.

    For each rate r the threshold is ``threshold_for_rate(scores, r)``; rows with score > threshold
    take the teacher's answer. ``deferral_rate`` is the realised share of such rows (ties can make
    it differ from r). ``accuracy`` is against ``labels`` when given, else agreement with the
    teacher. ``auc`` is the trapezoid area under accuracy vs realised deferral rate.
    """
    scores, student_pred, teacher_pred, labels = _check_arrays(scores, student_pred, teacher_pred, labels)
    truth = teacher_pred if labels is None else labels
    realised, thresholds, accuracy = [], [], []
    for r in np.asarray(rates, dtype=np.float64):
        t = threshold_for_rate(scores, float(r))
        hard = scores > t
        cascade = np.where(hard, teacher_pred, student_pred)
        realised.append(float(hard.mean()))
        thresholds.append(float(t))
        accuracy.append(float((cascade == truth).mean()))
    order = np.argsort(realised, kind="stable")  # realised rates grow with r; sort to be safe
    auc = float(np.trapezoid(np.asarray(accuracy)[order], np.asarray(realised)[order]))
    return {"deferral_rate": realised, "threshold": thresholds, "accuracy": accuracy, "auc": auc}


# --------------------------------------------------------------------------- Learn then Test

def ltt_threshold(scores, student_pred, teacher_pred, labels=None, *, max_accuracy_loss: float = 0.01,
                  delta: float = DELTA, target_accuracy: float | None = None,
                  bound: str = BOUND) -> dict:
    """The cheapest threshold whose risk is certified <= eps by Learn then Test (Angelopoulos et al. 2021).

    Candidates are -inf (defer every row) and every distinct score; a row is easy iff score <= t.
    Per-row loss (Bernoulli), and eps:
      no labels:        1[easy and student != teacher]                      eps = max_accuracy_loss
      labels:           1[easy and student wrong and teacher right]         eps = max_accuracy_loss
                        (an upper bound on the accuracy the cascade loses against the teacher)
      target_accuracy:  1[cascade wrong]  (needs labels)                    eps = 1 - target_accuracy
    Each candidate tests H0: risk(t) > eps with a p-value valid for Bernoulli losses, and
    fixed-sequence testing walks from -inf toward larger (cheaper) thresholds, stopping at the
    first p-value > delta. The largest rejected threshold is returned: with probability >= 1 - delta
    over the calibration draw its risk is <= eps. If -inf itself is not rejected, nothing is
    certified and the threshold is -inf (every row to the teacher).
    """
    scores, student_pred, teacher_pred, labels = _check_arrays(scores, student_pred, teacher_pred, labels)
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {BOUNDS}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if target_accuracy is not None:
        if labels is None:
            raise ValueError("target_accuracy needs labels: without them the cascade's accuracy is unknown")
        if not 0.0 < target_accuracy < 1.0:
            raise ValueError(f"target_accuracy must be in (0, 1), got {target_accuracy}")
        eps, mode = 1.0 - target_accuracy, "target_accuracy"
        loss_if_easy, loss_if_hard = student_pred != labels, teacher_pred != labels
    else:
        if not 0.0 < max_accuracy_loss < 1.0:
            raise ValueError(f"max_accuracy_loss must be in (0, 1), got {max_accuracy_loss}")
        eps = max_accuracy_loss
        mode = "loss_vs_teacher" if labels is None else "loss_vs_teacher_labels"
        loss_if_easy = (student_pred != teacher_pred) if labels is None else \
            (student_pred != labels) & (teacher_pred == labels)
        loss_if_hard = np.zeros_like(loss_if_easy)

    n = len(scores)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    thresholds = np.concatenate([[-np.inf], np.unique(sorted_scores)])  # ascending: safest first
    n_easy = np.searchsorted(sorted_scores, thresholds, side="right")   # rows with score <= t
    cum_easy = np.concatenate([[0], np.cumsum(loss_if_easy[order])])
    cum_hard = np.concatenate([[0], np.cumsum(loss_if_hard[order])])
    # losses among easy rows + losses among hard rows (those after the n_easy smallest scores)
    counts = cum_easy[n_easy] + (cum_hard[-1] - cum_hard[n_easy])
    p_values = _p_values(counts, n, eps, bound)

    not_rejected = np.flatnonzero(p_values > delta)
    last = (not_rejected[0] if not_rejected.size else len(thresholds)) - 1  # last rejected index
    certified = last >= 0
    j = max(last, 0)
    threshold = float(thresholds[j])
    result = {
        "threshold": threshold,
        "deferral_rate": float((scores > threshold).mean()),
        "risk": float(counts[j] / n),
        "p_value": float(p_values[j]),
        "eps": float(eps),
        "delta": float(delta),
        "n": int(n),
        "bound": bound,
        "mode": mode,
        "certified": bool(certified),
        "n_rejected": int(last + 1),
        "guarantee": _guarantee_text(mode, eps, delta, target_accuracy),
    }
    if not certified:
        result["guarantee"] = (
            f"nothing certified: even deferring every row did not pass the test with n={n}, "
            f"eps={eps:g}, delta={delta:g} (too few calibration rows, or the teacher alone misses the "
            f"target); the threshold is -inf, so every row goes to the teacher")
    return result


def _p_values(counts: np.ndarray, n: int, eps: float, bound: str) -> np.ndarray:
    """p-values for H0: risk > eps given `counts` losses in n Bernoulli draws."""
    from scipy import stats  # here, not at import: `titans run` never needs scipy.stats
    from scipy.special import xlogy

    # exact binomial tail: under H0 the count is stochastically >= Binom(n, eps)
    binom_tail = stats.binom.cdf(counts, n, eps)
    if bound == "binomial":
        return binom_tail
    # Hoeffding-Bentkus: min(exp(-n h(min(r, eps), eps)), e * P(Binom(n, eps) <= ceil(n r)));
    # n r is the integer count here, so the ceiling is the count itself.
    r = np.minimum(counts / n, eps)
    h = xlogy(r, r / eps) + xlogy(1.0 - r, (1.0 - r) / (1.0 - eps))
    return np.minimum(np.exp(-n * h), math.e * binom_tail)


def _guarantee_text(mode: str, eps: float, delta: float, target_accuracy: float | None) -> str:
    if mode == "loss_vs_teacher":
        what = f"the share of rows whose cascade label differs from the teacher's (accuracy loss vs the teacher) is <= {eps:g}"
    elif mode == "loss_vs_teacher_labels":
        what = (f"the share of rows the student gets wrong where the teacher is right "
                f"(an upper bound on the accuracy loss vs the teacher) is <= {eps:g}")
    else:
        what = f"the cascade's accuracy is >= {target_accuracy:g}"
    return (f"with probability >= {1 - delta:g} over the calibration draw, {what}, "
            f"assuming calibration and test rows are exchangeable")


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval for a proportion k/n, e.g. audited student-teacher agreement."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest  # here, not at import: only a report with audits needs it

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


# --------------------------------------------------------------------------- CAL.json

def calibration_record(rule: str, threshold: float, method: str, scores, student_pred,
                       teacher_pred, labels=None, *, guarantee: dict | None, curves: dict,
                       requested: dict, num_classes: int, student_outputs: int, n_rows: int,
                       n_fit_rows: int = 0, **about) -> dict:
    """The CAL.json record of an operating point chosen on calibration rows, the one way
    `titans calibrate` and `titans label` build it: the rule and threshold, how they were
    chosen (``method``, ``requested``, the Learn then Test ``guarantee``), the ``curves``,
    what the threshold does on those rows (their ``scores``, both models' predictions and the
    ``labels`` if any: deferral rate, cascade accuracy), and ``about``: where it comes from
    (student, teacher, input, feature_columns, label_column, seed, ...), kept as given."""
    scores, student_pred, teacher_pred, labels = _check_arrays(scores, student_pred,
                                                               teacher_pred, labels)
    hard = scores > threshold
    cascade = np.where(hard, teacher_pred, student_pred)
    truth = teacher_pred if labels is None else labels
    data = {"rule": rule, "threshold": float(threshold), "method": method,
            "deferral_rate": float(hard.mean()), "guarantee": guarantee, "curves": curves,
            "requested": requested, **about, "num_classes": int(num_classes),
            "student_outputs": int(student_outputs), "n_rows": int(n_rows),
            "n_fit_rows": int(n_fit_rows), "n_calibration_rows": int(len(scores)),
            "accuracy_reference": "labels" if labels is not None else "teacher",
            "cascade_accuracy": float((cascade == truth).mean()),
            "cascade_agreement_with_teacher": float((cascade == teacher_pred).mean())}
    if labels is not None:
        data["teacher_accuracy"] = float((teacher_pred == labels).mean())
        data["student_accuracy"] = float((student_pred == labels).mean())
    return data


def calibration_to_bytes(data: dict, where: str = "calibration") -> bytes:
    """Validate ``data`` and encode it as CAL.json (infinities as "-inf"/"inf"); ``where``
    (the file's path) names it in messages."""
    _validate(data, where=where)
    return (json.dumps(_encode(data), indent=2, allow_nan=False) + "\n").encode("utf-8")


def calibration_from_bytes(raw: bytes, where: str = "calibration") -> dict:
    """Decode and validate a CAL.json; the threshold comes back as a float (possibly -inf)."""
    try:
        data = _decode(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{where}: not valid JSON: {e}") from e
    _validate(data, where=where)
    return data


def _encode(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "-inf" if obj < 0 else "inf"
    if isinstance(obj, float) and math.isnan(obj):
        raise CalibrationError("calibration data holds NaN, which has no meaning as a threshold or rate")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return _encode(obj.item())
    return obj


def _decode(obj):
    if obj == "-inf" or obj == "inf":
        return float(obj)
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and not math.isnan(x)


def _validate(data, where: str) -> None:
    if not isinstance(data, dict):
        raise CalibrationError(f"{where}: calibration must be a JSON object, got {type(data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise CalibrationError(f"{where}: missing key {key!r} (CAL.json needs {', '.join(REQUIRED_KEYS)})")
    if not isinstance(data["rule"], str) or not data["rule"]:
        raise CalibrationError(f"{where}: 'rule' must be a rule name, got {data['rule']!r}")
    if not _is_number(data["threshold"]):
        raise CalibrationError(f"{where}: 'threshold' must be a number or \"-inf\", got {data['threshold']!r}")
    if data["method"] not in CAL_METHODS:
        raise CalibrationError(f"{where}: 'method' must be one of {CAL_METHODS}, got {data['method']!r}")
    rate = data["deferral_rate"]
    if not _is_number(rate) or not 0.0 <= rate <= 1.0:
        raise CalibrationError(f"{where}: 'deferral_rate' must be a number in [0, 1], got {rate!r}")
    guarantee = data.get("guarantee")
    if guarantee is not None and not isinstance(guarantee, dict):
        raise CalibrationError(f"{where}: 'guarantee' must be an object (an ltt_threshold result) or null")
    if data["method"] == "ltt" and guarantee is None:
        raise CalibrationError(f"{where}: method 'ltt' needs its 'guarantee' (the ltt_threshold result)")
    if data["rule"] == "learned" and not isinstance(data.get("deferral_model"), str):
        raise CalibrationError(f"{where}: rule 'learned' needs 'deferral_model', the path of its trained model")
    curves = data.get("curves", {})
    if not isinstance(curves, dict):
        raise CalibrationError(f"{where}: 'curves' must map rule names to curves")
    for rule, curve in curves.items():
        keys = ("deferral_rate", "threshold", "accuracy")
        if not isinstance(curve, dict) or any(not isinstance(curve.get(k), list) for k in keys):
            raise CalibrationError(f"{where}: curve {rule!r} needs lists {', '.join(keys)}")
        if len({len(curve[k]) for k in keys}) != 1:
            raise CalibrationError(f"{where}: curve {rule!r} has lists of different lengths")


def _check_arrays(scores, student_pred, teacher_pred, labels):
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-d array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    arrays = [np.asarray(student_pred), np.asarray(teacher_pred)]
    if labels is not None:
        arrays.append(np.asarray(labels))
    for name, a in zip(("student_pred", "teacher_pred", "labels"), arrays):
        if a.shape != scores.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {scores.shape} like scores")
    return scores, arrays[0], arrays[1], (arrays[2] if labels is not None else None)


# --------------------------------------------------------------------------- plots

def plot_curves(curves: dict, fmt: str = "png", operating_point: tuple | None = None,
                teacher_accuracy: float | None = None, student_accuracy: float | None = None,
                title: str = "Cascade accuracy vs deferral rate") -> bytes:
    """Accuracy vs deferral for each rule, operating point and references marked, as the bytes
    of an image file in ``fmt`` ("png", "svg", ...; ``titans.transforms.io.models.save_plot``
    picks it from the path's extension and writes the file).

    ``operating_point`` is (deferral_rate, accuracy, label).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, works headless

    fig = Figure(figsize=(6, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for rule, curve in curves.items():
        auc = curve.get("auc")
        label = rule if auc is None else f"{rule} (AUC {auc:.4f})"
        ax.plot(curve["deferral_rate"], curve["accuracy"], label=label, lw=1.5)
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="k", ls="--", lw=1, label=f"teacher alone {teacher_accuracy:.4f}")
    if student_accuracy is not None:
        ax.axhline(student_accuracy, color="grey", ls=":", lw=1, label=f"student alone {student_accuracy:.4f}")
    if operating_point is not None:
        rate, acc, label = operating_point
        ax.plot([rate], [acc], "r*", ms=12, label=label)
    ax.set_xlabel("deferral rate (share of rows sent to the teacher)")
    ax.set_ylabel("cascade accuracy")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    return buf.getvalue()

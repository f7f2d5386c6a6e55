"""Curves by hand, Learn-then-Test against the binomial and a known population, CAL.json round trips."""
import json
import math

import numpy as np
import pytest

from titans.models.calibration import (CalibrationError, binomial_interval, calibration_from_bytes,
                                       calibration_to_bytes, cascade_curve, ltt_threshold,
                                       plot_curves)
from titans.transforms.io.models import load_calibration, save_calibration, save_plot


def binom_cdf(k, n, p):
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))


# ------------------------------------------------------------------ curves

TOY = dict(scores=[0.1, 0.2, 0.3, 0.4], student_pred=[0, 0, 1, 1], teacher_pred=[0, 1, 1, 0])


def test_cascade_curve_by_hand_with_labels():
    c = cascade_curve(**TOY, labels=[0, 1, 1, 1], rates=[0.0, 0.25, 0.5, 1.0])
    # rate .25: threshold 0.3, row 4 deferred -> [0,0,1,0] vs [0,1,1,1]: 2/4
    assert c["deferral_rate"] == [0.0, 0.25, 0.5, 1.0]
    assert c["threshold"] == [0.4, 0.3, 0.2, -math.inf]
    assert c["accuracy"] == [0.75, 0.5, 0.5, 0.75]
    assert c["auc"] == pytest.approx(0.25 * 0.625 + 0.25 * 0.5 + 0.5 * 0.625)


def test_cascade_curve_without_labels_is_agreement_with_teacher():
    c = cascade_curve(**TOY, rates=[0.0, 0.25, 0.5, 1.0])
    assert c["accuracy"] == [0.5, 0.75, 0.75, 1.0]


def test_cascade_curve_reports_realised_rate_under_ties():
    c = cascade_curve([0.5] * 4, [0, 0, 0, 0], [1, 1, 1, 1], rates=[0.0, 0.5, 1.0])
    # every score ties, so a 50% target defers nobody (strictly-above rule) until the rate is 1
    assert c["deferral_rate"] == [0.0, 0.0, 1.0]
    assert c["accuracy"] == [0.0, 0.0, 1.0]
    assert c["auc"] == pytest.approx(0.5)


def test_cascade_curve_validates_shapes():
    with pytest.raises(ValueError, match="teacher_pred has shape"):
        cascade_curve([0.1, 0.2], [0, 1], [0])


# ------------------------------------------------------------------ Learn then Test

def ltt_case(n=100, bad_ranks=(10, 20, 30)):
    """Distinct scores 0..n-1; the student disagrees with the teacher exactly at ``bad_ranks``."""
    scores = np.arange(n, dtype=float)
    teacher = np.zeros(n, dtype=int)
    student = teacher.copy()
    student[list(bad_ranks)] = 1
    return scores, student, teacher


def test_ltt_binomial_p_value_decides_by_hand():
    scores, student, teacher = ltt_case()
    # thresholds <= 9: 0 losses; 10..19: 1 loss; 20..: 2+ losses. P(Bin(100,.05) <= 1) = .037,
    # P(<= 2) = .118: at delta = .1 the sequence rejects up to 19 and stops at 20.
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.05, delta=0.1)
    assert r["threshold"] == 19.0
    assert r["deferral_rate"] == pytest.approx(0.8)
    assert r["risk"] == pytest.approx(0.01)
    assert r["p_value"] == pytest.approx(binom_cdf(1, 100, 0.05), rel=1e-9)
    assert r["certified"] and r["n"] == 100 and r["bound"] == "binomial"
    assert "1 - delta" not in r["guarantee"] and "0.9" in r["guarantee"]
    assert "exchangeable" in r["guarantee"]
    # a stricter delta (below .037) stops one step earlier
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.05, delta=0.03)
    assert r["threshold"] == 9.0 and r["deferral_rate"] == pytest.approx(0.9) and r["risk"] == 0.0


def test_ltt_with_labels_counts_only_losses_the_teacher_would_have_avoided():
    scores, student, teacher = ltt_case()
    labels = teacher.copy()
    labels[10] = 1  # row 10: student right, teacher wrong -> no loss from keeping it easy
    r = ltt_threshold(scores, student, teacher, labels, max_accuracy_loss=0.05, delta=0.1)
    assert r["threshold"] == 29.0 and r["mode"] == "loss_vs_teacher_labels"


def test_ltt_fixed_sequence_stops_at_first_non_rejection():
    # target accuracy: the risk (cascade error) is not monotone. Teacher wrong on row 60 only,
    # student wrong on row 10 only: 1 error up to t = 9 (p = .037), 2 errors for 10..59
    # (p = .118, not rejected), then 1 error again from 60 on, where the cheaper thresholds lie.
    n = 100
    scores = np.arange(n, dtype=float)
    labels = np.zeros(n, dtype=int)
    teacher, student = labels.copy(), labels.copy()
    teacher[60] = 1
    student[10] = 1
    r = ltt_threshold(scores, student, teacher, labels, target_accuracy=0.95, delta=0.1)
    assert r["threshold"] == 9.0, "must stop at the first non-rejection, not jump to t >= 60"
    assert r["n_rejected"] == 11 and r["risk"] == pytest.approx(0.01) and r["mode"] == "target_accuracy"
    assert "accuracy is >= 0.95" in r["guarantee"]
    teacher[61:63] = 1  # now the teacher alone makes 3 errors: p = .26, even -inf fails
    r = ltt_threshold(scores, student, teacher, labels, target_accuracy=0.95, delta=0.1)
    assert not r["certified"] and r["threshold"] == -math.inf and r["deferral_rate"] == 1.0
    assert r["n_rejected"] == 0 and "nothing certified" in r["guarantee"]


def test_ltt_nothing_rejected_with_too_few_rows():
    scores, student, teacher = ltt_case(n=20, bad_ranks=())
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.01, delta=0.1)
    # .99^20 = .82 > .1: even "defer everything" is not certified
    assert r["threshold"] == -math.inf and not r["certified"] and r["deferral_rate"] == 1.0
    assert r["p_value"] == pytest.approx(0.99 ** 20)


def test_hoeffding_bentkus_by_hand_and_never_looser_than_binomial():
    scores, student, teacher = ltt_case()
    # one loss in 100: h(.01, .05) = .01 log(.01/.05) + .99 log(.99/.95)
    h = 0.01 * math.log(0.2) + 0.99 * math.log(0.99 / 0.95)
    p1 = min(math.exp(-100 * h), math.e * binom_cdf(1, 100, 0.05))
    assert binom_cdf(1, 100, 0.05) < 0.05 < p1  # delta = .05 separates the two bounds
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.05, delta=0.05, bound="hoeffding_bentkus")
    # zero losses: Hoeffding gives exp(-100 log(1/.95)) = .95^100, below e * P(Bin <= 0)
    assert r["threshold"] == 9.0 and r["p_value"] == pytest.approx(0.95 ** 100, rel=1e-9)
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.05, delta=0.05)
    assert r["threshold"] == 19.0  # the exact binomial tail certifies one step more
    r = ltt_threshold(scores, student, teacher, max_accuracy_loss=0.05, delta=0.09, bound="hoeffding_bentkus")
    assert r["threshold"] == 19.0 and r["p_value"] == pytest.approx(p1, rel=1e-9)


def test_ltt_violation_rate_is_at_most_delta_on_a_known_population():
    """Scores ~ U(0,1), P(student != teacher | s) = 0.2 s, so risk(t) = 0.1 t^2 exactly.

    With eps = 0.05 the true safe set is t <= sqrt(0.5). Over many calibration draws, the chosen
    threshold must be unsafe at most delta of the time; a naive "largest t with empirical risk
    <= eps" (no test) is shown to fail, so the check has teeth.
    """
    rng = np.random.default_rng(0)
    eps, delta, n, draws = 0.05, 0.1, 200, 1000
    risk = lambda t: 0.0 if t == -np.inf else 0.1 * min(t, 1.0) ** 2  # noqa: E731
    violations = naive_violations = 0
    chosen = []
    for _ in range(draws):
        s = rng.random(n)
        disagree = rng.random(n) < 0.2 * s
        r = ltt_threshold(s, disagree.astype(int), np.zeros(n, dtype=int), max_accuracy_loss=eps, delta=delta)
        violations += risk(r["threshold"]) > eps
        chosen.append(max(r["threshold"], 0.0))
        order = np.argsort(s)
        emp = np.cumsum(disagree[order]) / n
        naive_t = s[order][np.flatnonzero(emp <= eps)[-1]]
        naive_violations += risk(naive_t) > eps
    assert violations / draws <= delta + 0.02  # 0.02 ~ 2 binomial std of the frequency estimate
    assert naive_violations / draws > 0.3      # without the test the guarantee fails
    assert np.mean(chosen) > 0.4               # and the test is not vacuous: it certifies a lot


def test_ltt_validates_arguments():
    scores, student, teacher = ltt_case()
    with pytest.raises(ValueError, match="needs labels"):
        ltt_threshold(scores, student, teacher, target_accuracy=0.9)
    with pytest.raises(ValueError, match="unknown bound"):
        ltt_threshold(scores, student, teacher, bound="chernoff")
    with pytest.raises(ValueError, match="delta"):
        ltt_threshold(scores, student, teacher, delta=0.0)


# ------------------------------------------------------------------ intervals

def test_clopper_pearson_interval():
    lo, hi = binomial_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    lo, hi = binomial_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    lo, hi = binomial_interval(5, 10, confidence=0.9)
    assert lo == pytest.approx(1 - hi) and lo < 0.5 < hi
    # the lower end is where P(Bin(10, lo) >= 5) = 0.05
    assert 1 - binom_cdf(4, 10, lo) == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError):
        binomial_interval(11, 10)


@pytest.mark.parametrize("k, n, lo, hi", [
    # exact 95% intervals, 4 decimals, as tabulated: 81/263 is Newcombe (1998)'s example
    # (method 5, "exact"); k = 0 and k = n have the closed forms 1 - 0.025^(1/n), 0.025^(1/n)
    (0, 10, 0.0, 0.3085),
    (1, 10, 0.0025, 0.4450),
    (5, 10, 0.1871, 0.8129),
    (81, 263, 0.2527, 0.3676),
    (29, 29, 0.8806, 1.0),
])
def test_clopper_pearson_matches_published_values(k, n, lo, hi):
    got = binomial_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)
    assert binomial_interval(0, 0) == (0.0, 1.0)


# ------------------------------------------------------------------ CAL.json

def cal_data():
    curve = cascade_curve(**TOY, rates=[0.0, 0.5, 1.0])
    return {"rule": "max_prob", "threshold": -math.inf, "method": "ltt", "deferral_rate": 1.0,
            "guarantee": {"threshold": -math.inf, "eps": 0.01, "delta": 0.1, "certified": False},
            "curves": {"max_prob": curve}}


def test_cal_json_round_trips_including_minus_inf(tmp_path):
    path = str(tmp_path / "CAL.json")
    data = cal_data()
    save_calibration(path, data)
    raw = json.loads(open(path).read())  # strict JSON: no bare -Infinity
    assert raw["threshold"] == "-inf" and raw["curves"]["max_prob"]["threshold"][-1] == "-inf"
    back = load_calibration(path)
    assert back == data
    assert back["threshold"] == -math.inf and isinstance(back["threshold"], float)
    data.update(threshold=0.25, method="budget", guarantee=None, deferral_rate=0.2)
    save_calibration(path, data)
    assert load_calibration(path)["threshold"] == 0.25


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("threshold"), "missing key 'threshold'"),
    (lambda d: d.update(method="guess"), "'method' must be one of"),
    (lambda d: d.update(deferral_rate=1.5), "'deferral_rate' must be a number in"),
    (lambda d: d.update(threshold="high"), "'threshold' must be a number"),
    (lambda d: d.update(rule="learned"), "needs 'deferral_model'"),
    (lambda d: d.update(guarantee=None), "method 'ltt' needs its 'guarantee'"),
])
def test_load_calibration_says_what_is_wrong(tmp_path, change, message):
    data = json.loads(json.dumps(cal_data(), default=str).replace("-Infinity", '"-inf"'))
    change(data)
    path = tmp_path / "CAL.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=message):
        load_calibration(str(path))


def test_load_calibration_rejects_non_json(tmp_path):
    path = tmp_path / "CAL.json"
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(str(path))


def test_cal_json_as_bytes_names_its_source():
    data = cal_data()
    assert calibration_from_bytes(calibration_to_bytes(data)) == data
    with pytest.raises(CalibrationError, match="^upload: not valid JSON"):
        calibration_from_bytes(b"{not json", where="upload")
    with pytest.raises(CalibrationError, match="^record: missing key 'rule'"):
        calibration_to_bytes({"threshold": 0.1}, where="record")


def test_load_calibration_says_when_the_file_cannot_be_read(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_calibration(str(tmp_path / "missing.json"))


def test_learned_rule_calibration_keeps_its_model_path(tmp_path):
    data = dict(cal_data(), rule="learned", deferral_model="gs://bucket/learned.json")
    save_calibration(str(tmp_path / "CAL.json"), data)
    assert load_calibration(str(tmp_path / "CAL.json"))["deferral_model"] == "gs://bucket/learned.json"


def test_plot_curves_writes_png(tmp_path):
    curves = {"max_prob": cascade_curve(**TOY, labels=[0, 1, 1, 1]),
              "margin": cascade_curve(**TOY, labels=[0, 1, 1, 0])}
    path = tmp_path / "curves.png"
    save_plot(str(path), curves, operating_point=(0.25, 0.5, "LTT"), teacher_accuracy=0.75,
              student_accuracy=0.75)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_curves(curves, "svg")  # bytes, in the format asked for; no file
    assert b"<svg" in svg[:1000]
    save_plot(str(tmp_path / "curves.svg"), curves)
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:1000]

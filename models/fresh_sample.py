"""How big a warm run's fresh sample is (`titans label --state`): the rows of today the teacher
labels first, split into calibration, validation and fine-tune parts. Numpy and scipy only.

A warm run still calibrates on today's rows only (the guarantee is about today's rows;
yesterday's are not exchangeable with them), but it needs no large training share: the student
already exists. Every sampled row costs a teacher call, and so does every row the cascade then
defers; a larger calibration part lets Learn then Test certify a higher disagreement bar, so
fewer rows are deferred. ``fresh_sample_sizes`` picks the calibration part that minimises the
expected teacher rows of the whole run, predicted from yesterday's student on yesterday's
held-out rows (``expected_deferral``), between the fewest rows at which LTT allows one
disagreement (``MIN_K``) and the cold start's sample. Without held-out rows to predict from
(an empty pool), it takes the fewest rows that certify a bar of ``CAL_BAR`` x EPS. Validation
and fine-tune parts are fractions of the calibration part.

Why a prediction and not a fixed bar: the best size depends on the rows of the day. On
benchmarks/continual.py (12,000 rows a day, EPS 0.01, delta 0.1), day 5's student, 200 draws
of the calibration rows each: 925 calibration rows (the fixed bar of EPS/2) deferred 6.2% of
the other rows, for a teacher share of 19.2%; 500 rows deferred 7.5%, for 14.5%. On 1M rows a
day the same sample is 0.2% of the rows and the bar's deferral dominates: larger parts pay.
"""
from __future__ import annotations

import math

import numpy as np

CAL_BAR = 0.5            # without a prediction: a bar of at least this share of EPS
VAL_SHARE = 0.3          # validation rows (champion/challenger, rule) per calibration row
TRAIN_SHARE = 0.5        # today's fine-tune rows per calibration row
MIN_CAL, MIN_VAL = 200, 100
RATE_CAL = 1000          # calibration rows for a --deferral-rate budget (a quantile, no bar)
GRID_STEP = 1.1          # calibration sizes tried: a geometric grid with this ratio
# at least enough calibration rows for LTT to allow this many disagreements among the kept
# ones (388 rows at EPS 0.01, delta 0.1; 0 disagreements: 230). At 0 the threshold stops below
# the lowest-scoring disagreement of the draw, and how low today's go is the part of the
# prediction that yesterday's few held-out disagreements say least about. benchmarks/
# continual.py, day 5 from the state after it, 8 sample draws: 230 rows 13.3% of the rows to
# the teacher (9.1-19.7%), 388 rows 13.1% (9.9-14.7%), 540 rows 14.6% (11.4-20.5%)
MIN_K = 1


def ltt_count(n_cal: int, eps: float, delta: float) -> int:
    """The most disagreements among the kept calibration rows that Learn then Test certifies
    on ``n_cal`` rows (``ltt_bar`` x n_cal); -1 when not even 0 does."""
    from titans.models.student_search import ltt_bar

    bar = ltt_bar(n_cal, eps, delta)
    return -1 if bar < 0 else int(round(bar * n_cal))


def expected_deferral(scores: np.ndarray, disagree: np.ndarray, n_cal: int, eps: float,
                      delta: float) -> float:
    """The expected share of rows a threshold calibrated by LTT on ``n_cal`` rows defers, for
    rows like ``scores`` / ``disagree`` (a student's deferral scores and whether it disagrees
    with the teacher, on rows it was not trained on).

    LTT walks the thresholds upward and stops before the (k+1)-th disagreement among the
    calibration rows (k = ``ltt_count``). A row of score s is deferred when more than k of the
    n_cal calibration rows disagree and score <= s: Binomial(n_cal, F(s)) > k, F(s) the share
    of rows that disagree and score <= s. The mean of that probability over the rows is the
    expected deferral (exact for a calibration draw from these rows, ties aside)."""
    from scipy.stats import binom

    k = ltt_count(n_cal, eps, delta)
    scores = np.asarray(scores, dtype=np.float64)
    if k < 0 or scores.size == 0:
        return 1.0
    order = np.argsort(scores, kind="stable")
    s, d = scores[order], np.asarray(disagree, bool)[order]
    # F at each row's score, ties included (every row of that score counts)
    last = np.searchsorted(s, s, side="right") - 1
    f = np.cumsum(d)[last] / s.size
    return float(binom.sf(k, n_cal, f).mean())


def _parts(n_cal: int) -> tuple[int, int, int]:
    n_val = max(MIN_VAL, int(round(VAL_SHARE * n_cal)))
    return n_cal, n_val, int(round(TRAIN_SHARE * n_cal))


def cheapest_calibration(rows: int, eps: float, delta: float, cap: int, scores: np.ndarray,
                         disagree: np.ndarray) -> tuple[int, float]:
    """(calibration rows, expected deferral) minimising the expected teacher rows of a run on
    ``rows`` rows: the fresh sample (all three parts) plus the deferred share of the rest,
    over a geometric grid from the fewest rows at which LTT allows MIN_K disagreements to
    the ``cap``."""
    lo = max(MIN_CAL, fewest_rows(MIN_K, eps, delta))
    best = None
    n = lo
    while True:
        total = sum(_parts(n))
        if total > cap and n > lo:
            break
        deferral = expected_deferral(scores, disagree, n, eps, delta)
        cost = total + max(0, rows - total) * deferral
        if best is None or cost < best[0]:
            best = (cost, n, deferral)
        n = int(math.ceil(n * GRID_STEP))
    return best[1], best[2]


def fewest_rows(k: int, eps: float, delta: float) -> int:
    """The fewest calibration rows on which LTT certifies a threshold with ``k`` disagreements
    among the kept rows: binom.cdf(k, n, eps) <= delta (it falls as n grows; bisection)."""
    from scipy.stats import binom

    lo, hi = k + 1, k + 2
    while binom.cdf(k, hi, eps) > delta:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if binom.cdf(k, mid, eps) <= delta:
            hi = mid
        else:
            lo = mid + 1
    return lo


def calibration_rows_needed(eps: float, delta: float, cap: int = 200_000) -> int:
    """The fewest calibration rows n with ``ltt_bar(n, eps, delta) >= CAL_BAR * eps``
    (bisection; ltt_bar grows with n up to the rounding of k/n)."""
    from titans.models.student_search import ltt_bar

    want = CAL_BAR * eps
    lo, hi = 1, max(2, int(math.ceil(10.0 / eps)))
    while ltt_bar(hi, eps, delta) < want and hi < cap:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        # the bar is not monotone in n row by row (k/n steps): ask for it at mid and mid+1..+3
        if max(ltt_bar(m, eps, delta) for m in range(mid, mid + 4)) >= want:
            hi = mid
        else:
            lo = mid + 1
    return max(MIN_CAL, lo + 3)


def fresh_sample_sizes(rows: int, eps: float | None, delta: float, cap: int,
                       heldout: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """{"cal", "val", "train", "total", "predicted_deferral"} of a warm run's fresh sample on
    ``rows`` input rows, at most ``cap`` rows in all (the cold start's sample). ``heldout``:
    (deferral scores, disagreement) of yesterday's student on rows it was not trained on, from
    which the calibration part is chosen (``cheapest_calibration``); None: the CAL_BAR rule."""
    predicted = None
    if eps is None:
        n_cal = RATE_CAL
    elif heldout is not None and len(heldout[0]):
        n_cal, predicted = cheapest_calibration(rows, eps, delta, cap, *heldout)
    else:
        n_cal = calibration_rows_needed(eps, delta)
    n_cal, n_val, n_train = _parts(n_cal)
    total = n_cal + n_val + n_train
    if total > cap:  # a small input: the cold start's sample, in the same proportions
        scale = cap / total
        n_cal, n_val = int(n_cal * scale), int(n_val * scale)
        n_train = cap - n_cal - n_val
        total = cap
    return {"cal": n_cal, "val": n_val, "train": n_train, "total": total,
            "predicted_deferral": predicted}


def split_fresh(n: int, sizes: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded split of the ``n`` labeled fresh rows into train / val / cal in the proportions of
    ``sizes`` (fewer labeled rows than drawn shrink each part alike); sorted indices."""
    perm = np.random.default_rng([seed, 3]).permutation(n)
    drawn = max(1, sizes["total"])
    n_cal = int(round(sizes["cal"] * n / drawn))
    n_val = int(round(sizes["val"] * n / drawn))
    return {"cal": np.sort(perm[:n_cal]), "val": np.sort(perm[n_cal:n_cal + n_val]),
            "train": np.sort(perm[n_cal + n_val:])}


__all__ = ["fresh_sample_sizes", "cheapest_calibration", "expected_deferral", "ltt_count",
           "fewest_rows", "calibration_rows_needed", "split_fresh", "CAL_BAR", "MIN_K"]

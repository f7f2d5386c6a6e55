"""models/fresh_sample.py: a warm run's fresh sample, sized for the fewest expected teacher
rows (numpy and scipy only; no Beam, no torch)."""
import numpy as np
import pytest

from titans.models import fresh_sample as fs
from titans.models.calibration import ltt_threshold
from titans.models.student_search import ltt_bar

EPS, DELTA = 0.01, 0.1


def _rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A student's deferral scores and disagreement: ~3% disagree, mostly at high scores."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    return scores, rng.random(n) < 0.08 * scores ** 3


def test_fallback_without_a_prediction_certifies_half_eps_and_is_smaller_than_a_cold_start():
    sizes = fs.fresh_sample_sizes(12_000, EPS, DELTA, cap=5_000)
    assert sizes["total"] == sizes["cal"] + sizes["val"] + sizes["train"] < 5_000 / 2
    assert sizes["predicted_deferral"] is None
    assert ltt_bar(sizes["cal"], EPS, DELTA) >= fs.CAL_BAR * EPS  # LTT can certify EPS/2
    assert ltt_bar(sizes["cal"] - 100, EPS, DELTA) < fs.CAL_BAR * EPS  # and not far fewer
    small = fs.fresh_sample_sizes(1_000, EPS, DELTA, cap=500)  # a small input: the cap
    assert small["total"] == 500 and small["cal"] > small["val"] > 0


def test_ltt_count_and_fewest_rows_agree_with_the_closed_form():
    # LTT certifies anything once (1 - eps)^n <= delta: 230 rows at eps 0.01, delta 0.1
    assert fs.ltt_count(229, EPS, DELTA) == -1 and fs.ltt_count(230, EPS, DELTA) == 0
    assert fs.ltt_count(925, EPS, DELTA) == 4  # ltt_bar x n
    assert fs.fewest_rows(0, EPS, DELTA) == 230 == int(np.ceil(np.log(DELTA) / np.log1p(-EPS)))
    for k in (1, 2, 5):  # the first n at which k disagreements pass, by ltt_count
        n = fs.fewest_rows(k, EPS, DELTA)
        assert fs.ltt_count(n, EPS, DELTA) >= k > fs.ltt_count(n - 1, EPS, DELTA)


@pytest.mark.parametrize("n_cal", [230, 500, 925])
def test_expected_deferral_is_what_ltt_defers_on_average(n_cal):
    scores, disagree = _rows(20_000)
    predicted = fs.expected_deferral(scores, disagree, n_cal, EPS, DELTA)
    rng = np.random.default_rng(1)
    seen = []
    for _ in range(300):  # calibrate as the cascade does, on n_cal rows drawn from the same rows
        cal = rng.choice(scores.size, n_cal, replace=False)
        t = ltt_threshold(scores[cal], disagree[cal].astype(int), np.zeros(n_cal, int),
                          max_accuracy_loss=EPS, delta=DELTA)["threshold"]
        seen.append((scores > t).mean())
    seen = np.asarray(seen)
    assert abs(predicted - seen.mean()) < 3 * seen.std() / np.sqrt(seen.size) + 0.003
    assert 0.0 < predicted < 1.0


def test_a_small_day_takes_few_calibration_rows_and_a_large_day_more():
    heldout = _rows(1_500)
    small = fs.fresh_sample_sizes(12_000, EPS, DELTA, 5_000, heldout)
    large = fs.fresh_sample_sizes(1_000_000, EPS, DELTA, 20_000, heldout)
    fixed = fs.fresh_sample_sizes(12_000, EPS, DELTA, 5_000)
    assert small["cal"] < fixed["cal"] < large["cal"]
    assert small["predicted_deferral"] > large["predicted_deferral"] > 0
    # no other size (within the cap) is expected to cost noticeably less (the grid's step is 10%)
    def cost(rows, n):
        total = sum(fs._parts(n))
        return total + (rows - total) * fs.expected_deferral(*heldout, n, EPS, DELTA)
    for rows, sizes, cap in ((12_000, small, 5_000), (1_000_000, large, 20_000)):
        lo = fs.fewest_rows(fs.MIN_K, EPS, DELTA)
        assert sizes["cal"] >= lo
        others = [cost(rows, n) for n in range(lo, 12_000, 37) if sum(fs._parts(n)) <= cap]
        assert cost(rows, sizes["cal"]) <= 1.01 * min(others)
    assert small["total"] == small["cal"] + small["val"] + small["train"] <= 5_000

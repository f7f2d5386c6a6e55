import math

import numpy as np
import pytest
import torch

from titans.models.deferral import RULES, make_rule, normalised_entropy, threshold_for_rate
from titans.pipeline.defaults import RULE, RULE_NAMES


def probs_to_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float32))


@pytest.mark.parametrize("rule,expected", [
    ("max_prob", [1 - 0.7, 1 - 0.4]),
    ("margin", [1 - (0.7 - 0.2), 1 - (0.4 - 0.35)]),
    ("entropy", [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3),
                 -(0.4 * math.log(0.4) + 0.35 * math.log(0.35) + 0.25 * math.log(0.25)) / math.log(3)]),
])
def test_confidence_rules_by_hand(rule, expected):
    probs, score = make_rule(rule)(probs_to_logits([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    assert torch.allclose(probs, torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]), atol=1e-6)
    assert score.tolist() == pytest.approx(expected, abs=1e-6)
    assert score[1] > score[0]  # the less certain row is the harder one


def test_defer_head_uses_last_output():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]))
    probs, score = make_rule("defer_head")(logits)
    assert score.tolist() == pytest.approx([0.1, 0.8], abs=1e-6)
    assert torch.allclose(probs, torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]), atol=1e-6)


def test_unknown_rule_and_learned_without_model():
    with pytest.raises(ValueError, match="unknown deferral rule"):
        make_rule("coin_flip")
    with pytest.raises(ValueError, match="--deferral-model"):
        make_rule("learned")


def test_threshold_for_rate_counts_exactly_without_ties():
    scores = np.arange(1000) / 1000.0
    for rate in (0.0, 0.05, 0.2, 0.5, 0.999):
        t = threshold_for_rate(scores, rate)
        assert (scores > t).sum() == round(1000 * rate)
    assert threshold_for_rate(scores, 1.0) == float("-inf")
    with pytest.raises(ValueError):
        threshold_for_rate(scores, 1.5)


def test_the_command_line_knows_every_rule():
    assert set(RULE_NAMES) == set(RULES) | {"learned"} and RULE in RULE_NAMES


def test_normalised_entropy_treats_zero_probabilities_as_zero():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    assert normalised_entropy(p).tolist() == pytest.approx([0.5, 0.0, 1.0], abs=1e-7)
    assert normalised_entropy(torch.ones(3, 1)).tolist() == [0.0, 0.0, 0.0]  # K = 1

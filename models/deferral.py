"""Deferral rules: student logits -> (class probabilities, deferral score).

A higher score means "more likely to need the teacher"; a row is *hard* when its
score is strictly above the threshold. Every rule has the same shape (one class,
one ``__call__``), so adding a rule is adding one class to ``RULES``.

All built-in scores lie in [0, 1]:
  max_prob:   1 - max_k p_k
  margin:     1 - (p_top1 - p_top2)
  entropy:    -sum_k p_k log p_k / log K          (normalised so 1 = uniform)
  defer_head: p_defer, the softmax mass on the extra (K+1-th) output of a
              student trained with ``--method defer``
  learned:    P(student is wrong | its probabilities) from a small post-hoc model
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

# the base every rule shares, kept where learned_deferral can import it too (one way)
from titans.models.deferral_base import DeferralRule, normalised_entropy, softmax

if TYPE_CHECKING:
    from titans.models.learned_deferral import LearnedDeferral


class MaxProb(DeferralRule):
    name = "max_prob"

    def score(self, probs):
        return 1.0 - probs.max(dim=-1).values


class Margin(DeferralRule):
    name = "margin"

    def score(self, probs):
        if probs.shape[-1] < 2:
            return torch.zeros(probs.shape[0])
        # the top two by max, mask, max: half the time of topk(2) on [65,536 x 10]
        top, where = probs.max(dim=-1)
        second = probs.scatter(-1, where.unsqueeze(-1), -1.0).amax(dim=-1)
        return 1.0 - (top - second)


class Entropy(DeferralRule):
    name = "entropy"

    def score(self, probs):
        return normalised_entropy(probs)


class DeferHead(DeferralRule):
    """For K+1-output students (learning to defer): the last output means 'ask the teacher'."""
    name = "defer_head"
    extra_outputs = 1

    def __call__(self, logits):
        logits = logits.float()
        p_defer = softmax(logits)[:, -1]
        return softmax(logits[:, :-1]), p_defer


RULES: dict[str, type[DeferralRule]] = {
    r.name: r for r in (MaxProb, Margin, Entropy, DeferHead)
}
CONFIDENCE_RULES = ("max_prob", "margin", "entropy")


def make_rule(name: str, learned_model: "LearnedDeferral | bytes | None" = None) -> DeferralRule:
    """The rule called ``name``; ``learned`` needs its trained model: the LearnedDeferral or
    its bytes (``titans.transforms.io.models.load_learned_deferral`` reads the file)."""
    if name == "learned":
        from titans.models.learned_deferral import LearnedDeferral  # only when asked for

        if learned_model is None or learned_model == b"":
            raise ValueError("rule 'learned' needs a trained deferral model (--deferral-model PATH)")
        if isinstance(learned_model, (bytes, bytearray)):
            return LearnedDeferral.from_bytes(bytes(learned_model))
        if not isinstance(learned_model, LearnedDeferral):
            raise TypeError(f"rule 'learned' takes the trained LearnedDeferral or its bytes, not "
                            f"{type(learned_model).__name__} (read a path with "
                            "titans.transforms.io.models.load_learned_deferral)")
        return learned_model
    if name not in RULES:
        raise ValueError(f"unknown deferral rule {name!r}; choose one of {sorted(RULES) + ['learned']}")
    return RULES[name]()


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """Threshold t such that round(rate * n) of ``scores`` are > t (fewer when scores tie at t).

    This is the (1 - rate) quantile, taken as an observed score so that the count is exact.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"deferral rate must be in [0, 1], got {rate}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("cannot set a threshold from zero scores")
    n_hard = int(round(rate * scores.size))
    if n_hard >= scores.size:
        return float("-inf")
    return float(scores[scores.size - n_hard - 1])

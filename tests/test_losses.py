"""Losses against numbers worked out with plain math on tiny tensors."""
import math

import pytest
import torch

from titans.models import losses


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_soften_is_the_teacher_at_temperature():
    z = [2.0, 0.5, -1.0]
    p = torch.tensor([softmax(z)])
    expected = softmax([v / 3.0 for v in z])  # p^(1/T) renormalised == softmax(z / T)
    assert losses.soften(p, 3.0)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_matches_hand_computation():
    # sqrt(.8) / sqrt(.2) = 2, so at T = 2 the softened teacher is exactly [2/3, 1/3]
    s, p, T = [1.0, 0.0], [0.8, 0.2], 2.0
    expected = T ** 2 * kl([2 / 3, 1 / 3], softmax([0.5, 0.0]))
    # float64: the KL here is small enough that float32 cancellation shows at 1e-6
    got = losses.kd_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([p], dtype=torch.float64),
                         temperature=T)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01  # the case is not trivially zero


def test_kd_loss_mixes_cross_entropy_when_labels_are_given():
    s, p, T, alpha = [1.0, 0.0], [0.8, 0.2], 2.0, 0.3
    kd = T ** 2 * kl([2 / 3, 1 / 3], softmax([0.5, 0.0]))
    ce = -math.log(softmax(s)[1])  # label 1: the class the student likes less
    got = losses.kd_loss(torch.tensor([s]), torch.tensor([p]), temperature=T,
                         labels=torch.tensor([1]), alpha=alpha)
    assert float(got) == pytest.approx(alpha * ce + (1 - alpha) * kd, rel=1e-6)


def test_kd_loss_weights_are_normalised_by_their_sum():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    l1 = kl([0.5, 0.5], softmax([1.0, 0.0]))
    l2 = kl([0.9, 0.1], softmax([0.0, 2.0]))
    w = torch.tensor([1.0, 3.0])
    got = losses.kd_loss(s, p, temperature=1.0, weights=w)
    assert float(got) == pytest.approx((l1 + 3 * l2) / 4, rel=1e-6)
    # mean-1 normalisation: scaling every weight changes nothing
    assert float(losses.kd_loss(s, p, temperature=1.0, weights=5 * w)) == pytest.approx(float(got), rel=1e-6)
    assert float(losses.kd_loss(s, p, temperature=1.0)) == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_kd_loss_handles_hard_teacher_probabilities():
    got = losses.kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), temperature=1.0)
    assert float(got) == pytest.approx(math.log(2), rel=1e-6)  # KL([1, 0] || [.5, .5])


def test_kd_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        losses.kd_loss(torch.zeros(2, 3), torch.full((2, 4), 0.25))


def test_easy_weights_down_weight_the_hardest_rows_and_wrong_teacher():
    # teacher confident in class 0 everywhere; student logits make rows 3 and 1 the worst fits
    p = torch.tensor([[0.9, 0.1]] * 5)
    s = torch.tensor([[3.0, 0.0], [-2.0, 0.0], [2.0, 0.0], [-4.0, 0.0], [1.0, 0.0]])
    w, hard = losses.easy_weights(s, p, hard_fraction=0.4, floor=0.1)
    assert hard.tolist() == [False, True, False, True, False]
    # no labels: a_i = teacher confidence 0.9, times b_i = floor on hard rows
    assert w.tolist() == pytest.approx([0.9, 0.09, 0.9, 0.09, 0.9])
    labels = torch.tensor([0, 0, 1, 0, 0])  # the teacher is wrong on row 2
    w, _ = losses.easy_weights(s, p, labels=labels, hard_fraction=0.4, floor=0.1)
    assert w.tolist() == pytest.approx([1.0, 0.1, 0.1, 0.1, 1.0])


def test_easy_weights_hard_count_is_ceil_of_fraction():
    p = torch.full((10, 2), 0.5)
    s = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 0.0]])
    _, hard = losses.easy_weights(s, p, hard_fraction=0.2)
    assert int(hard.sum()) == 2  # not 3, although 0.2 * 10 > 2 in floating point
    _, hard = losses.easy_weights(s, p, hard_fraction=0.25)
    assert int(hard.sum()) == 3
    assert hard[-3:].all()  # the largest logits are the furthest from a uniform teacher


def test_easy_loss_is_the_weighted_kd():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    l1 = kl([0.5, 0.5], softmax([1.0, 0.0]))
    l2 = kl([0.9, 0.1], softmax([0.0, 2.0]))
    got = losses.easy_loss(s, p, torch.tensor([1.0, 0.1]), temperature=1.0)
    assert float(got) == pytest.approx((l1 + 0.1 * l2) / 1.1, rel=1e-6)


def test_defer_loss_matches_mozannar_sontag_by_hand():
    # K = 2 classes + defer. Row 0: teacher right, student wrong -> m = 1, m2 = alpha.
    # Row 1: teacher right, student right -> m = 0, m2 = 1. Row 2: teacher wrong -> m = 0, m2 = 1.
    z = [[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.0, 1.0, -1.0]]
    target = [0, 0, 1]
    teacher = [0, 0, 0]
    alpha = 0.5
    q = [softmax(r) for r in z]
    expected = (-(math.log(q[0][2]) + alpha * math.log(q[0][0]))
                - math.log(q[1][0]) - math.log(q[2][1])) / 3
    got = losses.defer_loss(torch.tensor(z), torch.tensor(teacher), torch.tensor(target), alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the paper's loss: m = 1[teacher right] also on row 1
    faithful = (-(math.log(q[0][2]) + alpha * math.log(q[0][0]))
                - (math.log(q[1][2]) + alpha * math.log(q[1][0])) - math.log(q[2][1])) / 3
    got = losses.defer_loss(torch.tensor(z), torch.tensor(teacher), torch.tensor(target), alpha,
                            only_where_student_wrong=False)
    assert float(got) == pytest.approx(faithful, rel=1e-6)


def test_defer_loss_budget_hinge_only_above_target():
    z = [[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]  # both rows put most mass on defer
    teacher, target = torch.tensor([0, 1]), torch.tensor([0, 1])
    base = float(losses.defer_loss(torch.tensor(z), teacher, target))
    rate = softmax(z[0])[2]
    with_budget = float(losses.defer_loss(torch.tensor(z), teacher, target, target_deferral=0.2))
    assert with_budget - base == pytest.approx(32 * (rate - 0.2) ** 2, rel=1e-5)
    assert float(losses.defer_loss(torch.tensor(z), teacher, target, target_deferral=0.95)) == \
        pytest.approx(base, rel=1e-6)


def test_defer_loss_rejects_targets_on_the_defer_output():
    with pytest.raises(ValueError, match="class ids"):
        losses.defer_loss(torch.zeros(2, 3), torch.tensor([0, 2]), torch.tensor([0, 2]))

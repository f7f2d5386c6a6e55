"""Distillation losses for cascade students: plain KD, cascade-aware ``easy`` KD, learning to defer.

Notation: s = student logits [B, K], p = teacher probabilities [B, K], y = label (or the
teacher's argmax when there are no labels), T = temperature, R = target deferral rate,
softmax_T(s) = softmax(s / T), and p_T = p^(1/T) / sum_k p_k^(1/T) (the teacher softened the
same way: if p = softmax(z) then p_T = softmax(z / T) exactly).

    kd      l_i = alpha * CE(s_i, y_i) + (1 - alpha) * T^2 * KL(p_T,i || softmax_T(s_i))
                                                        (no labels: the CE term is dropped)
            L   = sum_i w_i l_i / sum_i w_i             (w = 1 unless weights are given)

    easy    L   = sum_i w_i l_i / sum_i w_i             (l_i as in kd), with w_i = a_i * b_i:
            a_i = 1 if argmax p_i = y_i else f          with labels: is the teacher right?
                = max_k p_ik                            without labels: teacher confidence
            b_i = f if d_i is among the ceil(R * N) largest d over the training set, else 1
            d_i = KL(p_i || softmax(s_i))               under the current student (T = 1),
                                                        re-estimated at the start of every epoch
            f   = floor weight (0.1): the hardest R of the rows are routed to the teacher anyway,
                  so the student should not spend its capacity on them, but they are not dropped.

    defer   (K+1 outputs; q = softmax over all K+1, q_defer = the last output)
            l_i  = -m_i log q_defer,i - m2_i log q_y,i
            m_i  = 1[teacher right on i] * 1[student wrong on i]
            m2_i = alpha * m_i + (1 - m_i)
            L    = mean_i l_i + lambda * max(mean_i q_defer,i - R, 0)^2        (lambda = 32)

Weighted means divide by the sum of the weights, i.e. the weights are normalised to mean 1 over
the batch, so the loss scale does not depend on how many rows were down-weighted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: weight of a row the student should not spend capacity on (down-weighted, not dropped)
FLOOR = 0.1


def soften(teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised: the teacher's distribution at temperature T, from probabilities."""
    # log-space so that p = 0 stays 0 and tiny p do not underflow before the power
    return torch.softmax(torch.log(teacher_probs.clamp_min(1e-30)) / temperature, dim=-1)


def kd_softened(student_logits: torch.Tensor, p_t: torch.Tensor, temperature,
                p_log_p: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(p_t || softmax(s / T)) per row [B], for teacher probabilities already softened
    at T (``soften``). ``temperature``: a number, or one per row [B]; ``p_log_p``: each row's
    sum_k p_t log p_t, when one computes it once for many calls (a fine-tune's every step)."""
    if isinstance(temperature, (int, float)):
        log_q = torch.log_softmax(student_logits / temperature, dim=-1)
        scale = temperature ** 2
    else:
        log_q = torch.log_softmax(student_logits / temperature[:, None], dim=-1)
        scale = temperature * temperature
    if p_log_p is None:
        p_log_p = torch.xlogy(p_t, p_t).sum(dim=-1)  # xlogy makes 0 * log 0 = 0
    # KL(p || q) = sum_k p_k (log p_k - log q_k); T^2 keeps the gradient scale independent of T
    # (Hinton et al.)
    return scale * (p_log_p - (p_t * log_q).sum(dim=-1))


def kd_per_example(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                   temperature: float = 2.0, labels: torch.Tensor | None = None,
                   alpha: float = 0.5) -> torch.Tensor:
    """Per-row Hinton loss [B]: alpha * CE(s, y) + (1 - alpha) * T^2 * KL(p_T || softmax(s/T))."""
    _check_pair(student_logits, teacher_probs)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kd = kd_softened(student_logits, soften(teacher_probs, temperature), temperature)
    if labels is None:
        return kd
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    return alpha * ce + (1.0 - alpha) * kd


def weighted_mean(per_example: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i (the plain mean when weights is None)."""
    if weights is None:
        return per_example.mean()
    if weights.shape != per_example.shape:
        raise ValueError(f"weights have shape {tuple(weights.shape)}, expected {tuple(per_example.shape)}")
    return (weights * per_example).sum() / weights.sum().clamp_min(1e-12)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 2.0,
            labels: torch.Tensor | None = None, alpha: float = 0.5,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton distillation, optionally mixed with CE on labels and weighted per row (module docstring)."""
    return weighted_mean(kd_per_example(student_logits, teacher_probs, temperature, labels, alpha), weights)


def student_disagreement(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """d_i = KL(p_i || softmax(s_i)) at T = 1: how far the student is from fitting row i."""
    _check_pair(student_logits, teacher_probs)
    log_q = torch.log_softmax(student_logits, dim=-1)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(dim=-1)


def easy_weights(student_logits: torch.Tensor, teacher_probs: torch.Tensor, *,
                 labels: torch.Tensor | None = None, hard_fraction: float = 0.2,
                 floor: float = FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights w_i = a_i * b_i for the ``easy`` loss, and the mask of rows counted as hard.

    Call it on the whole training set (not a batch): the hard set is the top ``hard_fraction``
    of student-teacher disagreement over all rows. See the module docstring for a_i and b_i.
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    with torch.no_grad():
        teacher_conf, teacher_pred = teacher_probs.max(dim=-1)
        if labels is None:
            a = teacher_conf.float()
        else:
            a = torch.where(teacher_pred == labels, 1.0, floor)
        d = student_disagreement(student_logits, teacher_probs)
        # round first: 0.2 * 10 is 2.0000000000000004 in floating point, not 3 rows
        n_hard = math.ceil(round(hard_fraction * d.numel(), 9))
        hard = torch.zeros(d.numel(), dtype=torch.bool)
        if n_hard:
            # stable sort so ties break by row order and the hard set is deterministic
            order = torch.sort(d, descending=True, stable=True).indices
            hard[order[:n_hard]] = True
        b = torch.where(hard, floor, 1.0)
    return a * b, hard


def easy_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
              temperature: float = 2.0, labels: torch.Tensor | None = None,
              alpha: float = 0.5) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i with l_i the kd loss and w from ``easy_weights`` for these rows."""
    return kd_loss(student_logits, teacher_probs, temperature, labels, alpha, weights)


def defer_loss(logits_k_plus_1: torch.Tensor, teacher_pred: torch.Tensor, target: torch.Tensor,
               alpha: float = 1.0, *, only_where_student_wrong: bool = True,
               target_deferral: float | None = None, budget_weight: float = 32.0) -> torch.Tensor:
    """Learning-to-defer surrogate (Mozannar & Sontag 2020) with the teacher as the expert.

    l_i = -m_i log q_defer,i - m2_i log q_y,i,  m2_i = alpha * m_i + (1 - m_i),  y = ``target``.

    ``target`` is the label when labels exist, else the teacher's argmax. ``m`` starts as
    1[teacher_pred == target] (the paper's "expert is right"). That alone is degenerate here:
    without labels the teacher is right by definition, and a teacher scored on its own training
    rows is right almost everywhere, so the surrogate learns to defer everything. With
    ``only_where_student_wrong`` (default) deferral is rewarded only where it changes the
    outcome, m_i *= 1[argmax_k<K s_ik != y_i] under the current student (no gradient through it).
    ``False`` gives the paper's loss exactly.

    With ``target_deferral`` R, a SelectiveNet-style hinge lambda * max(mean q_defer - R, 0)^2
    keeps the soft deferral rate of the batch from exceeding the budget.
    """
    if logits_k_plus_1.dim() != 2 or logits_k_plus_1.shape[1] < 2:
        raise ValueError(f"defer_loss needs logits [B, K+1] with K >= 1, got {tuple(logits_k_plus_1.shape)}")
    k = logits_k_plus_1.shape[1] - 1
    if teacher_pred.shape != target.shape or target.shape[0] != logits_k_plus_1.shape[0]:
        raise ValueError(f"teacher_pred {tuple(teacher_pred.shape)} and target {tuple(target.shape)} "
                         f"must both be [B] with B = {logits_k_plus_1.shape[0]}")
    if int(target.max()) >= k or int(target.min()) < 0:
        raise ValueError(f"targets must be class ids in [0, {k}); the last output is the defer output")
    log_q = torch.log_softmax(logits_k_plus_1, dim=-1)
    m = (teacher_pred == target).float()
    if only_where_student_wrong:
        m = m * (logits_k_plus_1[:, :k].argmax(dim=-1) != target).float()
    m2 = alpha * m + (1.0 - m)
    log_q_y = log_q.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = (-m * log_q[:, k] - m2 * log_q_y).mean()  # -m log q_defer - m2 log q_y
    if target_deferral is not None:
        rate = log_q[:, k].exp().mean()
        loss = loss + budget_weight * torch.clamp(rate - target_deferral, min=0.0) ** 2
    return loss


def _check_pair(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> None:
    if student_logits.shape != teacher_probs.shape or student_logits.dim() != 2:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} must both be [B, K]")

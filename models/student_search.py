"""Choosing the student `titans label` distils: the MLP (or, on token ids, the bag-of-embeddings
``TokenMLP``), within a compute budget, that makes the cascade cheapest.

Compute proxy: FLOPs per row of one forward pass, counted by torch's own
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add of every matrix product and
convolution) on real rows, for the teacher as it is loaded (TorchScript, torch.export or a
state_dict module) and for every candidate student alike. FLOPs rather than parameters
because the budget is about compute: for an MLP the two are proportional (2 FLOPs per
weight) and rank candidates identically, but a convolutional or weight-shared teacher does
many FLOPs per parameter, and a parameter budget would then starve its student. When the
counter sees no FLOPs at all (a model made only of ops it does not know), the proxy falls
back to 2 x parameters, the MLP equivalent, and says so.

The search, for a student budget F (share of the teacher's FLOPs per row):
  1. candidates: a linear student, one hidden layer at about a third and at all of the
     budget, and two equal hidden layers at all of it (``candidate_architectures``);
  2. all are distilled together with ``kd`` (temperature 4) from the teacher's probabilities
     on the training part of the sample, inputs standardised (mean and std baked into the
     student), one data pass per epoch for all, a one-cycle schedule of 30 epochs, each
     candidate stopping early and keeping its best epoch by validation agreement; the two
     best by step 3 then train 150 more epochs and are scored again; all within a time
     budget (``training_settings``, ``distill_together``; ``kd`` because the quality
     benchmark finds ``easy`` no better and ``defer`` level with it; see README);
  3. each (candidate, confidence rule) is scored on the validation part by the teacher
     compute per cascade row it would cost: its own FLOPs share, plus the share of rows it
     would have to send to the teacher to stay within the guarantee (``deferral_needed`` at
     ``ltt_bar``, the largest disagreement Learn then Test can still certify on the
     calibration rows); with a fixed deferral rate, by its disagreement at that rate;
  Token inputs (int64 [N, L]): ``token_candidates``, an embedding of a few widths, a mean
     over the non-pad positions and a linear head, plus one hidden layer at the widest of
     them; the counter sees the same FLOPs in them (the head's matrix products; a lookup and
     a mean are no multiply-adds), on int64 rows. Their vocabulary is fixed at distil time
     (``teacher_vocab``, else ``sample_vocab``); other ids share one out-of-vocabulary row;
  4. the cheapest wins. Validation rows are neither training nor calibration rows, so the
     choice does not touch the guarantee.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from titans.models.deferral import CONFIDENCE_RULES, make_rule
from titans.models.distill import (build_student, distill_together, feature_stats,
                                   make_token_student)
from titans.models.forward import forward_in_chunks

_LOG = logging.getLogger("titans")

FLOPS = "FLOPs per row (torch.utils.flop_counter: 2 per multiply-add of matrix products and convolutions)"
PARAMETERS = "2 x parameters per row (the FLOP counter saw no FLOPs in this model)"
MAX_WIDTH = 1 << 16


# --------------------------------------------------------------------------- compute

def flops_per_row(model, x: np.ndarray) -> tuple[float, str]:
    """(compute per row of ``model`` on the rows ``x``, which proxy measured it)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = np.asarray(x)
    dtype = np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32  # token ids stay ids
    xt = torch.from_numpy(np.array(x, dtype=dtype, order="C", copy=True))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(xt)
    flops = counter.get_total_flops() / max(1, len(xt))
    if flops > 0:
        return float(flops), FLOPS
    try:
        params = sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an exported module without parameters()
        params = 0
    return float(2 * params), PARAMETERS


def mlp_flops(dim: int, hidden: tuple[int, ...], classes: int) -> int:
    """FLOPs per row of ``MLP(dim, classes, hidden)`` as FlopCounterMode counts them."""
    widths = (dim, *hidden, classes)
    return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def _max_width(dim: int, classes: int, depth: int, budget: float) -> int:
    """The largest width w with mlp_flops(dim, (w,) * depth, classes) <= budget (0 if none)."""
    lo, hi = 0, MAX_WIDTH
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mlp_flops(dim, (mid,) * depth, classes) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def candidate_architectures(dim: int, classes: int, budget_flops: float) -> list[tuple[int, ...]]:
    """Hidden widths of the students to try, cheapest first, all within ``budget_flops``.

    ValueError when not even a linear student fits (the budget is below ``dim x classes``
    multiply-adds)."""
    linear = mlp_flops(dim, (), classes)
    if linear > budget_flops:
        raise ValueError(f"--student-budget is too small: the smallest student (linear, "
                         f"{linear:,} FLOPs per row) needs {linear:,} FLOPs per row but the budget "
                         f"allows {budget_flops:,.0f}; raise --student-budget")
    out: list[tuple[int, ...]] = [()]
    one = _max_width(dim, classes, 1, budget_flops)
    for hidden in ((_max_width(dim, classes, 1, budget_flops / 3),), (one,),
                   (_max_width(dim, classes, 2, budget_flops),) * 2):
        if min(hidden) >= 2 and hidden not in out:
            out.append(hidden)
    return sorted(out, key=lambda h: mlp_flops(dim, h, classes))


TOKEN_WIDTHS = (8, 16, 32, 64)  # embedding widths of the token students
TOKEN_MAX_HIDDEN = 256
VOCAB_MARGIN = 0.125            # share added to the sample's largest id + 1 (at least 1 id)


def token_candidates(classes: int, budget_flops: float) -> list[tuple[int, tuple[int, ...]]]:
    """(embedding width, hidden widths) of the token students to try, cheapest first, all
    within ``budget_flops`` (the head's FLOPs: ``mlp_flops(width, hidden, classes)``).
    ValueError when not even the narrowest linear one fits."""
    smallest = mlp_flops(TOKEN_WIDTHS[0], (), classes)
    if smallest > budget_flops:
        raise ValueError(f"--student-budget is too small: the smallest token student (a "
                         f"{TOKEN_WIDTHS[0]}-wide embedding and a linear head) needs {smallest:,} "
                         f"FLOPs per row but the budget allows {budget_flops:,.0f}; raise "
                         f"--student-budget")
    out = [(d, ()) for d in TOKEN_WIDTHS if mlp_flops(d, (), classes) <= budget_flops]
    widest = out[-1][0]
    hidden = min(TOKEN_MAX_HIDDEN, _max_width(widest, classes, 1, budget_flops))
    if hidden >= 2:
        out.append((widest, (hidden,)))
    return sorted(out, key=lambda c: mlp_flops(c[0], c[1], classes))


def teacher_vocab(teacher) -> int | None:
    """The rows of the teacher's largest embedding table (its vocabulary), or None when it
    shows none (the token student's vocabulary then comes from the sample: ``sample_vocab``)."""
    sizes = []
    try:
        for m in teacher.modules():
            kind = getattr(m, "original_name", type(m).__name__)
            if kind in ("Embedding", "EmbeddingBag") and hasattr(m, "weight"):
                sizes.append(int(m.weight.shape[0]))
    except Exception:  # noqa: BLE001 - an exported module without modules(): use the sample
        return None
    return max(sizes) if sizes else None


def sample_vocab(x: np.ndarray, pad_id: int = 0) -> int:
    """The token student's vocabulary from the sample: its largest id + 1, plus a margin."""
    x = np.asarray(x)
    ids = x[(x != pad_id) & (x >= 0)]
    top = int(ids.max()) + 1 if ids.size else 1
    return top + max(1, int(VOCAB_MARGIN * top))


def describe(hidden: tuple[int, ...], embed: int | None = None) -> str:
    head = "linear" if not hidden else ",".join(str(h) for h in hidden)
    return head if embed is None else f"emb{embed}:{head}"


# --------------------------------------------------------------------------- what a student costs

def ltt_bar(n_cal: int, eps: float, delta: float) -> float:
    """The largest disagreement share k/n that Learn then Test (binomial p-values) certifies
    as <= ``eps`` at level ``delta`` on ``n_cal`` calibration rows; -1 when not even 0 passes
    (too few rows: every row would go to the teacher)."""
    from scipy.stats import binom

    if n_cal < 1:
        return -1.0
    k = np.arange(n_cal + 1)
    passing = np.flatnonzero(binom.cdf(k, n_cal, eps) <= delta)
    return float(passing[-1] / n_cal) if passing.size else -1.0


def deferral_needed(scores: np.ndarray, disagree: np.ndarray, bar: float) -> float:
    """The smallest share of rows to send to the teacher (highest scores first) so that the
    share of all rows kept by the student and labeled differently from the teacher is <= bar."""
    n = len(scores)
    if n == 0 or bar < 0:
        return 1.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    remaining = int(disagree.sum()) - np.concatenate([[0], np.cumsum(disagree[order])])
    m = int(np.flatnonzero(remaining <= bar * n + 1e-9)[0])  # deferring all n rows leaves 0
    return m / n


def disagreement_at(scores: np.ndarray, disagree: np.ndarray, rate: float) -> float:
    """Share of rows kept by the student and labeled unlike the teacher when the ``rate``
    share with the highest scores goes to the teacher."""
    n = len(scores)
    m = int(round(rate * n))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return float(disagree[order[m:]].sum() / n) if n else 0.0


@dataclasses.dataclass(frozen=True)
class Target:
    """What the cascade must meet: the LTT bar (guarantee mode) or a deferral rate (budget)."""
    bar: float | None = None
    deferral_rate: float | None = None


@dataclasses.dataclass
class Candidate:
    hidden: tuple[int, ...]
    flops: float              # per row
    flops_share: float        # of the teacher's
    parameters: int
    val_agreement: float      # argmax agreement with the teacher on the validation rows
    rule: str = ""
    deferral: float = 1.0     # share of rows to the teacher at the target
    disagreement: float = 1.0  # on validation rows, at that deferral
    objective: float = math.inf
    seconds: float = 0.0
    by_rule: dict = dataclasses.field(default_factory=dict)
    embed: int | None = None  # a token student's embedding width
    epochs: int = 0           # trained (all candidates share one pass per epoch)
    best_epoch: int = 0       # whose weights it keeps (best validation agreement)
    stopped: str = ""         # converged | schedule | time budget

    @property
    def arch(self) -> str:
        return describe(self.hidden, self.embed)

    def record(self) -> dict:
        return {"arch": self.arch, "flops_per_row": self.flops, "flops_share": self.flops_share,
                "parameters": self.parameters, "val_agreement": self.val_agreement,
                "rule": self.rule, "val_deferral": self.deferral,
                "val_disagreement": self.disagreement, "objective": self.objective,
                "train_seconds": round(self.seconds, 3), "epochs": self.epochs,
                "best_epoch": self.best_epoch, "stopped": self.stopped, "by_rule": self.by_rule}


def score_candidate(c: Candidate, logits: torch.Tensor, teacher_pred: np.ndarray, target: Target,
                    rules=CONFIDENCE_RULES, audit_rate: float = 0.0) -> Candidate:
    """Fill in the best rule and the objective: teacher FLOPs per cascade row, in teacher units
    (the student's share, the rows it sends to the teacher, the audited share of the rest)."""
    probs = torch.softmax(logits.float(), dim=-1)
    pred = probs.argmax(dim=-1).numpy()
    disagree = pred != teacher_pred
    c.val_agreement = float(1.0 - disagree.mean())
    for name in rules:
        scores = make_rule(name).score(probs).numpy()
        if target.deferral_rate is None:
            deferral = deferral_needed(scores, disagree, target.bar)
            objective = c.flops_share + deferral + audit_rate * (1.0 - deferral)
            # the disagreement left at that deferral, for the record
            dis = disagreement_at(scores, disagree, deferral)
        else:
            deferral = target.deferral_rate
            dis = disagreement_at(scores, disagree, deferral)
            objective = dis  # fixed teacher share: the fewest disagreements win
        c.by_rule[name] = {"deferral": deferral, "disagreement": dis, "objective": objective}
        # ties (within a row of validation data) go to the earlier rule, then the cheaper model
        if objective < c.objective - 0.5 / max(1, len(scores)):
            c.rule, c.deferral, c.disagreement, c.objective = name, deferral, dis, objective
    return c


# --------------------------------------------------------------------------- training

TRAIN_STEPS = 10_000   # at most this many AdamW steps per candidate (tests lower it)
SCREEN_EPOCHS = 30     # stage 1: every candidate, one shared one-cycle schedule (passes)
FINAL_EPOCHS = 150     # stage 2: the FINALISTS best of stage 1, a second one-cycle from there
FINALISTS = 2
LR = 2e-2              # stage 1 peak learning rate (inputs are standardised)
FINAL_LR = 1e-2        # stage 2 peak learning rate
PATIENCE = 20          # epochs past the schedule's peak without a better validation agreement
TEMPERATURE = 4.0      # kd temperature
SEARCH_SECONDS = 60.0  # the search's time budget: training stops there, best epochs kept
# Below this many FLOPs per training step (the widest candidate), train on one thread: the
# steps are too small to split, and on a busy 2-core machine two threads waiting on each other
# made the same 4-candidate search 112 s instead of 7 s (identical weights either way).
SMALL_STEP_FLOPS = 1e8


def training_settings(n_rows: int) -> dict:
    """kd settings for a training set of ``n_rows``: batches of about n/8 rows (64 to 1,024);
    stage 1, SCREEN_EPOCHS passes at peak LR for all candidates; stage 2, FINAL_EPOCHS more at
    FINAL_LR for the FINALISTS best of them (both scaled down if together they exceed TRAIN_STEPS
    steps); temperature 4; early stop after PATIENCE epochs past the peak without progress.
    Why two stages: ranking needs a short schedule, the winner's hard-row share a long one
    (digits-shifted, 95-wide student: 97.7% validation agreement after 30 epochs, 98.8% after
    30 + 80, and the old ~10,000 plain AdamW steps 98.3%); most of the compute is the big
    candidates, so training two long costs less than training all long; two, not one,
    because a short schedule ranks slow learners (small, deep) too low."""
    batch = int(min(1024, max(64, n_rows // 8)))
    steps_per_epoch = -(-n_rows // batch)
    scale = min(1.0, TRAIN_STEPS / (steps_per_epoch * (SCREEN_EPOCHS + FINAL_EPOCHS)))
    return {"batch_size": batch, "epochs": max(1, int(SCREEN_EPOCHS * scale)),
            "final_epochs": int(FINAL_EPOCHS * scale), "lr": LR, "final_lr": FINAL_LR,
            "temperature": TEMPERATURE, "patience": PATIENCE}


@dataclasses.dataclass
class SearchResult:
    student: torch.nn.Module
    best: Candidate
    candidates: list[Candidate]
    teacher_flops: float
    budget_flops: float
    proxy: str
    training: dict
    seconds: float = 0.0           # the whole search: training, FLOPs and scoring
    time_budget: float | None = None
    budget_hit: bool = False       # training was cut at the time budget

    def table(self) -> list[dict]:
        return [c.record() for c in self.candidates]


def search_student(x_train: np.ndarray, p_train: np.ndarray, x_val: np.ndarray,
                   teacher_val_pred: np.ndarray, *, teacher_flops: float, budget: float,
                   target: Target, rules=CONFIDENCE_RULES, seed: int = 0,
                   audit_rate: float = 0.0, proxy: str = FLOPS,
                   report: Callable[[Candidate], None] | None = None,
                   vocab: int | None = None, pad_id: int = 0,
                   time_budget: float | None = SEARCH_SECONDS) -> SearchResult:
    """Distil every candidate within ``budget`` x ``teacher_flops`` with kd on the training rows
    and return the one with the lowest objective on the validation rows (see the module doc).
    Two stages within ``time_budget`` seconds (None: no limit): all candidates train together
    (``distill_together``: one data pass, early stopping on validation agreement), are scored,
    and the FINALISTS best train on with a second schedule, are scored again, and the better
    of them wins; when the
    budget runs out, the best epochs so far are kept and ``budget_hit`` says so.
    Vector students standardise their inputs with the training rows' mean and std, baked in
    (``build_student``). With ``vocab``, the rows are int64 token ids (padded with ``pad_id``)
    and the candidates token students over ids below ``vocab``."""
    t0 = time.monotonic()
    dim, classes = x_train.shape[1], p_train.shape[1]
    budget_flops = budget * teacher_flops
    archs = ([(None, h) for h in candidate_architectures(dim, classes, budget_flops)]
             if vocab is None else token_candidates(classes, budget_flops))
    settings = training_settings(len(x_train))
    mean_std = feature_stats(x_train) if vocab is None else None
    students = [build_student(hidden, dim, classes, *mean_std, seed=seed) if embed is None else
                make_token_student(embed, hidden, vocab, classes, pad_id, seed=seed)
                for embed, hidden in archs]
    deadline = None if time_budget is None else t0 + time_budget
    stage = dict(x_train=x_train, p_train=p_train, val=(x_val, teacher_val_pred), seed=seed,
                 deadline=deadline, batch_size=settings["batch_size"],
                 temperature=settings["temperature"], patience=settings["patience"])
    threads = torch.get_num_threads()
    step_flops = 3 * settings["batch_size"] * mlp_flops(
        dim if vocab is None else archs[-1][0], archs[-1][1], classes)  # forward + backward
    if step_flops < SMALL_STEP_FLOPS:
        torch.set_num_threads(1)
    try:
        runs = _train(students, epochs=settings["epochs"], lr=settings["lr"], **stage)
        done = [_score(embed, hidden, student, run, x_val, teacher_val_pred, teacher_flops,
                       target, rules, audit_rate, classes)
                for (embed, hidden), student, run in zip(archs, students, runs)]
        hit = any(r["stopped"] == "time budget" for r in runs)
        finalists = sorted(range(len(done)), key=lambda i: (done[i].objective, i))[:FINALISTS]
        pool = range(len(done))
        if settings["final_epochs"] and not hit:
            pool = sorted(finalists)  # only the candidates trained on compete
            more = _train([students[i] for i in finalists], epochs=settings["final_epochs"],
                          lr=settings["final_lr"], **stage)
            hit = any(r["stopped"] == "time budget" for r in more)
            for i, run in zip(finalists, more):
                first = runs[i]
                run = {**run, "epochs": first["epochs"] + run["epochs"],
                       "best_epoch": first["epochs"] + run["best_epoch"]}
                embed, hidden = archs[i]
                done[i] = _score(embed, hidden, students[i], run, x_val, teacher_val_pred,
                                 teacher_flops, target, rules, audit_rate, classes)
        best_i = pool[0]
        for i in pool:  # ties (within a validation row) go to the cheaper one
            if done[i].objective < done[best_i].objective - 0.5 / max(1, len(x_val)):
                best_i = i
    finally:
        torch.set_num_threads(threads)
    seconds = time.monotonic() - t0
    for c in done:
        c.seconds = seconds  # trained together: the shared wall time
        if report is not None:
            report(c)
    best, best_model = done[best_i], students[best_i]
    return SearchResult(best_model.eval(), best, done, teacher_flops, budget_flops, proxy,
                        settings, seconds=seconds, time_budget=time_budget, budget_hit=hit)


def _train(students, *, x_train, p_train, **kwargs) -> list[dict]:
    return distill_together(students, x_train, p_train, weight_decay=1e-4, **kwargs)


def _score(embed, hidden, student, run, x_val, teacher_val_pred, teacher_flops, target, rules,
           audit_rate, classes) -> Candidate:
    # a vector student is an MLP of known shape: counted, not run under FlopCounterMode,
    # whose first use imports torch._dynamo (~0.8 s of every titans label run)
    flops = (float(mlp_flops(x_val.shape[1], hidden, classes)) if embed is None
             else flops_per_row(student, x_val[:8])[0])
    c = Candidate(hidden, flops, flops / teacher_flops,
                  int(sum(p.numel() for p in student.parameters())), 0.0, embed=embed,
                  epochs=run["epochs"], best_epoch=run["best_epoch"], stopped=run["stopped"])
    return score_candidate(c, forward_in_chunks(student, x_val, 65536), teacher_val_pred,
                           target, rules, audit_rate)

"""A student that keeps learning from the teacher across runs (`titans label --state`): the
bounded warm-start fine-tune, champion against challenger, and the drift statistics (how big
today's fresh sample is: ``models/fresh_sample.py``). Torch, numpy and scipy only: no Beam, no
files.

Why each piece is shaped as it is:
  * ``fine_tune``: kd from the teacher's probabilities, starting from yesterday's weights, with
    a fixed step budget and a wall-clock cap (the warm distil phase up to the fine-tune's end
    at most COLD_DISTIL_SHARE of the cold run's distil phase, from the history:
    ``fine_tune_seconds``; and ended, from the job's start, by when the cold run's distil
    phase ended: ``fine_tune_end``), so a warm run never trains longer than a cold
    search (one model, ``FINE_TUNE_STEPS`` steps of 256 rows; the cold search trains several
    candidates; on benchmarks/continual.py 2,000 steps made a warm distil phase 2.5 s against
    the cold search's 2.0 s, 1,000 steps keep it below). Today's
    rows are drawn at least ``TODAY_SHARE`` of the time, so a shift is learnt even when the
    pool is much larger than today's share. The challenger is yesterday's student one size
    up while --student-budget has room (``grow``: widened, same answers at the start); on a
    shifted stream (a shift called today or on the previous run) it may take
    SHIFT_STEPS_FACTOR x the steps, the time cap unchanged. Its optimiser is
    ``models.optim.AdamW`` (torch's construction alone costs ~0.8 s of imports: a shifted day
    had done 321 of 1,000 steps).
  * ``champion_challenger``: both students scored on today's validation rows (neither was
    trained on them) by the teacher share the cascade would need (``score_candidate``) and by
    their KL divergence from the teacher; the challenger replaces the champion only if it
    needs fewer teacher rows by more than one validation row, or is closer to the teacher
    without needing more than a few rows more; a wider challenger's own extra FLOPs count
    against it (in teacher units), as in the cold search's objective.
  * ``drift``: yesterday's student on today's fresh rows against the agreement it had on
    yesterday's held-out rows, and a two-sample Kolmogorov-Smirnov test of its deferral
    scores on both sets of rows.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from titans.models import losses
from titans.models.deferral import CONFIDENCE_RULES, make_rule
from titans.models.forward import forward_in_chunks
from titans.models.optim import AdamW  # torch.optim's construction imports torch._dynamo (~0.8 s)
from titans.models.student_search import Candidate, Target, score_candidate

FINE_TUNE_STEPS = 1000   # AdamW steps of the fine-tune: a warm run must not be slower than a cold one
FINE_TUNE_SECONDS = 60.0  # and at most this long,
# the warm distil phase up to the fine-tune's end: at most this share of the cold run's distil
# phase (history), its set-up included. Not 0.8 any more: a warm run pays ~0.6 s outside its
# phases that a cold run pays inside its distil phase (scipy.stats imported to size the sample,
# the state read and committed, history.png); on benchmarks/continual.py the shifted days, whose
# fine-tune now uses its whole budget, took 7.2-7.4 s at 0.8 against run 1's 7.0 s
COLD_DISTIL_SHARE = 0.6
FINE_TUNE_LR = 3e-3
FINE_TUNE_BATCH = 256
TODAY_SHARE = 0.3        # at least this share of each batch's draws are today's rows
TEMPERATURE = 4.0        # as the cold search's kd
# the pool's hard rows are drawn at this weight against its sample rows: they are the rows the
# cascade sends to the teacher anyway (the easy loss's floor, losses.FLOOR), and their
# probabilities are rebuilt from a label and a confidence, the rest spread evenly: they are
# fitted at T=1, where the loss turns on the label and confidence (the teacher's), not at
# TEMPERATURE, where it weighs the made-up even rest as much as the sample rows' real one
# (tests/test_continual_learning.py). benchmarks/continual.py, day 4's state
# fine-tuned on day 5's rows, deferral needed on the ~10,000 rows outside the sample (mean
# of 4 draws): shift 31.0% at T=4, 28.8% at T=1 (29.6% without hard rows, 28.7% at weight
# 0.3, 29.4% at 1); stationary 10.2% at T=4, 9.6% at T=1 (10.3% at weight 0.3)
HARD_WEIGHT = 0.1
# after a shift (called today or on the previous run) the pool is mostly rows of the old
# stream: rows lose half their weight per run of age. On the benchmark's second shifted day
# this (with today's rows drawn half the time) cut the rows the fine-tuned 38-unit student sent
# to the teacher from 32.7% to 29.6%; on a stationary day it cost 0.7 points, so it is not
# the rule on stationary days. Today's share: once the student is widened and fine-tuned for
# 2,000 steps, drawing today's rows 30% of the time needed fewer teacher rows than 50% on
# both shifted days (rows outside the sample, mean of 3 draws: day 4 21.9% vs 22.7%; day 5
# 19.3% vs 20.0%, and 17.6% vs 18.1%, 14.1% vs 14.7% for --seed 1 and 2)
SHIFT_DECAY, SHIFT_TODAY_SHARE = 0.5, 0.3
# and the fine-tune may take this many times FINE_TUNE_STEPS (its time cap still holds: a warm
# run is never slower than run 1): the student is learning a new stream, not keeping up with
# the old one. Day 4's widened student on day 5's rows, rows outside the sample needing the
# teacher (3 draws): 1,000 steps 22.2% / 20.1% / 15.5% (--seed 0 / 1 / 2), 2,000 steps
# 20.0% / 18.1% / 14.7%, 4,000 steps (seeds 1, 2) 17.0% / 13.8%
SHIFT_STEPS_FACTOR = 4
# a shift is called on effect sizes, not on p-values alone: with thousands of rows a KS test
# finds the day-to-day differences of a stationary stream (other images of the same digits)
# significant. Stationary days in benchmarks/continual.py: KS 0.04-0.09, drops <= 2.8 points;
# the shifted day: KS 0.37, a drop of 11 points
DRIFT_P = 1e-3           # KS p-value below which, with DRIFT_KS, the scores are called shifted
DRIFT_KS = 0.15          # the smallest KS statistic called a shift
DRIFT_DROP = 0.05        # agreement drop (beyond 3 standard errors) called a shift


def fine_tune(student: torch.nn.Module, x_pool: np.ndarray, p_pool: np.ndarray,
              x_today: np.ndarray, p_today: np.ndarray, *, seed: int = 0,
              pool_weights: np.ndarray | None = None, today_share: float | None = None,
              pool_hard: np.ndarray | None = None, steps: int | None = None,
              seconds: float | None = None,
              lr: float = FINE_TUNE_LR, batch_size: int = FINE_TUNE_BATCH) -> dict:
    """Train ``student`` in place (a module loaded from yesterday's file: the warm start) with
    kd on the pool and today's rows; at most ``steps`` AdamW steps and ``seconds``. Rows are
    drawn with replacement (pool rows in proportion to ``pool_weights``), today's at least
    TODAY_SHARE of the time; pool rows flagged in ``pool_hard`` are fitted at T=1 (see
    HARD_WEIGHT). What it did, as a dict."""
    start = time.time()  # the cap counts the set-up too
    steps = FINE_TUNE_STEPS if steps is None else steps  # read here: tests may lower them
    share = TODAY_SHARE if today_share is None else today_share
    seconds = FINE_TUNE_SECONDS if seconds is None else seconds
    n_pool, n_today = len(x_pool), len(x_today)
    parts = [(np.asarray(a, np.float32).reshape(len(a), -1), np.asarray(b, np.float32))
             for a, b in ((x_pool, p_pool), (x_today, p_today)) if len(a)]  # an empty pool
    if not parts:
        return {"steps": 0, "seconds": 0.0, "rows_pool": 0, "rows_today": 0}
    x = np.concatenate([a for a, _ in parts])
    p = np.concatenate([b for _, b in parts])
    weights = np.ones(len(x), np.float64)
    if n_pool and pool_weights is not None:
        weights[:n_pool] = pool_weights
    if n_pool and n_today and n_today < share * len(x):
        weights[n_pool:] = share * weights[:n_pool].sum() / ((1 - share) * n_today)
    xt, pt = torch.from_numpy(x), torch.from_numpy(p / p.sum(axis=1, keepdims=True))
    # hard rows' probabilities are rebuilt from a label and a confidence: softened at
    # TEMPERATURE their flat rest makes an almost uniform target, so they are fitted at T=1.
    # Each row's softened target, temperature and sum p log p are computed once here, not per
    # step (losses.kd_per_example twice a step was ~40% of a step)
    flat = np.zeros(len(x), bool)
    if n_pool and pool_hard is not None:
        flat[:n_pool] = np.asarray(pool_hard, bool)
    temp = torch.from_numpy(np.where(flat, 1.0, TEMPERATURE).astype(np.float32))
    target = torch.where(torch.from_numpy(flat)[:, None], losses.soften(pt, 1.0),
                         losses.soften(pt, TEMPERATURE))
    p_log_p = torch.xlogy(target, target).sum(dim=-1)
    wt = torch.from_numpy(weights / weights.sum())
    gen = torch.Generator().manual_seed(seed)
    for param in student.parameters():  # a loaded model may come frozen
        param.requires_grad_(True)
    opt = AdamW([q for q in student.parameters()], lr=lr, weight_decay=1e-4)
    done, total = 0, 0.0
    batch = min(batch_size, len(x))
    student.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for done in range(1, steps + 1):
            if (done - 1) % 256 == 0:  # the draws of 256 steps at once
                draws = torch.multinomial(wt, 256 * batch, replacement=True,
                                          generator=gen).view(256, batch)
            idx = draws[(done - 1) % 256]
            loss = losses.kd_softened(student(xt[idx]), target[idx], temp[idx],
                                      p_log_p[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if time.time() - start > seconds:
                break
    student.eval()
    for param in student.parameters():  # inference from here on (forward_in_chunks)
        param.requires_grad_(False)
    return {"steps": done, "seconds": round(time.time() - start, 3), "rows_pool": n_pool,
            "today_share": share,
            "rows_today": n_today, "final_loss": round(total / max(1, done), 5),
            "lr": lr, "batch_size": batch_size, "temperature": TEMPERATURE}


def widen(student: torch.nn.Module, factor: float, seed: int = 0,
          noise: float = 0.01) -> tuple[torch.nn.Module, str] | None:
    """A wider copy of a vector student (``StandardizedMLP``, loaded from TorchScript or not)
    computing the same function (Net2WiderNet, Chen et al. 2016): every hidden layer grows to
    ``ceil(factor x width)`` units, each new unit a copy of a random old one whose outgoing
    weights are shared among its copies; a little noise on the copies' incoming weights lets
    them part. (module, arch) or None when ``student`` is not such an MLP."""
    from titans.models.distill import build_student

    sd = {k: v.detach().clone() for k, v in student.state_dict().items()}
    keys = _weight_keys(sd)
    if "scale.mean" not in sd or len(keys) < 2:  # no hidden layer to widen
        return None
    widths = [int(sd[k].shape[0]) for k in keys[:-1]]
    new = _widened(widths, factor)
    gen = torch.Generator().manual_seed(seed)
    for i, (w, n) in enumerate(zip(widths, new)):
        pick = torch.cat([torch.arange(w), torch.randint(0, w, (n - w,), generator=gen)])
        count = torch.bincount(pick, minlength=w).float()
        wi, bi = keys[i], keys[i].replace(".weight", ".bias")
        w_in, b_in = sd[wi][pick].clone(), sd[bi][pick].clone()
        w_in[w:] += noise * w_in[w:].std() * torch.randn(w_in[w:].shape, generator=gen)
        sd[wi], sd[bi] = w_in, b_in
        nxt = keys[i + 1]
        sd[nxt] = sd[nxt][:, pick] / count[pick]
    arch = ",".join(str(n) for n in new)
    out = build_student(arch, int(sd["scale.mean"].numel()), int(sd[keys[-1]].shape[0]),
                        sd["scale.mean"].numpy(), np.ones(sd["scale.mean"].numel(), np.float32))
    out.load_state_dict(sd)
    return out, arch


def grow(student: torch.nn.Module, budget_flops: float,
         seed: int = 0) -> tuple[torch.nn.Module, str, float] | None:
    """The challenger one size up: ``student`` widened by GROW_FACTOR
    (``widen``), less if that would cost more than ``budget_flops`` per row (the
    --student-budget the cold search obeyed). (module, arch, FLOPs per row), or None when
    there is no room (at least MIN_GROW x wider) or the student is not a vector MLP. FLOPs
    by formula (``mlp_flops``, what FlopCounterMode counts): counting them with the counter
    imports ~1 s of torch, out of the fine-tune's budget."""
    from titans.models.student_search import mlp_flops

    all_widths = _mlp_widths(student.state_dict())
    if all_widths is None or len(all_widths) < 3:  # not a vector MLP, or no hidden layer
        return None
    dim, widths, classes = all_widths[0], list(all_widths[1:-1]), all_widths[-1]

    def flops(f: float) -> int:
        return mlp_flops(dim, _widened(widths, f), classes)

    factor = min(GROW_FACTOR, budget_flops / max(1, mlp_flops(dim, tuple(widths), classes)))
    while factor >= MIN_GROW and flops(factor) > budget_flops:
        factor *= 0.97  # the output layer: a little more than linear in the width
    if factor < MIN_GROW:
        return None
    wide = widen(student, factor, seed)
    return None if wide is None else (wide[0], wide[1], float(flops(factor)))


def vector_flops(student: torch.nn.Module) -> float | None:
    """FLOPs per row of a vector student (``StandardizedMLP``) by formula (``mlp_flops``, what
    FlopCounterMode counts: counting them imports torch._dynamo, ~1 s); None for another
    model."""
    from titans.models.student_search import mlp_flops

    widths = _mlp_widths(student.state_dict())
    return None if widths is None else float(mlp_flops(widths[0], widths[1:-1], widths[-1]))


def _widened(widths, factor: float) -> tuple[int, ...]:
    """Hidden widths ``factor`` x wider, each at least one unit more (``widen``'s sizes)."""
    return tuple(max(w + 1, int(math.ceil(factor * w))) for w in widths)


def _weight_keys(sd: dict) -> list[str]:
    """A StandardizedMLP's linear layers' weight keys, input layer first."""
    return sorted((k for k in sd if k.startswith("mlp.net.") and k.endswith(".weight")),
                  key=lambda k: int(k.split(".")[2]))


def _mlp_widths(sd: dict) -> tuple[int, ...] | None:
    """(input, hidden..., output) widths of a StandardizedMLP's state dict, else None."""
    keys = _weight_keys(sd)
    if "scale.mean" not in sd or not keys:
        return None
    return (int(sd[keys[0]].shape[1]), *(int(sd[k].shape[0]) for k in keys))


def fine_tune_seconds(history: list[dict]) -> float:
    """The warm distil phase's wall-clock budget up to the fine-tune's end: FINE_TUNE_SECONDS,
    and at most COLD_DISTIL_SHARE of the distil phase of the newest cold run in ``history``
    (the state's runs), so a warm distil phase is cheaper than the cold one by construction,
    on any machine (what follows the fine-tune, two students scored on the validation rows
    and one saved, takes tens of milliseconds)."""
    cold = [e for e in history if e.get("mode") == "cold"]
    seconds = ((cold[-1].get("phase_seconds") or {}).get("distil") if cold else None)
    if not seconds or seconds <= 0:
        return FINE_TUNE_SECONDS
    return min(FINE_TUNE_SECONDS, COLD_DISTIL_SHARE * float(seconds))


# what a warm run does after its fine-tune and a cold run does not, or does for fewer rows:
# two students scored and saved, a larger pool written with the state (benchmarks/continual.py:
# a warm day's state commit ~0.2 s, the cold day's ~0.1 s)
WARM_TAIL_SECONDS = 0.3


def fine_tune_end(history: list[dict]) -> float | None:
    """Seconds from the job's start by which a warm run's fine-tune must end: when the newest
    cold run's distil phase ended (its job wall time less its calibrate and cascade phases),
    less WARM_TAIL_SECONDS. A warm run pays things before its fine-tune that a cold run pays
    inside its distil phase, or not at all (the state read, drift, scipy.stats imported to
    size the sample), so a cap on the distil phase alone (``fine_tune_seconds``) did not keep
    it from being slower than the cold run once cold runs got faster; this one does, whatever
    came before. None without the cold run's times."""
    cold = [e for e in history if e.get("mode") == "cold"]
    if not cold:
        return None
    wall, phases = cold[-1].get("job_wall_seconds"), cold[-1].get("phase_seconds") or {}
    after = [phases.get(name) for name in ("calibrate", "cascade")]
    if not isinstance(wall, (int, float)) or not all(isinstance(v, (int, float)) for v in after):
        return None
    return float(wall) - sum(after) - WARM_TAIL_SECONDS


def row_weights(hard: np.ndarray, age: np.ndarray, after_shift: bool) -> np.ndarray:
    """Fine-tune weights of the pool rows: HARD_WEIGHT for hard rows, and after a shift
    SHIFT_DECAY per run of ``age`` (0: the previous run)."""
    w = np.where(np.asarray(hard, bool), HARD_WEIGHT, 1.0)
    return w * SHIFT_DECAY ** np.asarray(age, np.float64) if after_shift else w


# the cold search sizes the student on day 1's sample; the pool it learns from grows every run,
# and a shift's new rows need more capacity still (the pool holds the old stream too): on every
# warm run the challenger is one size up, within --student-budget (champion / challenger counts
# its FLOPs). benchmarks/continual.py, stationary stream, teacher share on runs 3, 4, 5: --seed 0
# widened only after a shift 25.5, 28.9, 26.7%, on every run 20.2, 19.3, 22.0%; --seed 1 21.8,
# 22.2, 21.6% against 22.0, 18.7, 17.4% (38 -> 76 -> 111 units, the budget's cap); --seed 2
# called a shift on run 2 and widened from there either way.
# benchmarks/continual.py, day 3's state fine-tuned on the shifted day 4 (day 4's on day 5), 1,000
# steps, rows outside the sample needing the teacher (mean of 4 draws): the 38-unit student
# 28.3% (28.2%), widened to 76 units 23.9% (24.7%), to 114 23.4% (23.0%); trained on 4,000 more
# of today's rows the 38-unit student still needed 23.2%, a fresh 128-unit one 14.4%. On the run
# after the shift, day 4's 76-unit student widened to 114 and fine-tuned 2,000 steps needed
# 17.5% / 15.9% (--seed 0 / 1) against 19.4% / 17.0% at 76 units
GROW_FACTOR, MIN_GROW = 2.0, 1.25

SMOOTH_BARS = (1, 2, 3, 4)  # champion / challenger: deferral needed at these multiples of the bar
KL_SLACK = 3               # a challenger closer to the teacher may need up to this many rows more


def score(student: torch.nn.Module, x_val: np.ndarray, teacher_val_pred: np.ndarray,
          target: Target, rules=CONFIDENCE_RULES, audit_rate: float = 0.0,
          flops_share: float = 0.0, teacher_val_probs: np.ndarray | None = None) -> Candidate:
    """A student's cascade on today's validation rows: agreement, best rule, teacher share;
    ``smooth`` (set on the Candidate): the mean deferral needed at SMOOTH_BARS x the bar;
    ``kl`` (with ``teacher_val_probs``, else None): the mean KL(teacher || student) at T=1."""
    from titans.models.student_search import deferral_needed

    logits = forward_in_chunks(student, np.asarray(x_val), 65536)
    c = Candidate((), 0.0, flops_share, 0, 0.0)
    c = score_candidate(c, logits, np.asarray(teacher_val_pred), target, rules, audit_rate)
    c.kl = None
    if teacher_val_probs is not None and len(logits):
        p = torch.as_tensor(np.asarray(teacher_val_probs, np.float32))
        p = p / p.sum(dim=-1, keepdim=True)
        c.kl = float(losses.student_disagreement(logits.float(), p).mean())
    c.cost = 0.0  # the student's own compute, in teacher units: compared with a deferral only
    if target.bar is None or target.bar < 0:
        c.smooth = c.objective
        return c
    c.cost = flops_share
    probs = torch.softmax(logits.float(), dim=-1)
    scores = make_rule(c.rule).score(probs).numpy()
    disagree = probs.argmax(dim=-1).numpy() != np.asarray(teacher_val_pred)
    c.smooth = float(np.mean([deferral_needed(scores, disagree, k * max(target.bar, 1e-9))
                              for k in SMOOTH_BARS]))
    return c


def champion_challenger(champion: Candidate, challenger: Candidate, n_val: int) -> str:
    """"challenger" when it is better than the champion on today's validation rows, else
    "champion" (ties keep yesterday's student). Better: it needs fewer teacher rows by more
    than one row's worth, on the deferral averaged over a few bars (``score``'s ``smooth``:
    at the LTT bar alone a few hundred validation rows allow about one disagreement); or,
    with ``kl`` on both, it is closer to the teacher (lower KL) and needs no more than
    KL_SLACK rows' worth more. Why the KL: it is measured on every validation row, not on the
    few the bar turns on, so it is far less noisy. On benchmarks/continual.py (day 4 of the
    state against day 5's rows, 10 draws of the sample each, the truth measured on the ~10,000
    rows outside the sample) the KL alone picked the student that truly needed fewer teacher
    rows in 20 of 20 draws, the smoothed deferral in 18; the benchmark's own day 5 (shift) had kept
    a champion that needed 35% of the rows outside the sample at the teacher against the
    challenger's 31%."""
    # a wider challenger also pays its compute on every row, as in the cold search's objective
    a, b = (getattr(champion, "smooth", champion.objective) + getattr(champion, "cost", 0.0),
            getattr(challenger, "smooth", challenger.objective) + getattr(challenger, "cost", 0.0))
    step = 1.0 / max(1, n_val)
    if b < a - step:
        return "challenger"
    ka, kb = getattr(champion, "kl", None), getattr(challenger, "kl", None)
    if ka is not None and kb is not None and kb < ka and b <= a + KL_SLACK * step:
        return "challenger"
    return "champion"


def rule_scores(student: torch.nn.Module, x: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(deferral scores under ``rule``, argmax) of ``student`` on the rows ``x``."""
    probs = torch.softmax(forward_in_chunks(student, np.asarray(x), 65536).float(), dim=-1)
    return make_rule(rule).score(probs).numpy(), probs.argmax(dim=-1).numpy()


@dataclasses.dataclass
class Drift:
    agreement: float                 # yesterday's student on today's fresh rows
    reference: float | None          # its agreement on yesterday's held-out rows
    agreement_drop: float | None
    ks_statistic: float | None       # its deferral scores, today's rows vs yesterday's
    ks_pvalue: float | None
    shifted: bool

    def record(self) -> dict:
        def r(v):
            return None if v is None else round(float(v), 6)
        return {"fresh_agreement": r(self.agreement), "reference_agreement": r(self.reference),
                "agreement_drop": r(self.agreement_drop), "ks_statistic": r(self.ks_statistic),
                "ks_pvalue": None if self.ks_pvalue is None else float(f"{self.ks_pvalue:.3g}"),
                "shifted": bool(self.shifted)}


def drift(agree_today: np.ndarray, reference: float | None, scores_today: np.ndarray,
          scores_before: np.ndarray | None) -> Drift:
    """Drift of today's rows as yesterday's student sees them: its agreement with the teacher
    on them (``agree_today``, a boolean per fresh row) against ``reference``, and a two-sample
    KS test of its scores today against ``scores_before`` (yesterday's held-out rows; None or
    empty: no test). Shifted: the KS p-value below DRIFT_P with a statistic of at least
    DRIFT_KS, or an agreement drop beyond both DRIFT_DROP and three standard errors."""
    agree_today = np.asarray(agree_today, bool)
    agreement = float(agree_today.mean()) if agree_today.size else float("nan")
    drop = None if reference is None else float(reference) - agreement
    ks, pv, scores_moved = scores_shift(scores_today, scores_before)
    se = math.sqrt(max(agreement * (1 - agreement), 1e-6) / max(1, agree_today.size))
    shifted = bool(scores_moved or (drop is not None and drop > max(DRIFT_DROP, 3 * se)))
    return Drift(agreement, reference, drop, ks, pv, shifted)


def scores_shift(scores_today: np.ndarray, scores_before: np.ndarray | None
                 ) -> tuple[float | None, float | None, bool]:
    """(KS statistic, p-value, shifted) of a two-sample KS test of a student's deferral
    scores on today's rows against ``scores_before``; (None, None, False) with fewer than 20
    rows on a side. Shifted: p below DRIFT_P with a statistic of at least DRIFT_KS."""
    from scipy.stats import ks_2samp

    if scores_before is None or len(scores_before) < 20 or len(scores_today) < 20:
        return None, None, False
    res = ks_2samp(np.asarray(scores_today, np.float64), np.asarray(scores_before, np.float64))
    ks, pv = float(res.statistic), float(res.pvalue)
    return ks, pv, bool(pv < DRIFT_P and ks >= DRIFT_KS)


__all__ = ["fine_tune", "score", "champion_challenger", "row_weights", "widen", "grow",
           "fine_tune_seconds", "rule_scores", "drift", "scores_shift", "Drift", "Target"]

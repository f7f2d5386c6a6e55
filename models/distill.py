"""Train students (and demo teachers): a loop you can read top to bottom, CPU, seeded.

    teacher = make_student("256,256", D, K, "kd"); train_supervised(teacher, X, y, ...)
    student = make_student("linear", D, K, "easy", seed=0)
    history = distill(student, X, teacher_probs, method="easy", target_deferral=0.2, ...)

Methods (losses in ``titans.models.losses``):
  kd     Hinton distillation from the teacher's probabilities (+ CE on labels when given)
  easy   kd with cascade-aware per-row weights, re-estimated every epoch from the current student
  defer  learning to defer: K+1 outputs, the last means "ask the teacher" (read by DeferHead)

Determinism: the same seed gives the same weights: a seeded torch.Generator of its own shuffles
the rows, and anything that draws from torch's global generator (dropout) runs in a forked
one seeded with the seed, so the caller's global random state is neither used nor changed.
Token students (``make_token_student``, a ``TokenMLP``) train on int64 token ids [N, L], never
cast to float; every other student on float32 features.
The returned module is an ``MLP`` (or ``TokenMLP``) in eval mode, so ``titans.models.loading.save_torchscript``
can script it.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from titans.models import defaults, losses
from titans.models.architectures import MLP, StandardizedMLP, TokenMLP, parse_hidden
from titans.models.defaults import METHODS
from titans.models.forward import forward_in_chunks
from titans.models.optim import AdamW, OneCycle

log = logging.getLogger(__name__)


def make_student(arch: str | tuple[int, ...], in_features: int, num_classes: int, method: str = "kd",
                 seed: int | None = None) -> nn.Module:
    """An MLP with hidden widths ``arch`` ("linear", "32", "64,64" or a tuple); K+1 outputs for 'defer'."""
    _check_method(method)
    hidden = parse_hidden(arch) if isinstance(arch, str) else tuple(int(h) for h in arch)
    if in_features <= 0 or num_classes < 2:
        raise ValueError(f"need in_features > 0 and num_classes >= 2, got {in_features}, {num_classes}")
    with torch.random.fork_rng(enabled=seed is not None):  # seeded init without touching global state
        if seed is not None:
            torch.manual_seed(seed)
        return MLP(in_features, num_classes + (method == "defer"), hidden)


STD_FLOOR = 0.5  # of the median feature's std (feature_stats)


def feature_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature of the rows ``X`` [N, ...] (flattened), float32: what
    ``build_student`` bakes in. Computed in float64 so large offsets do not lose digits."""
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    std = X.std(axis=0)
    # a near-constant feature (an image's border pixel) is not blown up into noise: no std
    # below STD_FLOOR x the median feature's
    positive = std[std > 0]
    floor = STD_FLOOR * float(np.median(positive)) if positive.size else 0.0
    return X.mean(axis=0).astype(np.float32), np.maximum(std, floor).astype(np.float32)


def build_student(arch: str | tuple[int, ...], in_features: int, num_classes: int, mean, std,
                  method: str = "kd", seed: int | None = None) -> nn.Module:
    """A ``StandardizedMLP``: ``(x - mean) / std`` per feature, then the MLP of ``make_student``
    (same widths, same seeded initialisation). `titans label`'s vector student: standardised
    inputs let one learning-rate schedule fit features of any scale, and the saved TorchScript
    file carries mean and std, so it reads raw rows like any other student."""
    _check_method(method)
    hidden = parse_hidden(arch) if isinstance(arch, str) else tuple(int(h) for h in arch)
    if in_features <= 0 or num_classes < 2:
        raise ValueError(f"need in_features > 0 and num_classes >= 2, got {in_features}, {num_classes}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return StandardizedMLP(in_features, num_classes + (method == "defer"), hidden, mean, std)


def make_token_student(embed_dim: int, hidden: tuple[int, ...], vocab: int, num_classes: int,
                       pad_id: int = 0, seed: int | None = None) -> nn.Module:
    """A ``TokenMLP`` (kd outputs: ``num_classes``) over token ids below ``vocab``."""
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2, got {num_classes}")
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return TokenMLP(vocab, num_classes, embed_dim, tuple(int(h) for h in hidden), pad_id)


def train_supervised(model: nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int = 30,
                     lr: float = 1e-3, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                     val: tuple[np.ndarray, np.ndarray] | None = None, progress: bool = True) -> list[dict]:
    """Cross-entropy on labels (the demo's teacher and the plain student). Returns per-epoch history."""
    ids = isinstance(model, TokenMLP)
    Xt, yt = _features(X, ids), _labels(y, len(X))
    val_t = None if val is None else (_features(val[0], ids), _labels(val[1], len(val[0])))

    def step(idx):
        return nn.functional.cross_entropy(model(Xt[idx]), yt[idx])  # -log softmax(f(x))_y

    def evaluate():
        if val_t is None:
            return {"val_accuracy": None}
        pred = _logits(model, val_t[0]).argmax(dim=-1)
        return {"val_accuracy": float((pred == val_t[1]).float().mean())}

    return _loop(model, len(Xt), step, evaluate, epochs=epochs, lr=lr, batch_size=batch_size,
                 weight_decay=weight_decay, seed=seed, progress=progress, desc="supervised")


def distill(student: nn.Module, X: np.ndarray, teacher_probs: np.ndarray, *,
            labels: np.ndarray | None = None, method: str = "kd",
            target_deferral: float = defaults.TARGET_DEFERRAL,
            temperature: float = defaults.TEMPERATURE, alpha: float = defaults.ALPHA,
            defer_alpha: float = 1.0, floor: float = losses.FLOOR, epochs: int = defaults.EPOCHS,
            lr: float = defaults.LR, batch_size: int = defaults.TRAIN_BATCH_SIZE,
            weight_decay: float = 1e-4, seed: int = 0,
            val: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
            progress: bool = True) -> list[dict]:
    """Train ``student`` from the teacher's probabilities with ``method``; returns per-epoch history.

    ``alpha`` mixes CE on labels into kd/easy; ``defer_alpha`` is Mozannar & Sontag's alpha for
    'defer'. ``target_deferral`` is R: the share of rows the cascade will send to the teacher
    ('easy' down-weights that share of rows, 'defer' caps its soft deferral rate at it).
    For 'easy' the weights are re-estimated at the start of every epoch from the student as it
    is then, over all of X (so epoch 0 uses the freshly initialised student).
    History rows: epoch, train_loss, val_agreement, val_accuracy (None without validation
    labels), plus downweighted_share ('easy') or val_defer_rate (share of validation rows where
    the defer output wins the argmax, 'defer').
    """
    _check_method(method)
    ids = isinstance(student, TokenMLP)  # token ids stay int64
    Xt = _features(X, ids)
    n = len(Xt)
    P = _probs(teacher_probs, n, "teacher_probs")
    yt = None if labels is None else _labels(labels, n)
    k = P.shape[1]
    out = _logits(student, Xt[:1]).shape[1]
    if out != k + (method == "defer"):
        raise ValueError(f"student has {out} outputs; method {method!r} with {k} classes needs "
                         f"{k + (method == 'defer')} (make it with make_student(..., method={method!r}))")
    if not 0.0 <= target_deferral <= 1.0:
        raise ValueError(f"target_deferral must be in [0, 1], got {target_deferral}")
    teacher_pred = P.argmax(dim=-1)
    target = teacher_pred if yt is None else yt  # defer's y: the label, or the teacher's answer
    val_t = None
    if val is not None:
        Xv = _features(val[0], ids)
        val_t = (Xv, _probs(val[1], len(Xv), "val teacher_probs").argmax(dim=-1),
                 None if val[2] is None else _labels(val[2], len(Xv)))
    weights = torch.ones(n)
    state = {"hard_share": None}

    def on_epoch_start(epoch):
        if method != "easy":
            return
        # re-estimate who is hard for the student as it is now, over the whole training set
        w, hard = losses.easy_weights(_logits(student, Xt), P, labels=yt,
                                      hard_fraction=target_deferral, floor=floor)
        weights.copy_(w)
        state["hard_share"] = float(hard.float().mean())

    def step(idx):
        s = student(Xt[idx])
        lab = None if yt is None else yt[idx]
        if method == "kd":
            return losses.kd_loss(s, P[idx], temperature, lab, alpha)
        if method == "easy":
            return losses.easy_loss(s, P[idx], weights[idx], temperature, lab, alpha)
        return losses.defer_loss(s, teacher_pred[idx], target[idx], defer_alpha,
                                 target_deferral=target_deferral)

    def evaluate():
        row = {"val_agreement": None, "val_accuracy": None}
        if method == "easy":
            row["downweighted_share"] = state["hard_share"]
        if val_t is None:
            return row
        logits = _logits(student, val_t[0])
        pred = logits[:, :k].argmax(dim=-1)
        row["val_agreement"] = float((pred == val_t[1]).float().mean())
        if val_t[2] is not None:
            row["val_accuracy"] = float((pred == val_t[2]).float().mean())
        if method == "defer":
            row["val_defer_rate"] = float((logits.argmax(dim=-1) == k).float().mean())
        return row

    return _loop(student, n, step, evaluate, epochs=epochs, lr=lr, batch_size=batch_size,
                 weight_decay=weight_decay, seed=seed, progress=progress, desc=method,
                 on_epoch_start=on_epoch_start)


PCT_START = 0.15  # share of a one-cycle schedule spent warming up to the peak learning rate


def distill_together(students: list[nn.Module], X: np.ndarray, teacher_probs: np.ndarray, *,
                     val: tuple[np.ndarray, np.ndarray], epochs: int, batch_size: int, lr: float,
                     temperature: float, weight_decay: float = 1e-4, seed: int = 0,
                     patience: int | None = None, deadline: float | None = None) -> list[dict]:
    """Distil several students at once with kd on the teacher's probabilities (no labels).

    One shuffled pass over the rows per epoch serves every student (each minibatch is gathered
    once), and one AdamW with a one-cycle learning rate (peak ``lr``) steps all of them on the
    sum of their kd losses: AdamW's state is per parameter, so each student gets exactly the
    update it would get alone. After every epoch each student's argmax agreement with
    ``val`` = (rows, teacher's answers) is measured; a student keeps the weights of its best
    epoch and stops training after ``patience`` epochs without a better one, counted from
    half-way through the schedule (None: never).
    All stop at ``deadline`` (a ``time.monotonic()`` value; None: none), so when the deadline
    hits, the result depends on the machine's speed; otherwise it is seeded.
    Returns per student: epochs trained, best_epoch (1-based), val_agreement there, and
    ``stopped``: "converged" (patience), "schedule" (all epochs) or "time budget".
    """
    if not students:
        return []
    if epochs < 1 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0, temperature > 0; got "
                         f"{epochs}, {batch_size}, {lr}, {temperature}")
    ids = isinstance(students[0], TokenMLP)
    Xt = _features(X, ids)
    n = len(Xt)
    P = _probs(teacher_probs, n, "teacher_probs")
    # the softened targets once, not per step; CE against them has KL's gradient
    target = losses.soften(P, temperature)
    Xv, yv = _features(val[0], ids), torch.as_tensor(np.asarray(val[1]), dtype=torch.int64)
    params = [p for m in students for p in m.parameters()]
    opt = AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = OneCycle(opt, max_lr=lr, total_steps=epochs * -(-n // batch_size), pct_start=PCT_START)
    gen = torch.Generator().manual_seed(seed)
    state = [{"epochs": 0, "best_epoch": 0, "val_agreement": -1.0, "stopped": "schedule",
              "best": None, "stale": 0} for _ in students]
    active = list(range(len(students)))
    # one-cycle gains most while the learning rate comes down: no early stop before half-way
    settle = epochs // 2
    t2 = temperature ** 2  # keeps the gradient scale independent of T (Hinton et al.)
    with torch.random.fork_rng(devices=[]):  # dropout, if any, draws from a seeded fork
        torch.manual_seed(seed)
        for epoch in range(epochs):
            for i in active:
                students[i].train()
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                xb, pb = Xt[idx], target[idx]
                loss = sum(nn.functional.cross_entropy(students[i](xb) / temperature, pb)
                           for i in active) * t2
                opt.zero_grad()  # a stopped student's grads stay None: no step
                loss.backward()
                opt.step()
                sched.step()
            for i in list(active):
                st = state[i]
                st["epochs"] = epoch + 1
                agreement = float((_logits(students[i], Xv).argmax(-1) == yv).float().mean())
                if agreement > st["val_agreement"]:
                    st.update(val_agreement=agreement, best_epoch=epoch + 1, stale=0,
                              best={k: v.clone() for k, v in students[i].state_dict().items()})
                elif epoch >= settle:  # not earlier: at high learning rates agreement wanders
                    st["stale"] += 1
                    if patience is not None and st["stale"] >= patience:
                        st["stopped"] = "converged"
                        active.remove(i)
            if not active:
                break
            if deadline is not None and time.monotonic() >= deadline:
                for i in active:
                    state[i]["stopped"] = "time budget"
                break
    out = []
    for m, st in zip(students, state):
        if st["best"] is not None:
            m.load_state_dict(st.pop("best"))
        m.eval()
        st.pop("best", None)
        st.pop("stale")
        out.append(st)
    return out


def _loop(model, n, step, evaluate, *, epochs, lr, batch_size, weight_decay, seed, progress, desc,
          on_epoch_start=None) -> list[dict]:
    """Shared minibatch loop: AdamW, a seeded shuffle per epoch, one log line per epoch."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    gen = torch.Generator().manual_seed(seed)  # the shuffles
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    # dropout draws from the global generator: seed a fork of it, restored on the way out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in bar:
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            model.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                loss = step(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            row = {"epoch": epoch, "train_loss": total / n, **evaluate()}
            history.append(row)
            line = f"{desc} epoch {epoch + 1}/{epochs} " + " ".join(
                f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
            if progress:
                bar.write(line)
            else:
                log.info(line)
    model.eval()
    return history


def _logits(model: nn.Module, X: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Forward in eval mode without gradients, in chunks; leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        return forward_in_chunks(model, X.numpy(), chunk)
    finally:
        model.train(was_training)


def _features(X, ids: bool = False) -> torch.Tensor:
    """float32 features, or with ``ids`` int64 token ids (a token student's input)."""
    X = np.asarray(X)
    if X.ndim < 2 or len(X) == 0:  # [N, D] features, [N, C, H, W] images or [N, L] token ids
        raise ValueError(f"X must be a non-empty array [N, ...], got shape {X.shape}")
    if ids and not np.issubdtype(X.dtype, np.integer):
        raise ValueError(f"a token student takes integer token ids, got {X.dtype}")
    # a copy: training must not alias (possibly read-only) Arrow buffers
    return torch.from_numpy(np.array(X, dtype=np.int64 if ids else np.float32, order="C",
                                     copy=True))


def _labels(y, n: int) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _probs(P, n: int, what: str) -> torch.Tensor:
    P = np.asarray(P, dtype=np.float32)
    if P.ndim != 2 or len(P) != n:
        raise ValueError(f"{what} must be [{n}, K], got shape {P.shape}")
    if np.any(P < 0) or not np.allclose(P.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{what} must be probabilities (non-negative rows summing to 1)")
    return torch.from_numpy(P)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {METHODS}")

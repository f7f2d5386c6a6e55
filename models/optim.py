"""AdamW and the one-cycle schedule, as torch.optim computes them, in a few tensor ops.

Why not torch.optim: constructing any torch.optim optimizer imports torch._dynamo, ~0.8 s of
a process that trains for 2-3 s (`titans label`'s student search, a warm run's fine-tune).
tests/test_optim.py checks both against torch.optim.AdamW with OneCycleLR.
"""
from __future__ import annotations

import math

import torch


class AdamW:
    """torch.optim.AdamW's update: decoupled weight decay, bias-corrected moments. ``lr`` and
    ``betas`` may be changed between steps (``OneCycle``). A parameter without a gradient is
    not stepped."""

    def __init__(self, params: list, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd = list(params), lr, weight_decay
        self.betas, self.eps = betas, eps
        self.m = [torch.zeros_like(q) for q in self.params]
        self.v = [torch.zeros_like(q) for q in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for q in self.params:
            q.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for q, m, v in zip(self.params, self.m, self.v):
            if q.grad is None:
                continue
            q.mul_(1 - self.lr * self.wd)
            m.mul_(b1).add_(q.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(q.grad, q.grad, value=1 - b2)
            q.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


class OneCycle:
    """torch.optim.lr_scheduler.OneCycleLR's defaults (two cosine phases, the first
    ``pct_start`` of the steps up from max_lr / 25 to ``max_lr``, then down to max_lr / 25e4;
    beta1 the other way, 0.95 -> 0.85 -> 0.95) applied to an ``AdamW``: ``step()`` after every
    optimizer step, as with torch's."""

    DIV, FINAL_DIV, MOMENTUM = 25.0, 1e4, (0.85, 0.95)

    def __init__(self, opt: AdamW, max_lr: float, total_steps: int, pct_start: float = 0.3):
        self.opt, self.total = opt, total_steps
        first = max_lr / self.DIV
        low, high = self.MOMENTUM
        self.phases = ((float(pct_start * total_steps) - 1, first, max_lr, high, low),
                       (total_steps - 1, max_lr, first / self.FINAL_DIV, low, high))
        self.step_num = 0
        self._apply()

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def _apply(self) -> None:
        if self.step_num > self.total:
            raise ValueError(f"OneCycle stepped {self.step_num} times, past its {self.total} steps")
        start = 0.0
        for i, (end, lr0, lr1, b0, b1) in enumerate(self.phases):
            if self.step_num <= end or i == len(self.phases) - 1:
                pct = (self.step_num - start) / (end - start)
                self.opt.lr = _cos(lr0, lr1, pct)
                self.opt.betas = (_cos(b0, b1, pct), self.opt.betas[1])
                return
            start = end


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

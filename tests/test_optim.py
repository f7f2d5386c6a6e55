"""models/optim.py against torch.optim: the same parameters after the same steps."""
import pytest
import torch

from titans.models.optim import AdamW, OneCycle


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(model, step_fn, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        for q in model.parameters():
            q.grad = None
        loss.backward()
        step_fn()


@pytest.mark.parametrize("pct_start", [0.15, 0.3])
def test_adamw_with_one_cycle_steps_as_torch_does(pct_start):
    steps, lr = 60, 0.05
    ours, theirs = _mlp(0), _mlp(0)
    opt = AdamW(ours.parameters(), lr=lr, weight_decay=1e-4)
    sched = OneCycle(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    topt = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=1e-4)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=lr, total_steps=steps,
                                                 pct_start=pct_start)
    lrs = []

    def step_ours():
        lrs.append((opt.lr, opt.betas[0]))
        opt.step()
        sched.step()

    def step_theirs():
        group = topt.param_groups[0]
        lrs_theirs.append((group["lr"], group["betas"][0]))
        topt.step()
        tsched.step()

    lrs_theirs = []
    _train(ours, step_ours, steps)
    _train(theirs, step_theirs, steps)
    assert [v for pair in lrs for v in pair] == pytest.approx(
        [v for pair in lrs_theirs for v in pair], rel=1e-9)
    assert max(lr for lr, _ in lrs) == pytest.approx(lr)  # the schedule did go up and down
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="past its 60 steps"):
        sched.step()


def test_a_parameter_without_a_gradient_is_not_stepped():
    model = _mlp(0)
    frozen = [q.detach().clone() for q in model[0].parameters()]
    opt = AdamW(model[2].parameters(), lr=0.1, weight_decay=0.1)
    opt.params = list(model.parameters())  # every parameter known, only the last layer's grads
    opt.m = [torch.zeros_like(q) for q in opt.params]
    opt.v = [torch.zeros_like(q) for q in opt.params]
    x = torch.randn(4, 8)
    model[2](model[1](model[0](x).detach())).sum().backward()
    opt.step()
    for a, b in zip(model[0].parameters(), frozen):
        assert torch.equal(a, b)

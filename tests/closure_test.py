"""wrap_first_call: the closure's first evaluation is observed once, and the optimizer's steps are unchanged."""

from __future__ import annotations

import torch

from stepaudit.closure import wrap_first_call


def lbfgs_run(wrap: bool, as_keyword: bool = False) -> tuple[torch.Tensor, list, list, list]:
    """Three LBFGS steps of a small regression; with ``wrap``, the closure is wrapped by a step pre-hook."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    evaluated, seen, starts = [], [], []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        evaluated.append((loss.detach().clone(), model.weight.grad.clone()))
        return loss

    def first(loss):
        seen.append((len(evaluated), loss.detach().clone(), model.weight.grad.clone()))

    if wrap:
        opt.register_step_pre_hook(lambda optimizer, args, kwargs: wrap_first_call(args, kwargs, first))
    for _ in range(3):
        starts.append(len(evaluated))
        opt.step(closure=closure) if as_keyword else opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), evaluated, seen, starts


def test_lbfgs_is_bit_identical_and_the_first_evaluation_is_seen_once_per_step():
    plain, plain_evaluated, _, _ = lbfgs_run(wrap=False)
    for as_keyword in (False, True):
        weights, evaluated, seen, starts = lbfgs_run(wrap=True, as_keyword=as_keyword)
        assert torch.equal(weights, plain)
        assert len(evaluated) == len(plain_evaluated) > 3  # several evaluations per step
        assert all(torch.equal(a[0], b[0]) for a, b in zip(evaluated, plain_evaluated))
        assert [count for count, _, _ in seen] == [start + 1 for start in starts]  # once, right after the first
        for (_, loss, grad), start in zip(seen, starts):
            assert torch.equal(loss, evaluated[start][0]) and torch.equal(grad, evaluated[start][1])


def test_without_a_closure_nothing_changes():
    args, kwargs = (object(),), {"other": 1}
    assert wrap_first_call(args, kwargs, lambda loss: None) == (args, kwargs)

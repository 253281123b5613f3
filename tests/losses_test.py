"""LossEvaluator: the before/after losses and their rounding noise, against separate recomputations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepaudit.context import Part, StepContext
from stepaudit.losses import LossEvaluator
from stepaudit.precision import TWIN_KEY, Float64Twin, shared_twin
from stepaudit.state import AutocastState, RngState


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def setup(dropout: float = 0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
    batch = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    params = list(model.parameters())
    ctx = StepContext(
        step=0,
        model=model,
        optimizer=torch.optim.SGD(params, lr=0.1),
        loss_fn=loss_fn,
        parts=[Part(batch, RngState.capture([]))],
        autocast=AutocastState(),
        names=[n for n, _ in model.named_parameters()],
        params=params,
        before=[],
        grads=[],
    )
    return model, batch, params, ctx


def test_before_takes_the_training_loss_as_given():
    model, _, params, ctx = setup()
    assert LossEvaluator(model, loss_fn, params, None).before(ctx, torch.tensor(1.25)) == 1.25
    assert LossEvaluator(model, loss_fn, params, None).before(ctx, 0.5) == 0.5


def test_working_dtype_after_is_the_replayed_loss_and_training_rng_is_untouched():
    model, batch, params, ctx = setup(dropout=0.5)
    rng = ctx.parts[0].rng
    rng.apply()
    expected = float(loss_fn(model, batch))  # the same masks the training forward drew
    outside = torch.get_rng_state()
    after, noise, method = LossEvaluator(model, loss_fn, params, None).after(ctx, loss_before=expected)
    assert after == expected
    assert torch.equal(torch.get_rng_state(), outside)
    assert method == "measured" and 0 < noise < 1e-5 * abs(expected)


def test_float64_losses_match_a_float64_copy():
    model, batch, params, ctx = setup()
    oracle = copy.deepcopy(model).double()
    expected = float(F.cross_entropy(oracle(batch[0].double()), batch[1]))
    evaluator = LossEvaluator(model, loss_fn, params, "float64")
    assert evaluator.before(ctx, torch.tensor(123.0)) == pytest.approx(
        expected, rel=1e-15
    )  # the twin, not the float32 value
    after, noise, method = evaluator.after(ctx, loss_before=expected)
    assert after == pytest.approx(expected, rel=1e-15)
    assert method == "float64" and noise < 1e-13


def test_float64_losses_use_the_audits_one_shared_twin_loaded_with_the_live_weights():
    model, batch, params, ctx = setup()
    evaluator = LossEvaluator(model, loss_fn, params, "float64")
    evaluator.before(ctx)
    twin = ctx.states[TWIN_KEY]
    assert shared_twin(ctx) is twin  # the curvature probes' float64 HVPs get this same copy
    with torch.no_grad():
        params[0].add_(0.5)  # a step: the twin is loaded again before every evaluation
    oracle = copy.deepcopy(model).double()
    after, _, _ = evaluator.after(ctx, loss_before=0.0)
    assert after == pytest.approx(float(F.cross_entropy(oracle(batch[0].double()), batch[1])), rel=1e-15)
    assert ctx.states[TWIN_KEY] is twin and sum(isinstance(v, Float64Twin) for v in ctx.states.values()) == 1


def gradient_penalty_loss(model, batch):
    """A loss that differentiates inside (WGAN-GP, R1): it cannot be evaluated under torch.no_grad()."""
    x, y = batch
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return F.cross_entropy(out, y) + 0.1 * grad.pow(2).sum(1).mean()


@pytest.mark.parametrize("precision", [None, "float64"])
def test_a_loss_with_a_gradient_penalty_is_re_evaluated_with_grad_mode_on(precision, tmp_path):
    import stepaudit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    batch = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    with stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        gradient_penalty_loss,
        run=tmp_path / "r",
        precision=precision,
    ) as audit:
        audit.step(batch)
        audit.step(batch)
    oracle = copy.deepcopy(model)
    if precision == "float64":
        oracle, batch = oracle.double(), (batch[0].double(), batch[1])
    expected = float(gradient_penalty_loss(oracle, batch))
    assert audit.last["verdict"] != "error"
    assert audit.last["loss_after"] == pytest.approx(expected, rel=1e-6 if precision is None else 1e-12)

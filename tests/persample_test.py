"""stepaudit.persample (per-example statistics from layer identities) against a loop of single-example
backward passes, and its refusals (returns None so the caller falls back to vmap)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from stepaudit.noise import estimate, per_sample_moments
from stepaudit.persample import layer_moments

torch.set_default_dtype(torch.float32)


class Objective(nn.Module):
    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def classify(model, batch):
    out = model(batch[0])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))


class SeqNet(nn.Module):
    """Linear layers on a [B, T, features] input, LayerNorm between: the sequence (Gram/product) route."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, width), nn.LayerNorm(width), nn.Linear(width, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def conv2d_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, stride=(1, 2), dilation=(2, 1)),
        nn.BatchNorm2d(5),
        nn.ReLU(inplace=True),
        nn.Conv2d(5, 3, 2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    net(torch.randn(2, 2, 6, 6))  # materialise the lazy layer
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()  # BatchNorm with running statistics: per-example gradients are defined


CASES = {
    "mlp-inplace-relu": (
        lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)),
        lambda g: (torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)),
    ),
    "sequence-gram": (
        lambda: SeqNet(16),  # T=3: T² < in·out → Gram route
        lambda g: (torch.randn(10, 3, 4, generator=g), torch.randint(0, 3, (10, 3), generator=g)),
    ),
    "sequence-product": (
        lambda: SeqNet(2),  # T=9: T² > in·out → explicit products
        lambda g: (torch.randn(10, 9, 4, generator=g), torch.randint(0, 3, (10, 9), generator=g)),
    ),
    "conv1d": (Conv1dNet, lambda g: (torch.randn(9, 2, 10, generator=g), torch.randint(0, 3, (9,), generator=g))),
    "conv2d-batchnorm-eval": (
        conv2d_net,
        lambda g: (torch.randn(11, 2, 6, 6, generator=g), torch.randint(0, 3, (11,), generator=g)),
    ),
    "mlp-wide-gram": (
        lambda: nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)
        ),  # B(in+out) ≤ 2·in·out: example Gram route
        lambda g: (torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)),
    ),
    "layernorm-2d": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
        lambda g: (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)),
    ),
    "batchnorm1d-eval": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval(),
        lambda g: (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)),
    ),
}


def setup(case: str, seed: int = 0):
    torch.manual_seed(seed)
    build, make = CASES[case]
    model = build()
    batch = make(torch.Generator().manual_seed(seed + 1))
    objective = Objective(model, classify)
    params = {"model." + n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p, b: functional_call(objective, dict(p), (b,))  # noqa: E731
    return model, batch, params, loss


def single_example_gradients(model, batch) -> torch.Tensor:
    rows = []
    for i in range(batch[0].shape[0]):
        model.zero_grad()
        classify(model, (batch[0][i : i + 1], batch[1][i : i + 1])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("vectors", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_moments_match_single_example_backward_passes(case, vectors):
    model, batch, params, loss = setup(case)
    # tiny budget: many chunks (vectors=False: big enough for the 6×6 Gram route, small for chunks)
    moments = layer_moments(model, loss, params, batch, groups=3, budget_bytes=2_000, vectors=vectors)
    assert moments is not None
    rows = single_example_gradients(model, batch)
    size = rows.shape[0]
    if vectors:
        assert torch.allclose(moments.mean_grad(), rows.mean(0), rtol=1e-4, atol=1e-6)
    else:
        assert moments.sums is None
    sums = torch.stack([rows[torch.arange(size) * 3 // size == k].sum(0) for k in range(3)])
    assert torch.allclose(moments.inner_products(), sums @ sums.T, rtol=1e-4, atol=1e-8)
    assert float(moments.sq.sum()) == pytest.approx(float((rows**2).sum()), rel=1e-4)
    est = estimate(moments, "per_sample")
    trace = float(torch.trace(torch.cov(rows.T)))
    assert est.trace_sigma == pytest.approx(trace, rel=1e-4)
    assert est.grad_sq_norm == pytest.approx(float(rows.mean(0) @ rows.mean(0)) - trace / size, rel=1e-3, abs=1e-6)
    # same groups as the vmap engine, so the jackknife errors agree too
    reference = estimate(per_sample_moments(loss, params, batch, groups=3), "per_sample")
    assert est.trace_sigma_stderr == pytest.approx(reference.trace_sigma_stderr, rel=1e-3)


def test_hooks_are_removed_and_model_untouched():
    model, batch, params, loss = setup("conv2d-batchnorm-eval")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer_moments(model, loss, params, batch)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))  # called twice: the identity for one call does not apply


class RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.layer(x) * self.scale


class DirectWeights(nn.Module):
    """Uses a Linear's weights without calling it (as MultiheadAttention does with out_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.bypassed = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(self.used(x), self.bypassed.weight, self.bypassed.bias)


@pytest.mark.parametrize(
    "build",
    [
        Tied,
        RawParameter,
        DirectWeights,
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
        lambda: nn.Sequential(nn.Unflatten(1, (3, 1)), nn.Conv1d(3, 3, 1, padding="same"), nn.Flatten()),
    ],
    ids=["called-twice", "raw-parameter", "weights-without-call", "batchnorm-train", "padding-same"],
)
def test_unsupported_models_are_refused(build):
    torch.manual_seed(0)
    model = build()
    objective = Objective(model, classify)
    params = {"model." + n: p.detach() for n, p in model.named_parameters()}
    batch = (torch.randn(6, 3), torch.randint(0, 3, (6,)))
    assert layer_moments(model, lambda p, b: functional_call(objective, dict(p), (b,)), params, batch) is None


def test_gram_route_runs_where_it_is_cheaper(monkeypatch):
    import stepaudit.persample as persample

    chosen = []
    original = persample._gram_route
    monkeypatch.setattr(persample, "_gram_route", lambda *a: chosen.append(original(*a)) or chosen[-1])
    model, batch, params, loss = setup("mlp-wide-gram")
    assert layer_moments(model, loss, params, batch, groups=3, vectors=False) is not None
    assert chosen == [True, True, False]  # 8→16 and 16→16 by example Grams; 16→3 by group sums


def test_gram_route_refuses_a_weight_used_outside_its_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):  # a's weight also used without calling a: the identities miss this term
            return self.b(torch.tanh(self.a(x))) + (x @ self.a.weight.T)[:, :3]

    torch.manual_seed(0)
    model = Tied()
    batch = (torch.randn(6, 8), torch.randint(0, 3, (6,)))
    objective = Objective(model, classify)
    params = {"model." + n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p, b: functional_call(objective, dict(p), (b,))  # noqa: E731
    assert layer_moments(model, loss, params, batch, vectors=False) is None
    assert layer_moments(model, loss, params, batch, vectors=True) is None


@pytest.mark.parametrize("case", list(CASES))
def test_single_group_gives_the_point_estimates_from_norms_alone(case):
    # groups=1: per-example squared norms only (BackPACK BatchL2Grad's statistics), no standard errors
    model, batch, params, loss = setup(case)
    moments = layer_moments(model, loss, params, batch, groups=1, vectors=False)
    assert moments is not None and moments.sums is None
    rows = single_example_gradients(model, batch)
    size = rows.shape[0]
    est = estimate(moments, "per_sample")
    trace = float(torch.trace(torch.cov(rows.T)))
    assert est.trace_sigma == pytest.approx(trace, rel=1e-4)
    assert est.grad_sq_norm == pytest.approx(float(rows.mean(0) @ rows.mean(0)) - trace / size, rel=1e-3, abs=1e-6)
    assert math.isnan(est.trace_sigma_stderr)


def test_single_group_still_refuses_a_weight_used_outside_its_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def tied(m, b):  # the first weight also enters the loss without calling its module
        return classify(m, b) + 0.1 * m[0].weight.pow(2).sum()

    objective = Objective(model, tied)
    batch = (torch.randn(6, 8), torch.randint(0, 3, (6,)))
    params = {"model." + n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p, b: functional_call(objective, dict(p), (b,))  # noqa: E731
    assert layer_moments(model, loss, params, batch, groups=1, vectors=False) is None

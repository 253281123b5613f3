"""stepaudit.lr_find: it leaves training bit-identical, and every number it reports matches an independent oracle.

Oracles: a quadratic 0.5·wᵀAw with A diagonal (λ_max = max A; SGD along the top eigenvector raises the loss
exactly when lr > 2/λ_max, α = λ·lr − 1 and g·Δw = −lr‖Aw‖² in closed form; for Adam λ_max(P⁻¹A) = max A_i/P_i
from the optimizer's own state, and on one coordinate Adam by hand gives every preconditioned gain m/g and
curvature a/P), hand-worked fastai suggestions on hand-made curves, a loop recomputing the
smoothed curve and the divergence stop, and a twin model that never saw lr_find.
"""

from __future__ import annotations

import copy
import math
import random
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from stepaudit import cli, lr_find
from stepaudit.lrfind import lr_grid
from stepaudit.lrfind_suggest import first_rise, minimum, slide, steep, stepaudit_rule, valley

A = torch.tensor([0.5, 3.0, 5.0, 1.0, 2.0, 0.1], dtype=torch.float64)  # λ_max = 5 (index 2)


class Quadratic(nn.Module):
    """0.5·wᵀ diag(A) w with w a float64 parameter (the batch is ignored)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())


def quadratic_loss(model: Quadratic, batch) -> torch.Tensor:
    return 0.5 * (model.w * A * model.w).sum()


def top_eigenvector() -> torch.Tensor:
    e = torch.zeros(6, dtype=torch.float64)
    e[2] = 1.0
    return e


class Net(nn.Module):
    """Linear, BatchNorm, Dropout: weights, running statistics and the dropout RNG all in play."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def net_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def net_batches(n: int = 60) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def trained(optimizer_cls, **kwargs):
    torch.manual_seed(0)
    model = Net()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    for batch in net_batches(3):
        optimizer.zero_grad()
        net_loss(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad()
    net_loss(model, net_batches(1)[0]).backward()  # leave a gradient in .grad: it must survive too
    return model, optimizer


def tensors_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach().clone() for t in model.parameters()] + [b.clone() for b in model.buffers()]
    out += [p.grad.clone() for p in model.parameters()]
    out += [v.clone() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize(
    "optimizer_cls,kwargs", [(torch.optim.Adam, {"lr": 1e-3}), (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})]
)
def test_everything_is_bit_identical_afterwards(optimizer_cls, kwargs):
    model, optimizer = trained(optimizer_cls, **kwargs)
    twin_model = copy.deepcopy(model)
    twin_optimizer = optimizer_cls(twin_model.parameters(), **kwargs)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict shares tensors
    before = tensors_of(model, optimizer)
    state_objects = [id(v) for s in optimizer.state.values() for v in s.values()]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    result = lr_find(model, optimizer, net_loss, net_batches(), num=40)

    assert len(result.lrs) > 10 and np.nanmax(np.abs(result.deltas)) > 1e-3  # the sweep really moved the weights
    after = tensors_of(model, optimizer)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert [id(v) for s in optimizer.state.values() for v in s.values()] == state_objects
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[2]))
    assert model.training
    # Oracle: training goes on exactly as in a twin that never saw lr_find (same dropout masks, same moments).
    torch.set_rng_state(rng[0])
    for m, o in ((model, optimizer), (twin_model, twin_optimizer)):
        torch.set_rng_state(rng[0])
        for batch in net_batches(4):
            o.zero_grad()
            net_loss(m, batch).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(model, optimizer), tensors_of(twin_model, twin_optimizer)))


def test_quadratic_sgd_lambda_max_first_rise_alpha_and_first_order_match_closed_forms():
    model = Quadratic(top_eigenvector())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_find(model, optimizer, quadratic_loss, [torch.zeros(1)], start_lr=1e-4, end_lr=10, num=100)
    assert abs(result.curvature.safe_lr - 2 / 5.0) <= 1e-4 * (2 / 5.0)
    assert result.curvature.sharpness == pytest.approx(5.0, rel=1e-6)
    # Along the top eigenvector w ← (1 − 5·lr) w: the loss rises iff |1 − 5·lr| > 1, i.e. lr > 2/5.
    grid = lr_grid(1e-4, 10, 100)
    expected = grid[grid > 0.4][0]
    assert result.lr_rise == expected and result.lr_overshoot == expected
    assert result.lrs[result.lrs < expected].max() < 0.4 <= expected
    w = top_eigenvector()
    for lr, first_order, alpha, verdict in zip(result.lrs, result.first_order, result.alphas, result.verdicts):
        assert first_order == pytest.approx(-lr * float(((A * w) ** 2).sum()), rel=1e-9)
        assert alpha == pytest.approx(5.0 * lr - 1.0, rel=1e-9, abs=1e-12)
        assert (verdict == "increase") == (lr > 0.4)
        w = w - lr * A * w
    # stepaudit's suggestion: half the first rise, capped at 2/λ_max; a plain step has gain exactly 1.
    assert result.suggestion == pytest.approx(min(expected / 2, 0.4))
    assert np.allclose(result.gains, 1.0, rtol=1e-9) and result.gain_train == 1.0


def test_heavy_ball_correction_against_a_simulated_sweep_and_the_heavy_ball_limits():
    """Oracle: the heavy-ball recursion b ← βb + λw, w ← w − lr·b along the top eigenvector, run in NumPy.

    The own-batch rise and the gain −g·Δw/(lr·g²) = b/(λw) come from it (the rule takes the rising steps with
    gain > 0); the suggestion is ½·lr_up·G_sweep/G_train with G_train = 1/(1−β) = 10. Physically: lr_up·G_sweep
    is the plain step that overshoots, near 2/λ; the suggestion lands the steady-state step lr·G_train near the
    floor (lr·λ·G_train ≈ 1), inside heavy ball's fastest band (1−√β)²/λ..(1+√β)²/λ and below its stability
    limit (2+2β)/λ.
    """
    lam, beta = 5.0, 0.9
    model = Quadratic(top_eigenvector())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=beta)
    result = lr_find(model, optimizer, quadratic_loss, [torch.zeros(1)], start_lr=1e-4, end_lr=10, num=100)
    assert result.curvature.safe_lr == pytest.approx((2 + 2 * beta) / lam, rel=1e-4)
    w, b, rises, gains = 1.0, 0.0, [], []
    for lr in result.lrs:
        g = lam * w
        b = beta * b + g
        w_new = w - lr * b
        rises.append(0.5 * lam * w_new**2 > 0.5 * lam * w**2 * (1 + 1e-12))
        gains.append(-g * (w_new - w) / (lr * g * g))
        w = w_new
    assert [v == "increase" for v in result.verdicts] == rises
    assert np.allclose(result.gains, gains, rtol=1e-9)
    up = next(
        i for i in range(len(rises)) if rises[i] and sum(rises[i : i + 5]) >= min(3, len(rises[i : i + 5]) // 2 + 1)
    )
    g_sweep = float(np.median([g for g, r in zip(gains[up : up + 5], rises[up : up + 5]) if r and g > 0]))
    assert result.lr_rise == result.lrs[up] and result.gain_train == pytest.approx(10.0)
    assert result.suggestion == pytest.approx(0.5 * result.lrs[up] * g_sweep / 10.0, rel=1e-9)
    assert 0.5 < result.lrs[up] * g_sweep / (2 / lam) < 2  # the plain step that overshoots: ≈ 2/λ
    assert 0.5 < result.suggestion * lam * 10.0 < 2  # the steady-state step lands near the floor
    assert (1 - beta**0.5) ** 2 / lam < result.suggestion < min((1 + beta**0.5) ** 2, 2 + 2 * beta) / lam
    w, b = 1.0, 0.0  # training at the suggestion contracts at √β per step, heavy ball's fastest
    for _ in range(200):
        b = beta * b + lam * w
        w -= result.suggestion * b
    assert abs(w) < 50 * beta ** (200 / 2)


def test_adam_preconditioned_sharpness_equals_max_a_over_p_from_the_optimizer_state():
    model = Quadratic(torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0], dtype=torch.float64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(3):
        optimizer.zero_grad()
        quadratic_loss(model, None).backward()
        optimizer.step()
    state = optimizer.state[model.w]
    t = float(state["step"])
    p = (1 - 0.9**t) * ((state["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8)
    oracle = float((A / p).max())
    result = lr_find(model, optimizer, quadratic_loss, [torch.zeros(1)], num=20)
    value, lr_at_bound, _ = result.curvature.precond
    assert value == pytest.approx(oracle, rel=1e-6)
    assert lr_at_bound == pytest.approx((2 + 2 * 0.9) / (1 - 0.9) / oracle, rel=1e-6)
    assert math.isnan(result.curvature.safe_lr)


class Scalar(nn.Module):
    """0.5·a·w² on one float64 coordinate: Adam's P and the own-batch parabola are exact there."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))


SCALAR_A = 5.0


def scalar_loss(model: Scalar, batch) -> torch.Tensor:
    return 0.5 * SCALAR_A * (model.w**2).sum()


def adam_sweep(lrs, beta1: float, beta2: float = 0.999, eps: float = 1e-8):
    """Oracle: torch's Adam by hand on 0.5·a·w² (Δw = −lr·m/P, P = (1−β₁ᵗ)(√v̂+ε)); (rises, gains m/g, P) per step."""
    a, w, m, v, rises, gains, ps = SCALAR_A, 1.0, 0.0, 0.0, [], [], []
    for t, lr in enumerate(lrs, 1):
        g = a * w
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        p = (1 - beta1**t) * (math.sqrt(v / (1 - beta2**t)) + eps)
        w_new = w - lr * m / p
        rises.append(w_new**2 > w**2 * (1 + 1e-12))
        gains.append(m / g)  # −g·Δw/(lr·g²/P) = m/g
        ps.append(p)
        w = w_new
    return rises, gains, ps


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adam_preconditioned_gain_curvature_and_suggestion_against_adam_by_hand(beta1):
    """On one coordinate Adam's step is Δw = −lr·G·g/P with G = m/g, and the own-batch loss is an exact parabola
    of curvature κ_P = ΔwᵀHΔw/ΔwᵀPΔw = a/P in the metric P: it rises exactly when x = lr·G·a/P is > 2 or < 0
    (x(x−2) > 0: past the opposite wall, or carried uphill). With β₁ = 0, m = g and G = 1 at every step. The
    suggestion 1/κ_P (G_train = 1), the median over the rising steps from the rise, puts a steady-state step at
    the rise's P on the floor of the preconditioned parabola, lr·a/P = 1, far below the stability cap."""
    model = Scalar()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(beta1, 0.999), eps=1e-8)
    result = lr_find(model, optimizer, scalar_loss, [torch.zeros(1)], start_lr=1e-4, end_lr=10, num=100)
    rises, gains, ps = adam_sweep(result.lrs, beta1)
    assert [v == "increase" for v in result.verdicts] == rises
    assert np.allclose(result.gains, gains, rtol=1e-9) and result.gains[0] == pytest.approx(1 - beta1, rel=1e-9)
    assert np.allclose(result.curvatures, [SCALAR_A / p for p in ps], rtol=1e-6)
    assert result.preconditioned and result.gain_train == 1.0
    x = [lr * g * SCALAR_A / p for lr, g, p in zip(result.lrs, gains, ps)]
    assert rises == [v * (v - 2) > 1e-9 for v in x]  # the preconditioned parabola: lr·G·κ_P = 2 at the wall
    up = first_rise(rises)
    kappa = float(np.median([SCALAR_A / p for p, r in zip(ps[up : up + 5], rises[up : up + 5]) if r]))
    assert result.lr_rise == result.lrs[up] and "κ_P" in result.reason
    assert result.suggestion == pytest.approx(1 / kappa, rel=1e-6)
    if beta1 == 0:
        assert np.allclose(result.gains, 1.0, rtol=1e-9)  # the step is the plain one: 1/κ_P = ½·lr_rise·G
        assert 1.9 < result.lr_rise / result.suggestion < 2.5  # the rise: the first grid lr past 2/κ_P (× 1.2)
    assert 0.9 < result.suggestion * SCALAR_A / ps[up] < 1.1  # the steady-state step lands on the floor
    assert result.suggestion < result.curvature.precond[1]  # below the stability cap, (2+2β₁)/(1−β₁) above it


def test_grid_is_exactly_geometric_and_the_sweep_follows_it():
    grid = lr_grid(1e-7, 10.0, 100)
    assert grid[0] == 1e-7 and grid[-1] == 10.0 and len(grid) == 100
    ratios = grid[1:] / grid[:-1]
    assert np.allclose(ratios, 1e8 ** (1 / 99), rtol=1e-12, atol=0)
    model = Quadratic(top_eigenvector())
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), quadratic_loss, [0], num=100, curvature=False)
    assert np.array_equal(result.lrs, grid[: len(result.lrs)])
    with pytest.raises(ValueError):
        lr_grid(1.0, 0.5, 10)


def smoothed_by_hand(losses, beta=0.98):
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def test_divergence_stop_at_four_times_the_minimum_of_the_smoothed_loss():
    model = Quadratic(top_eigenvector())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_find(model, optimizer, quadratic_loss, [0], start_lr=1e-3, end_lr=100, num=100, curvature=False)
    smooth = smoothed_by_hand(result.losses)
    assert np.allclose(result.smooth_losses, smooth, rtol=1e-12)
    running_min = np.minimum.accumulate(smooth)
    stop = int(np.flatnonzero(smooth > 4 * running_min)[0])
    assert len(result.lrs) == stop + 1 < 100 and "4×" in result.stopped
    everything = lr_find(
        model, optimizer, quadratic_loss, [0], start_lr=1e-3, end_lr=100, num=100, curvature=False, stop_div=False
    )
    assert len(everything.lrs) > len(result.lrs)


# Hand-worked suggestions on the curve below.
# valley: the longest strictly decreasing subsequence ending at each index has length 1, 2, 2, 3, 4, 5, 5, 6, 3, 1
#   (e.g. 3.0 > 2.8 > 1.5 > 1.0 > 0.5 > 0.2); the longest ends at index 7 with ℓ = 6, so it starts at 7 − 6 = 1 and
#   the suggestion is index 1 + ⌊6/3⌋ + ⌊6/6⌋ = 4.
# steep on a geometric grid: differences −0.2, 0.1, −1.4, −0.5, −0.5, 0.3, −0.6, 1.8, 7.0 → most negative at 2;
#   with lrs[4] moved next to lrs[3], the −0.5 over a tiny log step wins: index 3.
CURVE = np.array([3.0, 2.8, 2.9, 1.5, 1.0, 0.5, 0.8, 0.2, 2.0, 9.0])


def test_fastai_rules_on_a_hand_made_curve():
    lrs = np.geomspace(1e-5, 1.0, len(CURVE))
    assert valley(lrs, CURVE) == 4
    assert steep(lrs, CURVE) == 2
    assert minimum(lrs, CURVE) == 7
    squeezed = lrs.copy()
    squeezed[4] = lrs[3] * 1.001
    assert steep(squeezed, CURVE) == 3


def test_slide_rule_on_a_hand_made_curve():
    # flat until index 25, then 0.1, 0.3, 0.6, 1.0: np.gradient is 0 up to 24 and 0.05, 0.15, 0.25, 0.35, 0.4 at
    # 25..29. The 15-wide window (right, left) = (29−k, 14−k) differs by > 0.005 for k = 0..4 and not at k = 5
    # (both ends flat): the answer is the left end at k = 4, index 10.
    losses = np.array([0.0] * 26 + [0.1, 0.3, 0.6, 1.0])
    assert slide(np.geomspace(1e-5, 1, 30), losses) == 10


def test_first_rise_needs_3_of_5_steps():
    assert first_rise([False, True, False, False, False, True, True, False, True]) == 5  # 1: one rise of five
    assert first_rise([False, False, True, True]) == 2  # cut short by the end: a majority of what is left
    assert first_rise([False, True, False]) is None and first_rise([]) is None


def test_stepaudit_rule_half_the_first_rise_capped_by_the_bound_else_valley():
    lrs = np.geomspace(1e-3, 1, 10)
    rises = [False] * 6 + [True, False, True, True]
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.full(10, 2.5), 10.0)
    assert lr == pytest.approx(0.5 * lrs[6] * 2.5 / 10.0)  # momentum: × G_sweep / G_train
    kappa = np.array([1.0] * 6 + [40.0, -1.0, 20.0, 30.0])  # rising steps 6, 8, 9 with κ_P > 0: median 30
    lr, reason = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(10), 1.0, True, kappa)
    assert lr == pytest.approx(1 / 30) and "κ_P" in reason  # Adam: 1/(G_train·κ_P), G_train = 1
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(10), 10.0, True, kappa)
    assert lr == pytest.approx(1 / 300)  # RMSprop with momentum 0.9: G_train = 10
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(10), 1.0, False, kappa)
    assert lr == 0.5 * lrs[6]  # plain SGD keeps half the rise
    lr, reason = stepaudit_rule(lrs, rises, math.nan, "", 0.01)
    assert lr == 0.5 * lrs[6] and "raised" in reason
    lr, reason = stepaudit_rule(lrs, rises, 0.01, "2/λ_max", 0.02)
    assert lr == 0.01 and "2/λ_max" in reason
    lr, reason = stepaudit_rule(lrs, [False] * 10, 0.5, "2/λ_max", 0.02)
    assert lr == 0.02 and "valley" in reason


def test_outputs_summary_svg_html_and_the_cli(tmp_path, capsys):
    model, optimizer = trained(torch.optim.SGD, lr=0.1)
    result = lr_find(model, optimizer, net_loss, net_batches(), num=40)
    text = str(result)
    assert f"suggestion: {result.suggestion:.3g}" in text and "fastai valley" in text and "λ_max" in text
    root = ET.fromstring(result.plot_svg())
    assert root.tag.endswith("svg") and "stepaudit" in result.plot_svg()
    html = result._repr_html_()
    assert html.count("<svg") == 1 and "<table" in html and "fastai steep" in html
    out = tmp_path / "lr_find.svg"
    assert cli.main(["lr-find", "--demo", "--num", "40", "-o", str(out)]) == 0
    assert "suggestion:" in capsys.readouterr().out
    ET.parse(out)
    assert cli.main(["lr-find", "train.py"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stepaudit lr-find:")


def test_a_failing_loss_mid_sweep_still_restores_everything_and_a_one_pass_iterator_ends_the_sweep():
    model, optimizer = trained(torch.optim.Adam, lr=1e-3)
    before = tensors_of(model, optimizer)
    calls = [0]

    def failing(m, batch):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("boom")
        return net_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        lr_find(model, optimizer, failing, net_batches(), num=40, curvature=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tensors_of(model, optimizer)))
    result = lr_find(model, optimizer, net_loss, iter(net_batches(12)), num=40, curvature=False)
    assert len(result.lrs) == 12 and result.stopped == "the batches ran out"
    assert all(torch.equal(a, b) for a, b in zip(before, tensors_of(model, optimizer)))


def test_optimizer_step_hooks_do_not_see_the_sweep_and_are_back_afterwards():
    model, optimizer = trained(torch.optim.SGD, lr=0.1)
    seen = {"own": 0, "global": 0}
    own = optimizer.register_step_post_hook(lambda *a: seen.__setitem__("own", seen["own"] + 1))
    glob = register_optimizer_step_post_hook(lambda *a: seen.__setitem__("global", seen["global"] + 1))
    try:
        result = lr_find(model, optimizer, net_loss, net_batches(), num=20, curvature=False)
        assert len(result.lrs) == 20 and seen == {"own": 0, "global": 0}
        optimizer.step()
        assert seen == {"own": 1, "global": 1}
    finally:
        own.remove()
        glob.remove()
    optimizer.step()
    assert seen == {"own": 1, "global": 1}  # the handles still remove what they registered


def test_adaptive_rule_reads_kappa_where_the_floor_is_first_reached_when_the_sweep_flattens_the_landscape():
    """A preconditioned step along its own gradient (G = 1) on a parabola of curvature κ_P lands at α = lr·κ_P − 1
    (α = 1/t* − 1, t* = 1/(lr·κ_P)) and raises its batch's loss when α > 1. The landscape has κ_P = 200 where
    training starts, and the sweep's own steps carry the weights to a flatter region, κ_P = 10, from lr 0.0105 on
    (a GRU under Adam did this: κ_P 230–280 at its floor, 13–15 at a rise only at 0.5–0.6). A steady step from
    the start weights lands on its floor at lr = 1/200. The old rule read κ_P only on the 3-of-5 rise, which
    comes in the flat region (lr > 2/10): 1/10, twenty times too large."""
    lrs = np.geomspace(1e-4, 10, 100)
    kappa = np.where(lrs < 0.0105, 200.0, 10.0)
    alphas = lrs * kappa - 1
    rises = [bool(a > 1) for a in alphas]
    assert sum(rises[: int(np.searchsorted(lrs, 0.0105))]) == 1  # one rise before the flat region: no 3 of 5
    lr, reason = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(100), 1.0, True, kappa, alphas)
    assert lr == pytest.approx(1 / 200) and "floor" in reason
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(100), 10.0, True, kappa, alphas)
    assert lr == pytest.approx(1 / 2000)  # RMSprop with momentum 0.9: / G_train = 10
    lr, _ = stepaudit_rule(lrs, rises, 1e-3, "the preconditioned bound", 0.01, np.ones(100), 1.0, True, kappa, alphas)
    assert lr == 1e-3  # still capped by the stability bound
    # a stationary parabola: floor and rise give the same κ_P, and the rule is the rise's 1/κ_P as before
    flat = np.full(100, 50.0)
    alphas = lrs * flat - 1
    rises = [bool(a > 1) for a in alphas]
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(100), 1.0, True, flat, alphas)
    assert lr == pytest.approx(1 / 50)
    # steps carried uphill by a buffer (no α, NaN) that raised their loss count as past the floor
    alphas = np.full(100, np.nan)
    rises = [bool(x >= 0.0105) for x in lrs]
    lr, _ = stepaudit_rule(lrs, rises, math.nan, "", 0.01, np.ones(100), 1.0, True, kappa, alphas)
    assert lr == pytest.approx(1 / 10)  # the rising steps are all in the flat region: nothing else was measured
    # SGD (not preconditioned) keeps half the rise; the floor does not enter
    lr, _ = stepaudit_rule(
        lrs,
        [bool(a > 1) for a in lrs * kappa - 1],
        math.nan,
        "",
        0.01,
        np.ones(100),
        1.0,
        False,
        kappa,
        lrs * kappa - 1,
    )
    assert lr == pytest.approx(0.5 * lrs[int(np.argmax(lrs > 0.2))])

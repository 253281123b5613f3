"""The free gradient-noise scale of DDP ranks (noise_ranks.py) against closed forms, without processes."""

from __future__ import annotations

import math

import pytest
import torch

from stepaudit import distributed
from stepaudit.noise_ranks import noise_fields


def _pack_over_ranks(monkeypatch, rank_inputs: list[dict]) -> distributed.GlobalStep:
    """global_objective as every rank sees it: the all-reduce replaced by the sum of the ranks' packed tensors."""
    packed = []

    def capture(tensor):
        packed.append(tensor.clone())

    monkeypatch.setattr(torch.distributed, "all_reduce", capture)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: len(rank_inputs))
    for inputs in rank_inputs:
        distributed.global_objective(1.0, 0.5, 1e-7, False, **inputs)
    total = torch.stack(packed).sum(0)

    def reduced(tensor):
        tensor.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", reduced)
    return distributed.global_objective(1.0, 0.5, 1e-7, False, **rank_inputs[0])


def test_two_batch_estimate_recovers_hand_made_signal_and_trace(monkeypatch):
    """|G|² = 2, tr Σ = 30, b = 4 on each of 2 ranks: E|g_r|² = 2 + 30/4, E|ḡ|² = 2 + 30/8 → B_simple = 15."""
    step = _pack_over_ranks(monkeypatch, [{"batch": 4, "local_sq": 9.5, "global_sq": 5.75}] * 2)
    assert (step.global_batch, step.small, step.big) == (8, 4.0, 8.0)
    fields = noise_fields(step, 2)
    assert fields["noise_signal_ranks"] == pytest.approx(2.0) and fields["noise_trace_ranks"] == pytest.approx(30.0)
    assert fields["noise_scale_ranks"] == pytest.approx(15.0)
    assert fields["noise_scale_ranks_stderr"] == 0.0  # both ranks saw the same |g_r|²: no spread


def test_unequal_batches_use_the_harmonic_mean():
    """Batches 4 and 12: E mean|g_r|² = |G|² + S·(1/4 + 1/12)/2 and E|ḡ|² = |G|² + S·(1/4 + 1/12)/4."""
    signal, trace = 2.0, 30.0
    mean_inverse = (1 / 4 + 1 / 12) / 2
    step = distributed.GlobalStep(
        0.0,
        0.0,
        0.0,
        0,
        16,
        signal + trace * mean_inverse,
        0.0,
        signal + trace * mean_inverse / 2,
        1 / mean_inverse,
        2 / mean_inverse,
    )
    fields = noise_fields(step, 2)
    assert fields["noise_scale_ranks"] == pytest.approx(trace / signal)


def test_packed_all_reduce_gives_harmonic_batch_variance_and_global_batch(monkeypatch):
    """Two ranks with batches 4 and 12 and |g_r|² 9 and 11: Σb = 16, B_small = 6, sample variance 2."""
    step = _pack_over_ranks(
        monkeypatch,
        [{"batch": 4, "local_sq": 9.0, "global_sq": 5.0}, {"batch": 12, "local_sq": 11.0, "global_sq": 5.0}],
    )
    assert step.global_batch == 16 and step.small == pytest.approx(6.0) and step.big == pytest.approx(12.0)
    assert step.local_sq == pytest.approx(10.0) and step.local_sq_var == pytest.approx(2.0)
    assert step.global_sq == 5.0 and step.loss_before == 1.0 and step.failures == 0


def test_standard_error_is_the_delta_method_over_the_ranks_spread():
    """se = |∂B/∂x̄|·s/√W, the derivative taken here by central differences of the estimator itself."""
    world, small, y, x1, x2 = 4, 8.0, 3.0, 6.0, 7.5
    xs = [x1, x2, x1, x2]
    mean = sum(xs) / world
    variance = sum((x - mean) ** 2 for x in xs) / (world - 1)

    def b_simple(x: float) -> float:
        big = world * small
        return ((x - y) / (1 / small - 1 / big)) / ((big * y - small * x) / (big - small))

    step = distributed.GlobalStep(0.0, 0.0, 0.0, 0, 32, mean, variance, y, small, world * small)
    fields = noise_fields(step, world)
    h = 1e-5
    slope = (b_simple(mean + h) - b_simple(mean - h)) / (2 * h)
    assert fields["noise_scale_ranks"] == pytest.approx(b_simple(mean), rel=1e-12)
    assert fields["noise_scale_ranks_stderr"] == pytest.approx(abs(slope) * math.sqrt(variance / world), rel=1e-6)


def test_estimates_are_unbiased_on_simulated_rank_gradients():
    """g_r = G + mean of b_r per-example noises with covariance diag(σ²): averaged over 20k draws, the
    two-batch |G|² and tr Σ come back (batches 3 and 5, three ranks: the harmonic-mean weighting)."""
    g = torch.Generator().manual_seed(0)
    true_g = torch.linspace(-1, 1, 6, dtype=torch.float64)
    sigma = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    sizes = [3, 5, 5]
    draws = 20000
    ranks = [true_g + (torch.randn(draws, b, 6, generator=g, dtype=torch.float64) * sigma).mean(1) for b in sizes]
    local = torch.stack([(r * r).sum(1) for r in ranks]).mean(0)
    mean_grad = torch.stack(ranks).mean(0)
    small = len(sizes) / sum(1 / b for b in sizes)
    signals, traces = [], []
    for x, y in zip(local.tolist(), (mean_grad * mean_grad).sum(1).tolist()):
        step = distributed.GlobalStep(0.0, 0.0, 0.0, 0, 13, x, math.nan, y, small, len(sizes) * small)
        fields = noise_fields(step, len(sizes))
        signals.append(fields["noise_signal_ranks"])
        traces.append(fields["noise_trace_ranks"])
    assert sum(signals) / draws == pytest.approx(float(true_g @ true_g), rel=0.03)
    assert sum(traces) / draws == pytest.approx(float((sigma * sigma).sum()), rel=0.03)


def test_local_grad_norms_read_the_accumulated_gradient_and_skip_frozen_parameters():
    """Without a process group the hook sees .grad as backward leaves it: Σ‖p.grad‖² over trainable parameters;
    a frozen parameter in the list is skipped (registering a hook on it would raise); after stop() nothing is read."""
    from stepaudit.noise_ranks import LocalGradNorms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    capture = LocalGradNorms(list(model.parameters()))
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    capture.stop()
    expected = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    assert capture.value() == pytest.approx(expected, rel=1e-12)
    model(x).sum().backward()  # hooks removed: the value stays that of the audited backward
    assert capture.value() == pytest.approx(expected, rel=1e-12)

"""stepaudit.noise against oracles: brute-force single-example backward passes, and linear regression
with Gaussian inputs where Σ and G are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stepaudit.noise import (
    Moments,
    TwoBatchAverage,
    auto_chunk,
    estimate,
    micro_batch_moments,
    noise_scale,
    per_sample_moments,
    two_batch_estimate,
)

F64 = torch.float64


# -- a small nonlinear model as a functional loss -------------------------------------------------------------
def mlp_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(6, 5, generator=g, dtype=F64) * 0.5,
        "b1": torch.randn(6, generator=g, dtype=F64) * 0.1,
        "w2": torch.randn(3, 6, generator=g, dtype=F64) * 0.5,
        "b2": torch.zeros(3, dtype=F64),
    }


def mlp_loss(p, batch):
    x, y = batch
    return F.cross_entropy(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"], y)


def mlp_batch(size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=g, dtype=F64), torch.randint(0, 3, (size,), generator=g)


def brute_force_grads(loss, params, batch, units: list[tuple[int, int]]) -> torch.Tensor:
    """Rows: the gradient of ``loss`` on each slice, by a separate autograd backward per slice."""
    x, y = batch
    rows = []
    for start, stop in units:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss(leaves, (x[start:stop], y[start:stop])).backward()
        rows.append(torch.cat([leaves[k].grad.reshape(-1) for k in params]))
    return torch.stack(rows)


def covariance_trace(rows: torch.Tensor) -> float:
    """tr of the unbiased sample covariance of the rows (torch.cov: an independent implementation)."""
    return float(torch.trace(torch.atleast_2d(torch.cov(rows.T))))


# -- per-example statistics vs a loop of single-example backward passes ------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_per_sample_matches_single_example_backward_passes(chunk):
    params, batch = mlp_params(), mlp_batch(40)
    rows = brute_force_grads(mlp_loss, params, batch, [(i, i + 1) for i in range(40)])
    moments = per_sample_moments(mlp_loss, params, batch, chunk=chunk, groups=8)
    assert torch.allclose(moments.mean_grad(), rows.mean(0), rtol=1e-12, atol=1e-14)
    assert float(moments.sq.sum()) == pytest.approx(float((rows**2).sum()), rel=1e-12)
    est = estimate(moments, "per_sample")
    trace = covariance_trace(rows)
    signal = float(rows.mean(0) @ rows.mean(0)) - trace / 40
    assert est.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert est.grad_sq_norm == pytest.approx(signal, rel=1e-10)
    assert est.noise_scale == pytest.approx(trace / signal, rel=1e-10)
    assert est.grad_snr == pytest.approx(40 * signal / trace, rel=1e-10)
    assert (est.batch_size, est.units, est.method) == (40, 40, "per_sample")


def test_per_sample_mean_gradient_is_the_batch_gradient():
    params, batch = mlp_params(), mlp_batch(33)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    mlp_loss(leaves, batch).backward()
    batch_grad = torch.cat([leaves[k].grad.reshape(-1) for k in params])
    moments = per_sample_moments(mlp_loss, params, batch, chunk=5)
    assert torch.allclose(moments.mean_grad(), batch_grad, rtol=1e-12, atol=1e-14)
    assert moments.loss_sum / 33 == pytest.approx(float(mlp_loss(params, batch)), rel=1e-12)


def test_jackknife_stderr_matches_explicit_leave_one_group_out():
    params, batch = mlp_params(2), mlp_batch(24, seed=3)
    rows = brute_force_grads(mlp_loss, params, batch, [(i, i + 1) for i in range(24)])
    est = estimate(per_sample_moments(mlp_loss, params, batch, chunk=5, groups=4), "per_sample")
    traces, signals = [], []
    for k in range(4):  # groups are 4 contiguous blocks of 6 examples
        kept = torch.cat([rows[: 6 * k], rows[6 * (k + 1) :]])
        t = covariance_trace(kept)
        traces.append(t)
        signals.append(float(kept.mean(0) @ kept.mean(0)) - t / len(kept))
    jack = lambda v: math.sqrt(3 / 4 * sum((a - sum(v) / 4) ** 2 for a in v))  # noqa: E731
    assert est.trace_sigma_stderr == pytest.approx(jack(traces), rel=1e-9)
    assert est.grad_sq_norm_stderr == pytest.approx(jack(signals), rel=1e-9)
    assert est.noise_stderr == pytest.approx(jack([t / s for t, s in zip(traces, signals)]), rel=1e-9)


def test_batch_dict_with_unbatched_leaves_and_non_tensor_entries():
    params, (x, y) = mlp_params(), mlp_batch(12)
    scale = torch.tensor(2.0, dtype=F64)

    def loss(p, batch):
        assert batch["tag"] == "digits" and batch["scale"].dim() == 0
        return mlp_loss(p, (batch["x"] * batch["scale"], batch["y"]))

    got = per_sample_moments(loss, params, {"x": x, "y": y, "scale": scale, "tag": "digits"}, chunk=5)
    want = per_sample_moments(mlp_loss, params, (x * 2, y), chunk=12)
    assert torch.allclose(got.sums, want.sums, rtol=1e-12) and torch.allclose(got.sq, want.sq, rtol=1e-12)


def test_auto_chunk_bounds_the_per_example_gradients_held():
    params = {"w": torch.zeros(1000, 100)}  # 400 kB per example in float32
    assert auto_chunk(params, budget_bytes=4_000_000) == 10
    assert auto_chunk(params, budget_bytes=1) == 1


def test_merging_two_halves_equals_the_whole():
    params, (x, y) = mlp_params(), mlp_batch(30)
    whole = per_sample_moments(mlp_loss, params, (x, y), groups=3)
    parts = per_sample_moments(mlp_loss, params, (x[:15], y[:15]), groups=3).merge(
        per_sample_moments(mlp_loss, params, (x[15:], y[15:]), groups=3)
    )
    a, b = estimate(whole, "per_sample"), estimate(parts, "per_sample")
    assert a.trace_sigma == pytest.approx(b.trace_sigma, rel=1e-12)
    assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm, rel=1e-12)


# -- micro-batches ---------------------------------------------------------------------------------------------------
def test_micro_batch_matches_brute_force_loop():
    params, batch = mlp_params(), mlp_batch(32)
    units = [(4 * m, 4 * m + 4) for m in range(8)]
    rows = brute_force_grads(mlp_loss, params, batch, units)  # micro-batch gradients, covariance Σ/4
    est = estimate(micro_batch_moments(mlp_loss, params, batch, micro_batches=8), "micro_batch")
    trace = 4 * covariance_trace(rows)
    assert est.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert est.grad_sq_norm == pytest.approx(float(rows.mean(0) @ rows.mean(0)) - trace / 32, rel=1e-10)
    assert (est.units, est.batch_size) == (8, 32)


def test_micro_batches_of_one_example_equal_per_sample():
    params, batch = mlp_params(), mlp_batch(10)
    a = estimate(micro_batch_moments(mlp_loss, params, batch, micro_batches=10), "micro_batch")
    b = estimate(per_sample_moments(mlp_loss, params, batch), "per_sample")
    assert a.trace_sigma == pytest.approx(b.trace_sigma, rel=1e-10)
    assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm, rel=1e-10)


def test_unequal_micro_batches_are_unbiased_on_average():
    """Sizes 3 and 4 mixed: Σ b_m‖ĝ_m − ḡ‖²/(n−1) stays unbiased (closed-form truth, defined below)."""
    cov, chol, w_star, w, sigma = regression_problem()
    true_trace, _ = regression_truth(cov, w - w_star, sigma)
    g = torch.Generator().manual_seed(6)
    values = torch.tensor(
        [
            estimate(
                micro_batch_moments(
                    regression_loss, {"w": w}, regression_batch(chol, w_star, sigma, 27, g), micro_batches=7
                ),
                "micro_batch",
            ).trace_sigma
            for _ in range(400)
        ],
        dtype=F64,
    )
    assert abs(float(values.mean()) - true_trace) < 4 * float(values.std()) / math.sqrt(len(values))


# -- linear regression with Gaussian inputs: Σ and G in closed form ---------------------------------------------------
def regression_truth(cov: torch.Tensor, v: torch.Tensor, sigma: float) -> tuple[float, float]:
    """ℓ = ½(xᵀw − y)², x ~ N(0, C), y = xᵀw* + ε: g = x xᵀv − xε with v = w − w*.

    G = Cv; by Isserlis E[g gᵀ] = (vᵀCv + σ²) C + 2 Cv vᵀC, so Σ = (vᵀCv + σ²) C + Cv vᵀC and
    tr Σ = (vᵀCv + σ²) tr C + ‖Cv‖².
    """
    cv = cov @ v
    return float((v @ cv + sigma**2) * torch.trace(cov) + cv @ cv), float(cv @ cv)


def regression_problem(d: int = 4, distance: float = 1.0, sigma: float = 0.7):
    """Covariance C, its Cholesky factor, w*, w = w* + distance·(random direction), noise σ."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)
    w_star = torch.randn(d, generator=g, dtype=F64)
    w = w_star + distance * torch.randn(d, generator=g, dtype=F64)
    return cov, torch.linalg.cholesky(cov), w_star, w, sigma


def regression_loss(p, batch):
    x, y = batch
    return 0.5 * ((x @ p["w"] - y) ** 2).mean()


def regression_batch(chol, w_star, sigma, size, g):
    x = torch.randn(size, chol.shape[0], generator=g, dtype=F64) @ chol.T
    return x, x @ w_star + sigma * torch.randn(size, generator=g, dtype=F64)


@pytest.mark.parametrize(
    "distance, sigma, batch, reps",
    [(1.0, 0.7, 128, 150), (0.3, 2.0, 16, 1500)],
    ids=["signal-dominated", "noise-dominated"],
)
def test_linear_regression_estimators_agree_with_closed_form_within_stated_stderr(distance, sigma, batch, reps):
    cov, chol, w_star, w, sigma = regression_problem(distance=distance, sigma=sigma)
    true_trace, true_signal = regression_truth(cov, w - w_star, sigma)
    g = torch.Generator().manual_seed(12)
    estimates = [
        estimate(
            per_sample_moments(regression_loss, {"w": w}, regression_batch(chol, w_star, sigma, batch, g), groups=8),
            "per_sample",
        )
        for _ in range(reps)
    ]
    for field, truth in (("trace_sigma", true_trace), ("grad_sq_norm", true_signal)):
        values = torch.tensor([getattr(e, field) for e in estimates], dtype=F64)
        stated = torch.tensor([getattr(e, field + "_stderr") for e in estimates], dtype=F64)
        # Unbiased: the mean of the estimates lies within 4 standard errors of the truth.
        assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / math.sqrt(len(values))
        # The stated (8-group jackknife) standard error matches the spread across batches (its median
        # runs ~25% low on these heavy-tailed estimates) ...
        assert 0.55 < float(stated.median()) / float(values.std()) < 1.5
        # ... and single estimates fall within 3 stated standard errors of the truth (measured 87-97%).
        assert float(((values - truth).abs() < 3 * stated).double().mean()) > 0.85
    scales = torch.tensor([e.noise_scale for e in estimates], dtype=F64)
    pooled = noise_scale(sum(e.trace_sigma for e in estimates) / reps, sum(e.grad_sq_norm for e in estimates) / reps)
    assert pooled == pytest.approx(true_trace / true_signal, rel=0.1)
    if batch > 10 * true_trace / true_signal:  # per-step ratios are only stable when B ≫ B_simple
        assert float(scales.median()) == pytest.approx(true_trace / true_signal, rel=0.3)


def test_two_batch_estimator_is_unbiased_on_linear_regression():
    cov, chol, w_star, w, sigma = regression_problem()
    true_trace, true_signal = regression_truth(cov, w - w_star, sigma)
    g = torch.Generator().manual_seed(13)

    def sq_grad_norm(x, y):
        residual = x @ w - y
        grad = x.T @ residual / len(y)  # closed-form gradient of the mean loss
        return float(grad @ grad)

    average, signals, traces = TwoBatchAverage(), [], []
    for _ in range(2000):
        x, y = regression_batch(chol, w_star, sigma, 64, g)
        signal, trace = two_batch_estimate(8, sq_grad_norm(x[:8], y[:8]), 64, sq_grad_norm(x, y))
        average.add(signal, trace)
        signals.append(signal)
        traces.append(trace)
    for values, truth in ((signals, true_signal), (traces, true_trace)):
        v = torch.tensor(values, dtype=F64)
        assert abs(float(v.mean()) - truth) < 4 * float(v.std()) / math.sqrt(len(v))
    mean_signal, mean_trace, scale, stderr = average.result()
    assert mean_signal == pytest.approx(sum(signals) / 2000, rel=1e-12)
    assert abs(scale - true_trace / true_signal) < 4 * stderr


def test_two_batch_estimate_recovers_exact_expectations():
    """Feeding the expected squared norms E‖G_B‖² = ‖G‖² + tr Σ / B returns ‖G‖² and tr Σ exactly."""
    signal, trace = 2.5, 40.0
    got = two_batch_estimate(4, signal + trace / 4, 256, signal + trace / 256)
    assert got == pytest.approx((signal, trace), rel=1e-12)
    with pytest.raises(ValueError, match="small_size < big_size"):
        two_batch_estimate(8, 1.0, 8, 1.0)


def test_two_batch_average_stderr_matches_spread_of_repeated_runs():
    cov, chol, w_star, w, sigma = regression_problem()
    g = torch.Generator().manual_seed(14)
    scales, stated = [], []
    for _ in range(60):
        average = TwoBatchAverage()
        for _ in range(50):
            x, y = regression_batch(chol, w_star, sigma, 64, g)
            small = x[:16].T @ (x[:16] @ w - y[:16]) / 16
            big = x.T @ (x @ w - y) / 64
            average.add(*two_batch_estimate(16, float(small @ small), 64, float(big @ big)))
        _, _, scale, stderr = average.result()
        scales.append(scale)
        stated.append(stderr)
    spread = float(torch.tensor(scales).std())
    assert 0.6 < float(torch.tensor(stated).median()) / spread < 1.6


# -- edge cases ---------------------------------------------------------------------------------------------------------
def test_noise_scale_conventions():
    assert noise_scale(3.0, 1.5) == 2.0
    assert noise_scale(3.0, -0.1) == math.inf  # the batch cannot resolve the mean gradient
    assert math.isnan(noise_scale(math.nan, 1.0))


def test_estimate_needs_two_units_and_per_sample_needs_two_examples():
    params, (x, y) = mlp_params(), mlp_batch(4)
    with pytest.raises(ValueError, match="at least 2 examples"):
        per_sample_moments(mlp_loss, params, (x[:1], y[:1]))
    one = micro_batch_moments(mlp_loss, params, (x, y), micro_batches=1)
    with pytest.raises(ValueError, match="at least 2 gradient units"):
        estimate(one, "micro_batch")
    assert isinstance(Moments.concat([one, one]), Moments)


def test_merging_parts_with_different_group_counts_keeps_every_unit():
    params, (x, y) = mlp_params(), mlp_batch(20)
    small = per_sample_moments(mlp_loss, params, (x[:3], y[:3]), groups=8)  # 3 examples: 3 groups
    large = per_sample_moments(mlp_loss, params, (x[3:], y[3:]), groups=8)
    merged = estimate(small.merge(large), "per_sample")
    whole = estimate(per_sample_moments(mlp_loss, params, (x, y)), "per_sample")
    assert merged.trace_sigma == pytest.approx(whole.trace_sigma, rel=1e-12)
    assert merged.units == 20

"""Tests for stepaudit.linalg against independent oracles (dense Hessians, eigvalsh, finite differences)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from stepaudit.linalg import (
    FORWARD,
    REVERSE,
    KrylovBasis,
    directional_curvature,
    dot,
    flatten,
    hutchinson_trace,
    lanczos,
    make_hvp,
    quadratic_form,
    unflatten,
)

F64 = torch.float64
METHODS = ["forward", "reverse"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def module_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int | None = None):
    """Pure loss of a parameter tuple: replays RNG (dropout) and clones buffers (BatchNorm)."""
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss_of_params(params):
        state = {**dict(zip(names, params)), **{n: b.clone() for n, b in buffers.items()}}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            out = functional_call(model, state, (x,))
        return nn.functional.cross_entropy(out, y)

    return loss_of_params, tuple(p.detach().clone() for p in model.parameters())


def mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    return module_loss(model, x, y)


def dropout_bn_problem(*, dropout: bool, batchnorm: bool):
    torch.manual_seed(1)
    layers = [nn.Linear(5, 6)]
    layers += [nn.BatchNorm1d(6)] if batchnorm else []
    layers += [nn.Tanh()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(F64).train()
    x, y = torch.randn(12, 5, dtype=F64), torch.randint(0, 3, (12,))
    loss, params = module_loss(model, x, y, seed=1234)
    return model, loss, params


def dense_hessian(loss_of_params, params) -> torch.Tensor:
    """Dense Hessian of the loss as a function of the flat parameter vector."""
    return torch.func.hessian(lambda flat: loss_of_params(unflatten(flat, params)))(flatten(params))


def random_symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ with a random orthogonal Q."""
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=F64, generator=gen(seed)))
    return q @ torch.diag(eigenvalues.to(F64)) @ q.T


def central_difference_hvp(loss_of_params, params, v: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """(∇L(p + h v) − ∇L(p − h v)) / 2h, with plain first-order autograd."""

    def grad_at(flat):
        leaves = tuple(t.requires_grad_(True) for t in unflatten(flat.clone(), params))
        return flatten(torch.autograd.grad(loss_of_params(leaves), leaves))

    p = flatten(params)
    return (grad_at(p + h * v) - grad_at(p - h * v)) / (2 * h)


# --- flatten / unflatten -----------------------------------------------------------------


def test_flatten_unflatten_roundtrip():
    tensors = (torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2))
    flat = flatten(tensors)
    assert flat.shape == (12,)
    back = unflatten(flat, tensors)
    assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(back, tensors))


def test_unflatten_rejects_wrong_size():
    with pytest.raises(ValueError):
        unflatten(torch.zeros(5), (torch.zeros(2, 3),))


# --- Hessian-vector products ---------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_dense_hessian_mlp(method):
    loss, params = mlp_problem()
    hessian = dense_hessian(loss, params)
    hvp = make_hvp(loss, params, method)
    assert hvp.dim == hessian.shape[0] == 5 * 4 + 4 + 4 * 3 + 3
    for seed in range(3):
        v = torch.randn(hvp.dim, dtype=F64, generator=gen(seed))
        hv = hvp(v)
        assert hv.dtype == F64 and not hv.requires_grad
        assert rel_err(hv, hessian @ v) <= 1e-10
    assert hvp.calls == 3


@pytest.mark.parametrize("method", METHODS)
def test_hvp_exact_on_known_quadratic(method):
    # loss = ½ pᵀ A p + bᵀ p over two tensors: the Hessian is exactly A, no AD in the oracle.
    a = random_symmetric(torch.linspace(-3, 5, 7))
    b = torch.randn(7, dtype=F64, generator=gen(1))
    params = (torch.randn(3, dtype=F64), torch.randn(2, 2, dtype=F64))

    def loss(ps):
        p = flatten(ps)
        return 0.5 * p @ a @ p + b @ p

    hvp = make_hvp(loss, params, method)
    v = torch.randn(7, dtype=F64, generator=gen(2))
    assert rel_err(hvp(v), a @ v) <= 1e-12
    assert quadratic_form(hvp, v) == pytest.approx(float(v @ a @ v), rel=1e-12)
    assert directional_curvature(hvp, v) == pytest.approx(float(v @ a @ v / (v @ v)), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dropout,batchnorm", [(True, False), (False, True), (True, True)])
def test_hvp_with_dropout_and_batchnorm_matches_finite_difference(method, dropout, batchnorm):
    model, loss, params = dropout_bn_problem(dropout=dropout, batchnorm=batchnorm)
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    hvp = make_hvp(loss, params, method)
    v = torch.randn(hvp.dim, dtype=F64, generator=gen(3))
    assert rel_err(hvp(v), central_difference_hvp(loss, params, v)) <= 1e-6
    assert all(torch.equal(b, buffers_before[n]) for n, b in model.named_buffers())


def test_dropout_mask_is_replayed_and_matters():
    # Guards the finite-difference test above: dropout is active, and replayed identically.
    model, loss, params = dropout_bn_problem(dropout=True, batchnorm=False)
    assert torch.equal(loss(params), loss(params))
    x, y = torch.randn(12, 5, dtype=F64, generator=gen(5)), torch.randint(0, 3, (12,), generator=gen(5))
    loss_seed_1, _ = module_loss(model, x, y, seed=1)
    loss_seed_2, _ = module_loss(model, x, y, seed=2)
    assert not torch.equal(loss_seed_1(params), loss_seed_2(params))


@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_hvp_leaves_params_and_grads_untouched(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    names = [n for n, _ in model.named_parameters()]
    live = tuple(model.parameters())  # requires_grad=True, as in a real training loop
    before = [p.detach().clone() for p in live]

    def loss(ps):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    hvp = make_hvp(loss, live, method)
    for seed in range(2):
        hvp(torch.randn(hvp.dim, dtype=F64, generator=gen(seed)))
    assert all(torch.equal(p, b) for p, b in zip(live, before))
    assert all(p.grad is None and p.requires_grad for p in live)


def test_auto_picks_a_working_method():
    loss, params = mlp_problem()
    hvp = make_hvp(loss, params, "auto")
    assert hvp.method in (FORWARD, REVERSE)
    assert hvp.fallback_reason is None and hvp.calls == 0
    v = torch.randn(hvp.dim, dtype=F64, generator=gen(0))
    assert rel_err(hvp(v), dense_hessian(loss, params) @ v) <= 1e-10


class SquareWithoutForwardAD(torch.autograd.Function):
    """x², with a (differentiable) backward but no jvp: forward-mode AD cannot pass through it."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def no_forward_ad_problem():
    c = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)

    def loss(ps):
        return (c * SquareWithoutForwardAD.apply(ps[0])).sum()

    return loss, (torch.randn(4, dtype=F64, generator=gen(0)),), torch.diag(2 * c)


def test_auto_falls_back_to_reverse_without_forward_ad():
    loss, params, hessian = no_forward_ad_problem()
    hvp = make_hvp(loss, params, "auto")
    assert hvp.method == REVERSE
    assert hvp.fallback_reason and hvp.fallback_reason.split(":")[0] in ("RuntimeError", "NotImplementedError")
    v = torch.randn(4, dtype=F64, generator=gen(1))
    assert rel_err(hvp(v), hessian @ v) <= 1e-12


def test_explicit_forward_method_raises_without_forward_ad():
    loss, params, _ = no_forward_ad_problem()
    hvp = make_hvp(loss, params, "forward")
    with pytest.raises((RuntimeError, NotImplementedError)):
        hvp(torch.ones(4, dtype=F64))


@pytest.mark.parametrize("method", METHODS)
def test_hvp_of_parameter_the_loss_ignores_is_zero(method):
    params = (torch.randn(3, dtype=F64), torch.randn(2, dtype=F64))
    hvp = make_hvp(lambda ps: (ps[0] ** 3).sum(), params, method)
    expected = torch.cat([6 * params[0], torch.zeros(2, dtype=F64)])  # H = diag(6 p0, 0, 0)
    assert torch.allclose(hvp(torch.ones(5, dtype=F64)), expected, rtol=1e-14)


def test_unknown_method_rejected():
    loss, params = mlp_problem()
    with pytest.raises(ValueError):
        make_hvp(loss, params, "sideways")


def test_hvp_rejects_wrong_shape():
    loss, params = mlp_problem()
    with pytest.raises(ValueError):
        make_hvp(loss, params, "reverse")(torch.zeros(3, dtype=F64))


# --- Lanczos ----------------------------------------------------------------------------------


def matvec(a: torch.Tensor):
    return lambda v: a @ v


def assert_eigenpair(result, a: torch.Tensor, rel: float = 1e-6):
    top = float(torch.linalg.eigvalsh(a)[-1])
    assert result.eigenvalue == pytest.approx(top, rel=rel, abs=1e-12)
    assert float(torch.linalg.vector_norm(result.eigenvector)) == pytest.approx(1.0, rel=1e-12)
    honest = float(torch.linalg.vector_norm(a @ result.eigenvector - result.eigenvalue * result.eigenvector))
    assert result.residual == pytest.approx(honest, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_lanczos_top_eigenvalue_of_mlp_hessian(method):
    loss, params = mlp_problem()
    hessian = dense_hessian(loss, params)
    hvp = make_hvp(loss, params, method)
    result = lanczos(hvp, hvp.dim, iterations=hvp.dim, generator=gen(0), tol=1e-10)
    assert_eigenpair(result, hessian)
    assert result.iterations == hvp.calls <= hvp.dim + 1


def test_lanczos_indefinite_returns_largest_algebraic_not_largest_magnitude():
    eigenvalues = torch.cat([torch.tensor([-10.0, -9.0]), torch.linspace(-1.0, 2.0, 38), torch.tensor([3.0])])
    a = random_symmetric(eigenvalues, seed=1)
    result = lanczos(matvec(a), 41, iterations=41, dtype=F64, generator=gen(2), tol=1e-10)
    assert result.eigenvalue == pytest.approx(3.0, rel=1e-6)
    assert_eigenpair(result, a)


def test_lanczos_converges_early_with_a_spectral_gap():
    eigenvalues = torch.cat([torch.linspace(0.0, 1.0, 199), torch.tensor([10.0])])
    a = random_symmetric(eigenvalues, seed=2)
    result = lanczos(matvec(a), 200, iterations=40, dtype=F64, generator=gen(3), tol=1e-8)
    assert result.iterations < 40
    assert_eigenpair(result, a)
    assert result.residual <= 1e-6 * 10.0


def test_lanczos_warm_start_from_true_eigenvector_is_nearly_free():
    a = random_symmetric(torch.linspace(-4.0, 7.0, 30), seed=3)
    values, vectors = torch.linalg.eigh(a)
    calls = []
    result = lanczos(lambda v: calls.append(1) or a @ v, 30, start=vectors[:, -1], generator=gen(0))
    assert result.iterations == len(calls) <= 3
    assert result.eigenvalue == pytest.approx(float(values[-1]), rel=1e-10)
    assert abs(float(result.eigenvector @ vectors[:, -1])) == pytest.approx(1.0, rel=1e-10)


@pytest.mark.parametrize("weights", [(5.0, 2.0), (-5.0, -2.0), (4.0, -6.0)])
def test_lanczos_rank_two_invariant_subspace(weights):
    # rank 2: the Krylov space is invariant after three steps (β ≈ 0); with both weights negative
    # the largest algebraic eigenvalue is the zero of the null space.
    basis, _ = torch.linalg.qr(torch.randn(50, 2, dtype=F64, generator=gen(4)))
    a = weights[0] * torch.outer(basis[:, 0], basis[:, 0]) + weights[1] * torch.outer(basis[:, 1], basis[:, 1])
    result = lanczos(matvec(a), 50, iterations=20, dtype=F64, generator=gen(5))
    assert result.iterations <= 4
    assert result.eigenvalue == pytest.approx(max(max(weights), 0.0), abs=1e-10)
    assert result.residual <= 1e-10
    assert_eigenpair(result, a)


def test_krylov_basis_grows_by_doubling_and_keeps_its_rows():
    rows = torch.randn(20, 5, generator=gen(11))
    basis = KrylovBasis(20, 5)
    capacities = []
    for i, row in enumerate(rows):
        basis.append(row)
        capacities.append(basis.capacity)
        assert torch.equal(basis.rows, rows[: i + 1])
    assert sorted(set(capacities)) == [8, 16, 20]  # never the whole limit up front
    with pytest.raises(IndexError, match="limit of 20"):
        basis.append(rows[0])


def test_lanczos_past_the_first_basis_allocation_matches_eigh():
    # A clustered spectrum without a gap: many steps, so the basis grows twice (8 → 16 → 32 rows).
    a = random_symmetric(torch.cat([torch.linspace(0.0, 1.0, 299), torch.tensor([1.05])]), seed=12)
    result = lanczos(matvec(a), 300, iterations=30, dtype=F64, generator=gen(13), tol=1e-12)
    assert result.iterations == 31  # 30 Lanczos steps, then the verifying product
    assert_eigenpair(result, a, rel=1e-3)


def test_lanczos_dimension_smaller_than_iterations():
    a = random_symmetric(torch.tensor([-1.0, 0.5, 2.0, 2.5]), seed=6)
    result = lanczos(matvec(a), 4, iterations=20, dtype=F64, generator=gen(7))
    assert result.iterations <= 5
    assert result.eigenvalue == pytest.approx(2.5, rel=1e-10)


def test_lanczos_zero_operator():
    result = lanczos(lambda v: torch.zeros_like(v), 10, dtype=F64, generator=gen(0))
    assert result.eigenvalue == 0.0 and result.residual == 0.0


def test_lanczos_adopts_operator_dtype_and_is_seeded():
    a = random_symmetric(torch.linspace(-1.0, 3.0, 20), seed=8)
    op = matvec(a.float())
    first = lanczos(op, 20, iterations=20, generator=gen(9), dtype=torch.float32)
    second = lanczos(op, 20, iterations=20, generator=gen(9), dtype=torch.float32)
    assert first.eigenvector.dtype == torch.float32
    assert torch.equal(first.eigenvector, second.eigenvector)
    assert first.eigenvalue == pytest.approx(3.0, rel=1e-5)


# --- Hutchinson -------------------------------------------------------------------------------


def test_hutchinson_within_four_standard_errors():
    a = random_symmetric(torch.linspace(-2.0, 6.0, 40), seed=10)
    estimate, stderr = hutchinson_trace(matvec(a), 40, samples=200, generator=gen(11), dtype=F64)
    assert stderr > 0
    assert abs(estimate - float(torch.trace(a))) <= 4 * stderr


def test_hutchinson_stderr_shrinks_with_samples():
    a = random_symmetric(torch.linspace(-2.0, 6.0, 40), seed=12)
    _, few = hutchinson_trace(matvec(a), 40, samples=25, generator=gen(13), dtype=F64)
    _, many = hutchinson_trace(matvec(a), 40, samples=400, generator=gen(14), dtype=F64)
    assert many < 0.5 * few  # expected ratio √(25/400) = 1/4


def test_hutchinson_is_exact_on_diagonal_matrices():
    # Rademacher probes satisfy z_i² = 1, so zᵀDz = tr D for every probe (not true for Gaussian probes).
    d = torch.linspace(-3.0, 5.0, 17, dtype=F64)
    estimate, stderr = hutchinson_trace(lambda v: d * v, 17, samples=5, generator=gen(0), dtype=F64)
    assert estimate == pytest.approx(float(d.sum()), abs=1e-12) and stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_hutchinson_on_mlp_hessian(method):
    loss, params = mlp_problem()
    hessian = dense_hessian(loss, params)
    hvp = make_hvp(loss, params, method)
    estimate, stderr = hutchinson_trace(hvp, hvp.dim, samples=100, generator=gen(15))
    assert hvp.calls == 100
    assert abs(estimate - float(torch.trace(hessian))) <= 4 * stderr


def test_lanczos_rejects_non_finite_operator():
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * float("nan"), 5, dtype=F64, generator=gen(0))


@pytest.mark.parametrize("method", METHODS)
def test_operator_keeps_its_point_when_the_callers_tensors_change(method):
    # the audit overwrites its weight buffers in place at the next audited step
    params = (torch.randn(3, dtype=F64),)
    hvp = make_hvp(lambda ps: (ps[0] ** 3).sum(), params, method)
    expected = hvp(torch.ones(3, dtype=F64))  # H = diag(6 p)
    params[0].add_(1.0)
    assert torch.equal(hvp(torch.ones(3, dtype=F64)), expected)


# --- 16-bit operators, verification and the private default generator ----------------------------


def sixteen_bit_operator(dtype, dim: int = 20000):
    """A Householder-rotated diagonal computed in a 16-bit dtype; exact spectrum: top 10, the rest in [0, 1]."""
    spectrum = torch.rand(dim, generator=gen(20), dtype=F64)
    spectrum[123] = 10.0
    d = spectrum.to(dtype)
    u = torch.randn(dim, generator=gen(21), dtype=F64)
    u = (u / torch.linalg.vector_norm(u)).to(dtype)

    def reflect(x):
        return x - 2 * u * torch.dot(u, x)

    def op(v):
        x = v.to(dtype)  # what an HVP does: unflatten casts to the parameters' dtype
        return reflect(d * reflect(x))

    return op, float(d.double().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lanczos_with_a_16bit_operator_of_large_dimension_finds_the_top_eigenvalue(dtype):
    # dim > 1/eps² of bfloat16: a breakdown test of eps·√dim·scale in the operator's dtype fired after one step.
    op, top = sixteen_bit_operator(dtype)
    result = lanczos(op, 20000, iterations=30, tol=1e-2, generator=gen(22))
    assert result.eigenvalue == pytest.approx(top, rel=2e-2)
    assert result.eigenvector.dtype == torch.float32  # Krylov vectors never in the 16-bit dtype
    explicit = lanczos(op, 20000, iterations=30, tol=1e-2, generator=gen(22), dtype=F64)
    assert explicit.eigenvector.dtype == F64 and explicit.eigenvalue == pytest.approx(top, rel=2e-2)


def test_lanczos_breakdown_threshold_does_not_grow_with_the_dimension():
    # float32, dim 10⁶: eps·√dim ≈ 1.2e-4 would stop a Krylov space that is not invariant (β ≈ 1e-4·scale).
    dim = 10**6
    d = torch.zeros(dim)
    d[:3] = torch.tensor([1.0, 1.0 + 2e-4, 2.0])
    start = torch.zeros(dim)
    start[:3] = torch.tensor([1.0, 1.0, 1e-6])
    result = lanczos(lambda v: d * v, dim, iterations=10, tol=1e-9, start=start, stop="residual")
    assert result.eigenvalue == pytest.approx(2.0, rel=1e-5)


def test_lanczos_verify_raises_on_a_non_finite_verifying_product():
    calls = []
    values = torch.tensor([1.0, 2.0, 3.0], dtype=F64)

    def op(v):
        calls.append(1)
        out = values * v
        if len(calls) == 4:  # three Lanczos steps span the space; the fourth call is the verification
            out[0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="verif"):
        lanczos(op, 3, tol=1e-12, generator=gen(0), verify=True)
    assert len(calls) == 4


def test_lanczos_and_hutchinson_without_a_generator_leave_the_global_rng_alone():
    a = random_symmetric(torch.linspace(-1.0, 3.0, 12), seed=14)
    state = torch.get_rng_state()
    first = lanczos(matvec(a), 12, dtype=F64)
    trace = hutchinson_trace(matvec(a), 12, samples=7, dtype=F64)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.eigenvector, lanczos(matvec(a), 12, dtype=F64).eigenvector)  # a fixed private seed
    assert trace == hutchinson_trace(matvec(a), 12, samples=7, dtype=F64)


def test_dot_of_16bit_vectors_is_not_rounded_to_16_bits():
    a = torch.full((26122,), 0.01, dtype=torch.bfloat16)
    exact = float(a.double() @ a.double())
    assert dot(a, a) == pytest.approx(exact, rel=1e-6)

"""Curvature over flat parameter vectors: Hessian-vector products, Lanczos, Hutchinson.

All functions are pure: they never modify parameters and never touch ``.grad``, and never draw from
the global RNG: random vectors come from the caller's generator or, without one, from a private generator
seeded with ``DEFAULT_SEED`` (so a call without a generator is reproducible).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .maths import dot, flatten, rademacher, unflatten, working_dtype

Params = tuple[Tensor, ...]
Operator = Callable[[Tensor], Tensor]

FORWARD = "forward-over-reverse"
REVERSE = "reverse-over-reverse"
_METHOD_ALIASES = {"forward": FORWARD, FORWARD: FORWARD, "reverse": REVERSE, REVERSE: REVERSE}
DEFAULT_SEED = 0


class Hvp:
    """Callable flat ``v -> H v`` for a fixed loss and parameter point."""

    def __init__(self, fn: Operator, method: str, dim: int, fallback_reason: str | None = None):
        self._fn = fn
        self.method = method
        self.dim = dim
        self.calls = 0
        self.fallback_reason = fallback_reason

    def __call__(self, v: Tensor) -> Tensor:
        """Return ``H v`` as a detached flat vector."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of {self.dim} elements, got shape {tuple(v.shape)}")
        self.calls += 1
        return self._fn(v).detach()

    def __repr__(self) -> str:
        return f"Hvp(method={self.method!r}, dim={self.dim}, calls={self.calls})"


def second_order_kernels() -> contextlib.AbstractContextManager:
    """Run attention on PyTorch's math SDPA backend: the fused (flash, memory-efficient) kernels
    have no double-backward and no forward-mode derivative, so an HVP through them fails."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _forward_over_reverse(loss_of_params: Callable[[Params], Tensor], params: Params) -> Operator:
    """HVP as the JVP of the gradient: one forward-mode pass through a backward pass per call."""
    grad_fn = torch.func.grad(loss_of_params)

    def hvp(v: Tensor) -> Tensor:
        with second_order_kernels():
            _, hv = torch.func.jvp(grad_fn, (params,), (unflatten(v, params),))
        return flatten(hv)

    return hvp


def _reverse_over_reverse(loss_of_params: Callable[[Params], Tensor], params: Params) -> Operator:
    """HVP by double backward through a gradient graph built once and retained."""
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad(), second_order_kernels():
        loss = loss_of_params(leaves)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    # Gradient entries that do not depend on the parameters contribute nothing to H v.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: Tensor) -> Tensor:
        if not live:
            return torch.zeros(sum(p.numel() for p in params), dtype=flatten(params).dtype, device=v.device)
        vs = unflatten(v, params)
        with torch.enable_grad():
            out = torch.autograd.grad(
                [grads[i] for i in live],
                leaves,
                grad_outputs=[vs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
        return flatten([torch.zeros_like(p) if h is None else h for h, p in zip(out, params)])

    return hvp


def _seconds(fn: Operator, v: Tensor) -> float:
    """Wall-clock seconds of one call, synchronising CUDA if needed."""
    sync = torch.cuda.synchronize if v.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(v)
    sync()
    return time.perf_counter() - start


def _describe(error: BaseException) -> str:
    """First line of an exception, prefixed with its type."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def make_hvp(loss_of_params: Callable[[Params], Tensor], params: Params, method: str = "auto") -> Hvp:
    """Build an HVP operator at ``params`` ("forward", "reverse" or "auto" = fastest that works).

    The operator holds its own copy of ``params``: it stays valid when the caller's tensors change
    later (the audit reuses its weight buffers from one audited step to the next).
    """
    params = tuple(p.detach().clone() for p in params)
    dim = sum(p.numel() for p in params)
    if method != "auto":
        if method not in _METHOD_ALIASES:
            raise ValueError(f"unknown method {method!r}; use 'forward', 'reverse' or 'auto'")
        builder = _forward_over_reverse if _METHOD_ALIASES[method] == FORWARD else _reverse_over_reverse
        return Hvp(builder(loss_of_params, params), _METHOD_ALIASES[method], dim)

    probe = torch.ones(dim, dtype=flatten(params).dtype, device=params[0].device if params else None)
    reverse = _reverse_over_reverse(loss_of_params, params)
    try:
        forward = _forward_over_reverse(loss_of_params, params)
        forward(probe)  # warm-up; raises if some op lacks forward-mode AD
    except Exception as error:  # noqa: BLE001 - any forward-mode failure means "use reverse"
        return Hvp(reverse, REVERSE, dim, fallback_reason=_describe(error))
    reverse(probe)  # warm-up
    # Best of three interleaved timings: one sample each is at the mercy of a busy machine.
    forward_s = reverse_s = math.inf
    for _ in range(3):
        forward_s = min(forward_s, _seconds(forward, probe))
        reverse_s = min(reverse_s, _seconds(reverse, probe))
    if forward_s <= reverse_s:
        return Hvp(forward, FORWARD, dim)
    return Hvp(reverse, REVERSE, dim)


def quadratic_form(hvp: Operator, v: Tensor) -> float:
    """Return ``vᵀ H v`` (one operator call); the second-order Taylor term is half of this."""
    return dot(v, hvp(v))


def directional_curvature(hvp: Operator, v: Tensor) -> float:
    """Return the Rayleigh quotient ``vᵀ H v / vᵀ v`` (curvature along ``v``)."""
    return quadratic_form(hvp, v) / dot(v, v)


def _private(generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a fresh private one seeded with ``DEFAULT_SEED`` (never the global RNG)."""
    return generator if generator is not None else torch.Generator().manual_seed(DEFAULT_SEED)


@dataclass(frozen=True)
class LanczosResult:
    """Top Ritz pair, its honest residual ``‖Hv − λv‖`` and the number of operator calls."""

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    iterations: int


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the float64 tridiagonal T = tridiag(β, α, β)."""
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from ``w`` its components along the orthonormal rows of ``basis``; return (w, coefficients)."""
    # The three-term recurrence removes the two large components (α q_k, β q_{k−1}) with two axpys;
    # one classical Gram-Schmidt pass against the whole basis then restores orthogonality, and a
    # second pass runs only if that pass still cancelled much of w (the DGKS criterion, Daniel et al.
    # 1976; "twice is enough", Giraud et al. 2005). Full reorthogonalisation at about half the cost.
    # (c @ basis rather than basis.T @ c: the same product, several times faster on CPU.)
    k = basis.shape[0] - 1
    coeffs = torch.zeros(k + 1, dtype=w.dtype, device=w.device)
    coeffs[k] = torch.dot(basis[k], w)
    w = w - coeffs[k] * basis[k]
    if k > 0:
        coeffs[k - 1] = torch.dot(basis[k - 1], w)
        w = w - coeffs[k - 1] * basis[k - 1]
    for _ in range(2):
        before = torch.linalg.vector_norm(w)
        correction = basis @ w
        w = w - correction @ basis
        coeffs = coeffs + correction
        if torch.linalg.vector_norm(w) > 0.7 * before:
            break
    return w, coeffs


class KrylovBasis:
    """The Lanczos vectors as rows of one matrix that grows by doubling (up to ``limit`` rows).

    Each row is the size of the model: allocating all ``limit`` rows up front would reserve, on a GPU,
    40 copies of a large model for a warm start that needs a handful.
    """

    def __init__(self, limit: int, dim: int, dtype=None, device=None) -> None:
        self.limit = limit
        self._matrix = torch.empty(min(limit, 8), dim, dtype=dtype, device=device)
        self.count = 0

    @property
    def capacity(self) -> int:
        return self._matrix.shape[0]

    @property
    def rows(self) -> Tensor:
        """The vectors appended so far (a view)."""
        return self._matrix[: self.count]

    def append(self, q: Tensor) -> None:
        """Add one vector as the next row, doubling the storage when it is full."""
        if self.count == self.limit:
            raise IndexError(f"the basis already holds its limit of {self.limit} vectors")
        if self.count == self.capacity:
            grown = torch.empty(
                min(self.limit, 2 * self.capacity),
                self._matrix.shape[1],
                dtype=self._matrix.dtype,
                device=self._matrix.device,
            )
            grown[: self.count] = self._matrix
            self._matrix = grown
        self._matrix[self.count] = q
        self.count += 1


def lanczos(
    operator: Operator,
    dim: int,
    *,
    iterations: int = 20,
    start: Tensor | None = None,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    dtype=None,
    device=None,
    stop: str = "residual",
    verify: bool = True,
    agree: Callable[[bool], bool] | None = None,
) -> LanczosResult:
    """Largest algebraic eigenpair of a symmetric operator by Lanczos with full reorthogonalisation.

    Runs at most ``min(iterations, dim)`` Lanczos steps, stopping once the Ritz residual estimate
    ``β_k |s_k|`` of the top pair (Golub & Van Loan, Matrix Computations, §10.1) falls below
    ``tol·|λ|`` or the Krylov space becomes invariant (β ≈ 0). Then one extra operator call computes
    the reported residual ``‖Hv − λv‖`` honestly, with λ the Rayleigh quotient of the returned unit
    vector; ``iterations`` in the result counts all operator calls, including that one.
    Only the spectrum reachable from ``start`` is seen: a start exactly orthogonal to the top
    eigenvector cannot find it. The Krylov vectors and all arithmetic use ``dtype`` if given, else the
    operator's output dtype promoted to at least float32 (a 16-bit basis loses orthogonality at once);
    the operator receives vectors in that dtype. The device defaults to that of the operator's output.
    Random start vectors come from ``generator`` (default: a private one seeded with ``DEFAULT_SEED``).
    Raises FloatingPointError if the operator returns NaN/inf, including in the verifying product.

    ``stop="eigenvalue"`` targets the eigenvalue instead of the eigenvector: it stops once the
    estimated error of the top Ritz value, min(r, r²/gap) with r = β_k|s_k| and gap the distance to
    the second Ritz value (Saad, Numerical Methods for Large Eigenvalue Problems, Thm 3.9 / Kato–Temple),
    and its change over the last step are both ≤ ``tol·|λ|``. Fewer calls for the same λ accuracy when
    the top eigenvalue is isolated; when the top eigenvalues crowd together the Ritz gap overstates the
    true gap and it can stop early. The returned residual is still a rigorous bound on the distance
    from the estimate to an eigenvalue.

    ``verify=False`` skips the extra call: the eigenvalue is the Ritz value and the residual the
    Lanczos estimate β_k|s_k|, which with full reorthogonalisation equals ‖Hv − λv‖ up to rounding
    (the relation H Q = Q T + β q e_kᵀ holds to working precision; Paige 1976).

    ``agree``: each step's decision to stop passes through it (several processes: an all-reduce MAX, so
    that all stop as soon as one would), and every process makes the same number of operator calls.
    """
    if dim < 1 or iterations < 1:
        raise ValueError("dim and iterations must be positive")
    if stop not in ("residual", "eigenvalue"):
        raise ValueError(f"stop must be 'residual' or 'eigenvalue', got {stop!r}")
    q = start.reshape(-1) if start is not None else rademacher(dim, _private(generator), dtype, device)
    q = q.to(dtype=dtype or working_dtype(q.dtype), device=device or q.device)
    norm = torch.linalg.vector_norm(q)
    if not norm > 0:
        raise ValueError("start vector must be nonzero")
    q = q / norm
    steps = min(iterations, dim)
    basis: KrylovBasis | None = None
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    previous = math.nan
    for k in range(steps):
        w = operator(q)
        if basis is None:  # adopt the operator's dtype (at least float32) and device unless told otherwise
            q = q.to(dtype=dtype or working_dtype(w.dtype), device=device or w.device)
            rescale = torch.linalg.vector_norm(q)  # H is linear: renormalise q and Hq together
            q, w = q / rescale, w.to(q) / rescale
            basis = KrylovBasis(steps, dim, dtype=q.dtype, device=q.device)
        basis.append(q)
        w, coeffs = _orthogonalise(w.to(q), basis.rows)
        alphas.append(float(coeffs[k]))
        beta = float(torch.linalg.vector_norm(w))
        if not math.isfinite(alphas[-1] + beta):
            raise FloatingPointError(f"operator returned non-finite values at Lanczos step {k}")
        betas.append(beta)
        values, vectors = _ritz(alphas, betas)
        theta, s = float(values[-1]), vectors[:, -1]
        scale = max(scale, abs(alphas[-1]), beta)
        estimate = beta * abs(float(s[-1]))
        if stop == "eigenvalue" and k > 0:
            # Ritz value error ≈ r²/gap for an isolated top eigenvalue; the change guards a bad gap estimate.
            gap = theta - float(values[-2])
            estimate = min(estimate, estimate**2 / gap) if gap > 0 else estimate
            estimate = max(estimate, abs(theta - previous))
        previous = theta
        converged = estimate <= tol * abs(theta) and (stop == "residual" or k > 0)
        # Invariant subspace: the Ritz values are eigenvalues up to β. No √dim factor: rounding leaves β at
        # a few eps·scale whatever the dimension, and a small β already bounds the residual β|s_k| ≤ β.
        invariant = beta <= 16 * torch.finfo(q.dtype).eps * scale or scale == 0.0
        finished = converged or invariant
        if agree is not None and k + 1 < steps:  # the last step ends the loop everywhere: nothing to agree on
            finished = agree(finished)
        if finished:
            break
        q = w / beta
    assert basis is not None
    ritz = s.to(basis.rows.dtype) @ basis.rows
    ritz = ritz / torch.linalg.vector_norm(ritz)
    if not verify:
        return LanczosResult(theta, ritz.detach(), beta * abs(float(s[-1])), len(alphas))
    h_ritz = operator(ritz).to(ritz.dtype)
    eigenvalue = float(torch.dot(ritz, h_ritz))
    residual = float(torch.linalg.vector_norm(h_ritz - eigenvalue * ritz))
    if not math.isfinite(eigenvalue + residual):
        raise FloatingPointError("operator returned non-finite values in the verifying product")
    return LanczosResult(eigenvalue, ritz.detach(), residual, len(alphas) + 1)


def hutchinson_trace(
    operator: Operator,
    dim: int,
    *,
    samples: int = 20,
    generator: torch.Generator | None = None,
    dtype=None,
    device=None,
) -> tuple[float, float]:
    """Estimate tr(H) as the mean of zᵀHz over Rademacher z (Hutchinson 1989); return (mean, stderr).

    ``generator`` defaults to a private one seeded with ``DEFAULT_SEED`` (the global RNG is never touched).
    """
    if samples < 1:
        raise ValueError("samples must be positive")
    generator = _private(generator)
    values = []
    for _ in range(samples):
        z = rademacher(dim, generator, dtype, device)
        values.append(dot(operator(z), z))
    v = torch.tensor(values, dtype=torch.float64)
    stderr = float(v.std() / samples**0.5) if samples > 1 else float("inf")
    return float(v.mean()), stderr

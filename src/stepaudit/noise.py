"""Gradient noise of one mini-batch: tr Σ, ‖G‖² and the simple noise scale B_simple = tr Σ / ‖G‖².

McCandlish, Kaplan, Amodei et al. (2018), "An Empirical Model of Large-Batch Training", §2 and
appendix A: G is the true gradient, Σ the per-example gradient covariance; when the batch size
B ≪ B_simple, noise dominates each step. Pure functions over a functional loss
``loss(params: dict, batch) -> scalar`` (the *mean* over the batch's examples); nothing here
touches a module's parameters, buffers or ``.grad``.

All three estimators share one formula. The batch is cut into *units* m = 1..n (single examples,
or micro-batches) of b_m examples with gradients ĝ_m; B = Σ b_m. With S₁ = Σ b_m ĝ_m and
S₂ = Σ b_m ‖ĝ_m‖² (since E[b_m‖ĝ_m‖²] = b_m‖G‖² + tr Σ and E[‖S₁‖²/B] = B‖G‖² + tr Σ):

    tr Σ̂  = (S₂ − ‖S₁‖²/B) / (n − 1)          unbiased
    ‖G‖²̂ = ‖S₁‖²/B² − tr Σ̂ / B               unbiased

For single examples (b_m = 1, n = B) this is tr Σ̂ = (Σ‖g_i‖² − B‖ḡ‖²)/(B − 1). Standard errors
come from a delete-one-group jackknife over K groups of units (each group keeps its own S₁, so
memory is K gradient copies plus one chunk of per-example gradients, never B of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

Loss = Callable[[Mapping[str, Tensor], Any], Tensor]

DEFAULT_GROUPS = 8
DEFAULT_BUDGET_BYTES = 64 * 2**20  # per-example gradients held at once, per chunk


@dataclass
class Moments:
    """Sufficient statistics of a batch's unit gradients, kept per jackknife group (float64).

    ``sums[k] = Σ_{m∈k} b_m ĝ_m`` (flat), ``sq[k] = Σ_{m∈k} b_m ‖ĝ_m‖²``, ``size[k] = Σ_{m∈k} b_m``,
    ``units[k]`` = number of units in group k; ``loss_sum`` = Σ b_m · loss_m (for a reduction check).
    ``gram`` = the K×K matrix ⟨sums[k], sums[l]⟩, all that ``estimate`` needs: a producer may give it
    alone (``sums=None``) when forming the K flat vectors would cost more than their inner products;
    such moments cannot be merged.
    """

    sums: Tensor | None
    sq: Tensor
    size: Tensor
    units: Tensor
    loss_sum: float = math.nan
    gram: Tensor | None = None

    def inner_products(self) -> Tensor:
        """K×K ⟨S₁ₖ, S₁ₗ⟩ (float64): ‖S₁ − S₁ₖ‖² without touching the vectors again."""
        return self.gram if self.gram is not None else self.sums @ self.sums.T

    def merge(self, other: Moments) -> Moments:
        """Statistics of the union of two disjoint sets of units (group k joins group k)."""
        if self.sums is None or other.sums is None:
            raise ValueError("moments given only as inner products cannot be merged")
        if self.sq.shape != other.sq.shape:  # e.g. a micro-batch smaller than the group count
            return Moments.concat([self, other])
        return Moments(
            self.sums + other.sums,
            self.sq + other.sq,
            self.size + other.size,
            self.units + other.units,
            self.loss_sum + other.loss_sum,
        )

    @staticmethod
    def concat(parts: list[Moments]) -> Moments:
        """Statistics of disjoint sets of units, each set keeping its own groups."""
        if any(p.sums is None for p in parts):
            raise ValueError("moments given only as inner products cannot be merged")
        return Moments(
            torch.cat([p.sums for p in parts]),
            torch.cat([p.sq for p in parts]),
            torch.cat([p.size for p in parts]),
            torch.cat([p.units for p in parts]),
            sum(p.loss_sum for p in parts),
        )

    @property
    def batch_size(self) -> int:
        return int(self.size.sum())

    def mean_grad(self) -> Tensor:
        """ḡ = S₁/B, the mean gradient of the batch (flat, float64)."""
        return self.sums.sum(0) / self.size.sum()


@dataclass
class NoiseEstimate:
    """tr Σ, ‖G‖², B_simple and the batch's signal-to-noise ratio, with jackknife standard errors."""

    trace_sigma: float
    grad_sq_norm: float
    noise_scale: float
    grad_snr: float
    trace_sigma_stderr: float
    grad_sq_norm_stderr: float
    noise_stderr: float
    method: str
    batch_size: int
    units: int

    def fields(self) -> dict:
        """Record fields (field vocabulary of docs/design.md; the method goes to ``noise_scale_method``)."""
        return {
            "noise_scale": self.noise_scale,
            "grad_sq_norm": self.grad_sq_norm,
            "trace_sigma": self.trace_sigma,
            "grad_snr": self.grad_snr,
            "noise_stderr": self.noise_stderr,
            "trace_sigma_stderr": self.trace_sigma_stderr,
            "grad_sq_norm_stderr": self.grad_sq_norm_stderr,
            "noise_scale_method": self.method,
            "noise_units": self.units,
        }


def _statistics(s1_sq: float, s2: float, size: float, units: float) -> tuple[float, float, float]:
    """(tr Σ̂, ‖G‖²̂, B_simple) from ‖S₁‖², S₂, B and n (formulas in the module docstring)."""
    trace = (s2 - s1_sq / size) / (units - 1)
    signal = s1_sq / size**2 - trace / size
    return trace, signal, noise_scale(trace, signal)


def noise_scale(trace_sigma: float, grad_sq_norm: float) -> float:
    """B_simple = tr Σ / ‖G‖²; ``inf`` when the ‖G‖² estimate is ≤ 0 (noise hides the mean gradient)."""
    if not (math.isfinite(trace_sigma) and math.isfinite(grad_sq_norm)):
        return math.nan
    if grad_sq_norm <= 0:
        return math.inf if trace_sigma > 0 else math.nan
    return trace_sigma / grad_sq_norm


def estimate(moments: Moments, method: str) -> NoiseEstimate:
    """Point estimates from all units, standard errors by delete-one-group jackknife."""
    gram = moments.inner_products()
    # one host transfer each; the jackknife below is K small scalar formulas
    rows, own = gram.sum(1).tolist(), gram.diagonal().tolist()
    sq, sizes, counts = moments.sq.tolist(), moments.size.tolist(), moments.units.tolist()
    s1_sq, s2, size, units = math.fsum(rows), math.fsum(sq), math.fsum(sizes), math.fsum(counts)
    if units < 2:
        raise ValueError(f"noise statistics need at least 2 gradient units, got {int(units)}")
    trace, signal, scale = _statistics(s1_sq, s2, size, units)
    errors = [math.nan, math.nan, math.nan]
    keep = [k for k in range(len(sq)) if counts[k] > 0]
    if len(keep) >= 2 and all(units - counts[k] >= 2 for k in keep):
        # ‖S₁ − S₁ₖ‖² = ‖S₁‖² − 2⟨S₁, S₁ₖ⟩ + ‖S₁ₖ‖²
        leave_one_out = [
            _statistics(s1_sq - 2 * rows[k] + own[k], s2 - sq[k], size - sizes[k], units - counts[k]) for k in keep
        ]
        n_groups = len(keep)
        for j in range(3):
            column = [row[j] for row in leave_one_out]
            if all(math.isfinite(value) for value in column):
                mean = math.fsum(column) / n_groups
                errors[j] = math.sqrt((n_groups - 1) / n_groups * math.fsum((v - mean) ** 2 for v in column))
    snr = size * signal / trace if trace > 0 else math.inf  # B/B_simple = ‖G‖² / (tr Σ / B)
    return NoiseEstimate(trace, signal, scale, snr, errors[0], errors[1], errors[2], method, int(size), int(units))


def _flat_dim(params: Mapping[str, Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def batch_len(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a (nested) batch, or None."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Examples ``start:stop`` of a batch: every tensor whose leading dimension is ``size`` is sliced."""
    leaves, spec = tree_flatten(batch)
    cut = [
        leaf[start:stop] if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == size else leaf
        for leaf in leaves
    ]
    return tree_unflatten(cut, spec)


def _empty(params: Mapping[str, Tensor], groups: int) -> Moments:
    device = next(iter(params.values())).device
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    return Moments(zeros(groups, _flat_dim(params)), zeros(groups), zeros(groups), zeros(groups), 0.0)


def auto_chunk(params: Mapping[str, Tensor], budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Examples per vmap call so that their per-example gradients fit in ``budget_bytes``."""
    per_example = sum(p.numel() * p.element_size() for p in params.values())
    return max(1, budget_bytes // max(per_example, 1))


def per_sample_moments(
    loss: Loss,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    chunk: int | None = None,
    groups: int = DEFAULT_GROUPS,
    randomness: str = "different",
) -> Moments:
    """Per-example gradients by ``vmap(grad(...))`` over chunks of examples, reduced as they come.

    Each example is fed to ``loss`` as a batch of one (leading dimension 1). Only one chunk of
    per-example gradients exists at a time: it is folded into per-group sums (``index_add_``) and
    per-example squared norms, then freed.
    """
    size = batch_len(batch)
    if size is None or size < 2:
        raise ValueError(f"per-example gradients need a batch with at least 2 examples, got {size}")
    leaves, spec = tree_flatten(batch)
    batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == size for x in leaves]
    groups = max(1, min(groups, size))
    chunk = max(1, min(chunk or auto_chunk(params), size))
    names = list(params)

    def example_loss(p: dict, *examples: Tensor) -> Tensor:
        rows = iter(examples)
        one = [next(rows).unsqueeze(0) if b else x for x, b in zip(leaves, batched)]
        return loss(p, tree_unflatten(one, spec))

    per_example = vmap(grad_and_value(example_loss), in_dims=(None,) + (0,) * sum(batched), randomness=randomness)
    moments = _empty(params, groups)
    detached = {n: params[n].detach() for n in names}
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        pieces = [x[start:stop] for x, b in zip(leaves, batched) if b]
        grads, values = per_example(detached, *pieces)
        group_of = torch.arange(start, stop, device=moments.sq.device) * groups // size
        squares = torch.zeros(stop - start, dtype=torch.float64, device=moments.sq.device)
        offset = 0
        for name in names:
            g = grads[name].reshape(stop - start, -1)
            group_sums = torch.zeros(groups, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, group_of, g)
            moments.sums[:, offset : offset + g.shape[1]] += group_sums
            squares += torch.linalg.vector_norm(g, dim=1).double() ** 2  # (a vectorised reduction, ~8× vecdot)
            offset += g.shape[1]
        del grads
        moments.sq.index_add_(0, group_of, squares)
        moments.size.index_add_(0, group_of, torch.ones_like(squares))
        moments.loss_sum += float(values.double().sum())
    moments.units = moments.size.clone()
    return moments


def flat_grad(loss: Loss, params: Mapping[str, Tensor], batch: Any) -> tuple[Tensor, float]:
    """Gradient of ``loss`` on ``batch`` as one flat float64 vector, and the loss value."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        value = loss(leaves, batch)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    flat = torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, leaves.values())]
    )
    return flat, float(value.detach())


def micro_batch_moments(loss: Loss, params: Mapping[str, Tensor], batch: Any, micro_batches: int = 8) -> Moments:
    """Units are ``micro_batches`` contiguous micro-batches (sizes differ by at most one).

    Each micro-batch gradient ĝ_m has covariance Σ/b_m if examples are independent, so the shared
    formula holds. Where examples interact (BatchNorm in train mode) ĝ_m is the gradient of the
    micro-batch's own objective: the estimate is then the noise of b-example steps, rescaled.
    """
    size = batch_len(batch)
    if size is None or micro_batches < 1 or size < micro_batches:
        raise ValueError(f"{micro_batches} micro-batches need a batch of at least {micro_batches} examples, got {size}")
    bounds = torch.linspace(0, size, micro_batches + 1).round().long().tolist()
    moments = _empty(params, micro_batches)
    for m, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        flat, value = flat_grad(loss, params, slice_batch(batch, start, stop, size))
        b = stop - start
        moments.sums[m] = b * flat
        moments.sq[m] = b * float(flat @ flat)
        moments.size[m], moments.units[m] = b, 1
        moments.loss_sum += b * value
    return moments


def two_batch_estimate(small_size: int, small_sq_norm: float, big_size: int, big_sq_norm: float) -> tuple[float, float]:
    """(‖G‖²̂, tr Σ̂) from the squared gradient norms at two batch sizes (McCandlish et al., A.1).

    ‖G‖² ≈ (B_big‖G_big‖² − B_small‖G_small‖²)/(B_big − B_small),
    tr Σ ≈ (‖G_small‖² − ‖G_big‖²)/(1/B_small − 1/B_big). Each is unbiased but noisy: average
    them over steps before dividing (``TwoBatchAverage``). Under DDP the local gradient is the
    small batch and the all-reduced one the big batch, so this costs one extra norm.
    """
    if not 0 < small_size < big_size:
        raise ValueError(f"need 0 < small_size < big_size, got {small_size} and {big_size}")
    signal = (big_size * big_sq_norm - small_size * small_sq_norm) / (big_size - small_size)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / small_size - 1.0 / big_size)
    return signal, trace


class TwoBatchAverage:
    """Running means of the two-batch estimates; B_simple as a ratio of means (delta-method stderr)."""

    def __init__(self) -> None:
        self.n = 0
        self._sums = [0.0] * 5  # Σ signal, Σ trace, Σ signal², Σ trace², Σ signal·trace

    def add(self, signal: float, trace: float) -> None:
        """Add one step's (‖G‖²̂, tr Σ̂)."""
        if math.isfinite(signal) and math.isfinite(trace):
            self.n += 1
            for i, v in enumerate((signal, trace, signal * signal, trace * trace, signal * trace)):
                self._sums[i] += v

    def result(self) -> tuple[float, float, float, float]:
        """(mean ‖G‖², mean tr Σ, B_simple, stderr of B_simple; nan with fewer than 2 steps)."""
        if self.n == 0:
            return math.nan, math.nan, math.nan, math.nan
        n = self.n
        signal, trace = self._sums[0] / n, self._sums[1] / n
        scale = noise_scale(trace, signal)
        if n < 2 or not (signal > 0 and math.isfinite(scale)):
            return signal, trace, scale, math.nan
        var_s = (self._sums[2] - n * signal**2) / (n - 1)
        var_t = (self._sums[3] - n * trace**2) / (n - 1)
        cov = (self._sums[4] - n * signal * trace) / (n - 1)
        # Var(T̄/S̄) ≈ (Var T − 2R Cov + R² Var S) / (n S̄²)
        variance = max(var_t - 2 * scale * cov + scale**2 * var_s, 0.0) / (n * signal**2)
        return signal, trace, scale, math.sqrt(variance)

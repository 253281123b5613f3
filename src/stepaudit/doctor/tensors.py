"""Small tensor helpers of passive capture: fused copies, per-parameter sums, one host sync where possible."""

from __future__ import annotations

import math

import torch

from ..maths import dense, dot_tensor


def copies(tensors: list) -> list:
    """Copies of the tensors in one fused call (per device and dtype)."""
    return torch._foreach_mul(tensors, 1.0) if tensors else []


def grad_copies(params: list) -> list:
    """Copies of the gradients the optimizer is about to use (zeros where ``.grad`` is None)."""
    return copies([dense(p.grad).detach() if p.grad is not None else torch.zeros_like(p) for p in params])


def nonzero_flags(norms: list) -> list[bool]:
    """Which norms are nonzero, with one host sync when they share a device."""
    try:
        return torch.stack(norms).ne(0).tolist()
    except RuntimeError:  # several devices
        return [bool(n.ne(0)) for n in norms]


def parameter_sums(before: list, grad: list, delta: list) -> list[list[float]]:
    """Rows [g·Δw, ‖g‖², ‖Δw‖², ‖w‖²] per parameter (fused norms; one host sync for the model)."""
    if not before:
        return []
    norms = [torch.stack(torch._foreach_norm(ts)).double().pow(2) for ts in (grad, delta, before)]
    dots = torch.stack([dot_tensor(g, d) for g, d in zip(grad, delta)])
    return torch.stack([dots, *norms], dim=1).tolist()


def group_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the first parameter group (NaN when there is none)."""
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan

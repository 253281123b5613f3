"""One gradient step on the objective: simultaneous versus one-weight-at-a-time, and the Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .circuit import DTYPE
from .parse import ExplainError

Objective = Callable[[torch.Tensor], torch.Tensor]


def value_at(fn: Objective, w: np.ndarray) -> float:
    """Objective value at ``w`` (may be nan/inf when a step leaves the domain)."""
    with torch.no_grad():
        return float(fn(torch.as_tensor(w, dtype=DTYPE)).item())


def gradient_at(fn: Objective, w: np.ndarray) -> np.ndarray:
    """Gradient of the objective at ``w`` by autograd."""
    t = torch.tensor(w, dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(fn(t), t, allow_unused=True)
    return np.zeros_like(w) if g is None else g.detach().numpy().copy()


def hessian_at(fn: Objective, w: np.ndarray) -> np.ndarray:
    """Exact Hessian of the objective at ``w`` (double backward through the circuit)."""
    h = torch.autograd.functional.hessian(fn, torch.tensor(w, dtype=DTYPE)).numpy().copy()
    if not np.all(np.isfinite(h)):
        raise ExplainError("the Hessian is not finite at this point")
    return h


def _flips(names: list[str], before: np.ndarray, after: np.ndarray) -> list[dict]:
    return [{"name": n, "before": float(b), "after": float(a)} for n, b, a in zip(names, before, after) if b * a < 0]


@dataclass
class Step:
    """The simultaneous step w - lr*g, split into first-order, quadratic and higher-order parts."""

    lr: float
    old: dict[str, float]
    new: dict[str, float]
    objective_before: float
    objective_after: float
    predicted: float  # first order: -lr*|g|^2
    actual: float
    remainder: float  # actual - predicted
    quadratic: float  # 1/2 * delta^T H delta
    interplay: float  # its off-diagonal part: how moving one weight changes another's slope
    higher_order: float  # actual - predicted - quadratic
    grads_after: dict[str, float] = field(default_factory=dict)
    sign_flips: list[dict] = field(default_factory=list)


def simultaneous(fn: Objective, names: list[str], w: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float) -> Step:
    """Update every weight at once with the gradient taken at the starting point."""
    f0 = value_at(fn, w)
    delta = -lr * g
    w1 = w + delta
    f1 = value_at(fn, w1)
    predicted = float(g @ delta)
    quadratic = float(0.5 * delta @ h @ delta)
    interplay = quadratic - float(0.5 * np.sum(np.diag(h) * delta**2))
    actual = f1 - f0
    g1 = gradient_at(fn, w1) if math.isfinite(f1) else np.full_like(w, math.nan)
    return Step(
        lr,
        dict(zip(names, map(float, w))),
        dict(zip(names, map(float, w1))),
        f0,
        f1,
        predicted,
        actual,
        actual - predicted,
        quadratic,
        interplay,
        actual - predicted - quadratic,
        dict(zip(names, map(float, g1))),
        _flips(names, g, g1),
    )


def sequential(fn: Objective, names: list[str], w: np.ndarray, g: np.ndarray, lr: float) -> dict:
    """Update one weight at a time in order, recomputing the gradient before each update."""
    cur = w.copy()
    f0 = value_at(fn, w)
    updates = []
    for i, n in enumerate(names):
        gi = gradient_at(fn, cur)[i] if i else g[i]
        old = float(cur[i])
        cur[i] = old - lr * gi
        updates.append(
            {
                "name": n,
                "grad_used": float(gi),
                "grad_at_start": float(g[i]),
                "sign_flipped": bool(gi * g[i] < 0),
                "old": old,
                "new": float(cur[i]),
                "objective": value_at(fn, cur),
            }
        )
    f1 = value_at(fn, cur)
    return {
        "order": list(names),
        "updates": updates,
        "new": dict(zip(names, map(float, cur))),
        "objective_after": f1,
        "actual": f1 - f0,
    }


def quadratic_bound(g: np.ndarray, h: np.ndarray) -> tuple[float | None, float]:
    """2*|g|^2/(g^T H g): where the quadratic model along -g stops decreasing (None if g^T H g <= 0)."""
    ghg = float(g @ h @ g)
    gg = float(g @ g)
    if gg == 0.0 or ghg <= 0.0:
        return None, ghg
    return 2.0 * gg / ghg, ghg


def profile(fn: Objective, w: np.ndarray, g: np.ndarray, marks: list[float], points: int = 49) -> dict:
    """The objective along -g at evenly spaced lr from 0 to 1.5x the largest finite mark."""
    top = _nice(1.5 * max([m for m in marks if m is not None and math.isfinite(m)] + [1e-12]))
    lrs = np.linspace(0.0, top, points)
    with torch.no_grad():
        t = torch.as_tensor(lrs, dtype=DTYPE)[:, None]
        vals = fn(torch.as_tensor(w, dtype=DTYPE) - t * torch.as_tensor(g, dtype=DTYPE)).numpy()
    return {"lr": lrs.tolist(), "objective": vals.tolist()}


def _nice(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= x."""
    p = 10.0 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 2.5, 5, 10) if m * p >= x * (1 - 1e-12))

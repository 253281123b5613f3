"""The set of learning rates lr > 0 for which the simultaneous step w - lr*g lowers the objective.

phi(lr) = objective(w - lr*g).  When the expression is a polynomial in its variables, phi is a
polynomial in lr: its coefficients are expanded exactly (rational arithmetic on the float64
inputs) and the set {lr > 0 : phi(lr) < phi(0)} is read off its real roots, each sign checked
exactly.  Otherwise phi is scanned on a dense log+linear grid and the sign changes are bisected;
that answer is labelled numerical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction

import numpy as np
import torch

from .circuit import DTYPE, evaluate, objective_expr
from .parse import Expr

MAX_DEGREE = 24
SCAN_RANGE = (1e-6, 1e3)  # the scan covers these lr, and these step lengths lr*|g| (see scan_range)
MAX_INTERVALS = 50

Poly = list[Fraction]  # coefficients, lowest degree first


def _has_vars(e: Expr) -> bool:
    return e.op == "var" or any(_has_vars(a) for a in e.args)


def _const_value(e: Expr) -> float:
    with torch.no_grad():
        return float(evaluate(e, {}).item())


def degree(e: Expr) -> int | None:
    """Polynomial degree of ``e`` in its variables, or None when it is not a polynomial."""
    if not _has_vars(e):
        return 0 if math.isfinite(_const_value(e)) else None
    if e.op == "var":
        return 1
    ds = [degree(a) for a in e.args]
    if any(d is None for d in ds):
        return None
    if e.op in ("neg", "add", "sub"):
        return max(ds)  # type: ignore[type-var]
    if e.op == "mul":
        return ds[0] + ds[1]  # type: ignore[operator]
    if e.op == "div" and ds[1] == 0 and _const_value(e.args[1]) != 0.0:
        return ds[0]
    if e.op == "pow" and ds[1] == 0:
        n = _const_value(e.args[1])
        if n >= 0 and n == int(n) and ds[0] * n <= MAX_DEGREE:  # type: ignore[operator]
            return ds[0] * int(n)  # type: ignore[operator]
    if e.op == "loss":
        return 2 * ds[0]  # type: ignore[operator]
    return None


def _mul(p: Poly, q: Poly) -> Poly:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        if a:
            for j, b in enumerate(q):
                out[i + j] += a * b
    return out


def _add(p: Poly, q: Poly, sign: int = 1) -> Poly:
    n = max(len(p), len(q))
    p, q = p + [Fraction(0)] * (n - len(p)), q + [Fraction(0)] * (n - len(q))
    return [a + sign * b for a, b in zip(p, q)]


def expand(e: Expr, point: Mapping[str, float], direction: Mapping[str, float]) -> Poly:
    """Exact coefficients of ``e`` along the ray w + t*direction, as a polynomial in t."""
    if not _has_vars(e):
        return [Fraction(_const_value(e))]
    if e.op == "var":
        return [Fraction(point[e.name]), Fraction(direction[e.name])]  # type: ignore[index]
    ps = [expand(a, point, direction) for a in e.args]
    if e.op == "neg":
        return [-c for c in ps[0]]
    if e.op in ("add", "sub"):
        return _add(ps[0], ps[1], 1 if e.op == "add" else -1)
    if e.op == "mul":
        return _mul(ps[0], ps[1])
    if e.op == "div":
        return [c / ps[1][0] for c in ps[0]]
    if e.op == "pow":
        out: Poly = [Fraction(1)]
        for _ in range(int(ps[1][0])):
            out = _mul(out, ps[0])
        return out
    if e.op == "loss":
        r = _add(ps[0], [Fraction(e.value)], -1)  # type: ignore[arg-type]
        return [c / 2 for c in _mul(r, r)]
    raise ValueError(f"not a polynomial gate: {e.op}")


def _sign(q: Poly, t: float) -> int:
    """Exact sign of q(t) (Horner in rational arithmetic)."""
    x, acc = Fraction(t), Fraction(0)
    for c in reversed(q):
        acc = acc * x + c
    return (acc > 0) - (acc < 0)


def _bisect(sign: Callable[[float], int], lo: float, hi: float, iters: int = 200) -> float:
    """Shrink [lo, hi] around a sign change until the two ends are adjacent floats."""
    s_lo = sign(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if sign(mid) == s_lo:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _intervals(breaks: list[float], signs: list[int]) -> list[list[float | None]]:
    """Merge the segments (0, b1), (b1, b2), ..., (bk, inf) whose sign is negative."""
    edges: list[float | None] = [0.0, *breaks, None]
    out: list[list[float | None]] = []
    for i, s in enumerate(signs):
        if s >= 0:
            continue
        if out and out[-1][1] == edges[i]:
            out[-1][1] = edges[i + 1]
        else:
            out.append([edges[i], edges[i + 1]])
    return out


def _float(c: Fraction) -> float:
    try:
        return float(c)
    except OverflowError:
        return math.inf if c > 0 else -math.inf  # shown as null in the JSON


def _log2(c: Fraction) -> int:
    return abs(c.numerator).bit_length() - c.denominator.bit_length()


def _candidate_roots(q: Poly) -> list[float]:
    """Approximate positive real roots of q by numpy.roots, after exact rescaling to float range.

    With t = 2^e * s and 2^e near the geometric mean of the roots' sizes, the coefficients of
    q(2^e s) are balanced; dividing by a power of two keeps them within float64.  Roots from the
    unscaled coefficients are added when those are representable.  Near-real complex roots count
    too: every candidate is only a place to look, sign-checked exactly afterwards.
    """
    if len(q) < 2:
        return []
    n, top = len(q) - 1, _log2(q[-1])
    low = next(k for k, c in enumerate(q) if c)
    scales = {round((_log2(q[low]) - top) / (n - low)) if low < n else 0, 0}
    found: list[float] = []
    for e in scales:
        scaled = [c * Fraction(2) ** (e * k) for k, c in enumerate(q)]
        big = max(_log2(c) for c in scaled if c)
        try:
            roots = np.roots([float(c / Fraction(2) ** big) for c in reversed(scaled)])
        except (OverflowError, np.linalg.LinAlgError):
            continue
        found += [_ldexp(float(r.real), e) for r in roots if r.real > 0 and abs(r.imag) <= 1e-3 * abs(r)]
    return sorted(r for r in found if math.isfinite(r))


def _ldexp(x: float, e: int) -> float:
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def polynomial_set(tree: Expr, point: Mapping[str, float], grads: Mapping[str, float]) -> dict | None:
    """The decreasing set from the exact polynomial phi, or None when the objective is not one."""
    d = degree(tree)
    if d is None or d > MAX_DEGREE:
        return None
    phi = expand(tree, point, {n: -g for n, g in grads.items()})
    q = phi[1:]  # (phi(t) - phi(0)) / t, positive t only
    while q and q[-1] == 0:
        q.pop()
    info = {"method": "polynomial", "degree": len(q), "coefficients": [_float(c) for c in phi]}
    if not q:
        return {**info, "intervals": []}
    cands = _candidate_roots(q)
    breaks: list[float] = []
    for r in cands:
        if not breaks or r > breaks[-1] * (1 + 1e-12):
            breaks.append(float(r))
    probes = [b / 2 for b in breaks[:1]] + [0.5 * (a + b) for a, b in zip(breaks, breaks[1:])]
    probes = probes + [2 * breaks[-1] + 1] if breaks else [1.0]
    signs = [_sign(q, t) for t in probes]
    # sharpen each sign change between neighbouring probes to float precision, exactly signed
    edges: list[float] = []
    kept: list[int] = [signs[0]]
    for i in range(len(breaks)):
        if signs[i] != signs[i + 1]:
            edges.append(_bisect(lambda t: _sign(q, t), probes[i], probes[i + 1]))
            kept.append(signs[i + 1])
    lead, first = (q[-1] > 0) - (q[-1] < 0), (q[0] > 0) - (q[0] < 0)
    if kept[-1] != lead or (first != 0 and kept[0] != first):
        return None  # numpy.roots missed a sign change: fall back to the numerical scan
    return {**info, "intervals": _intervals(edges, kept)}


def scan_range(gnorm: float) -> tuple[float, float]:
    """Learning rates to scan: both lr and the step length lr*|g| run over at least SCAN_RANGE."""
    lo, hi = SCAN_RANGE
    return max(lo / max(1.0, gnorm), 1e-300), min(hi / min(1.0, gnorm), 1e300)


def numerical_set(
    fn: Callable[[torch.Tensor], torch.Tensor], w: np.ndarray, g: np.ndarray, extra: tuple[float, ...] = ()
) -> dict:
    """Scan lr over scan_range(|g|) (log and linear grids), then bisect every sign change."""
    big = float(np.max(np.abs(g)))
    lo, hi = scan_range(big * float(np.linalg.norm(g / big)))  # scaled: |g| may overflow
    grid = np.unique(
        np.concatenate(
            [
                np.logspace(math.log10(lo), math.log10(hi), 3000),
                np.linspace(lo, hi / 100, 3000),
                [t for t in extra if lo <= t <= hi],
            ]
        )
    )
    wt, gt = torch.as_tensor(w, dtype=DTYPE), torch.as_tensor(g, dtype=DTYPE)
    with torch.no_grad():
        f0 = fn(wt)

        def drop(ts: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(ts, dtype=DTYPE)[:, None]
            return (fn(wt - t * gt) - f0).numpy()

        dec = drop(grid) < 0  # nan (outside the domain) counts as "not decreasing"
        idx = np.flatnonzero(dec[1:] != dec[:-1])
        lo_t, hi_t, lo_dec = grid[idx], grid[idx + 1], dec[idx]
        for _ in range(80 if idx.size else 0):  # bisect every sign change at once
            mid = 0.5 * (lo_t + hi_t)
            same = (drop(mid) < 0) == lo_dec
            lo_t, hi_t = np.where(same, mid, lo_t), np.where(same, hi_t, mid)
    edges = [float(e) for e in 0.5 * (lo_t + hi_t)]
    kept = [-1 if dec[0] else 1] + [-1 if dec[i + 1] else 1 for i in idx]
    intervals = _intervals(edges, kept)
    out = {
        "method": "numerical",
        "scan": {"from": lo, "to": hi, "points": int(grid.size)},
        "intervals": intervals[:MAX_INTERVALS],
        "count": len(intervals),
    }
    if len(intervals) > MAX_INTERVALS:  # keep the JSON small; the supremum still comes from all
        out["truncated"] = True
        out["sup"] = intervals[-1][1]
    return out


def decreasing_set(
    expr: Expr,
    target: float | None,
    fn: Callable[[torch.Tensor], torch.Tensor],
    names: list[str],
    w: np.ndarray,
    g: np.ndarray,
    extra: tuple[float, ...] = (),
) -> dict:
    """Exact set for polynomial objectives, numerical scan otherwise."""
    if not np.any(g):
        return {"method": "exact", "intervals": [], "note": "the gradient is zero: the step does not move"}
    point = dict(zip(names, map(float, w)))
    exact = polynomial_set(objective_expr(expr, target), point, dict(zip(names, map(float, g))))
    return exact if exact is not None else numerical_set(fn, w, g, tuple(extra))

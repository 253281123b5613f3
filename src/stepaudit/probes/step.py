"""The step probe: did the step go downhill on its own batch, and how does that compare to g·Δw?

Pure functions over a few floats; the context supplies the numbers. Field names follow docs/design.md.
"""

from __future__ import annotations

import math


def parabola(loss_before: float, loss_after: float, first_order: float, noise: float = 0.0) -> dict[str, float]:
    """Fit p(t) = loss_before + first_order·t + c·t² through (1, loss_after); locate the step on it.

    ``best_scale`` is the minimiser t* = −first_order / (2c) (``inf`` when the parabola is not
    convex along a descent direction, ``nan`` when it has no minimum at all). ``alpha`` follows
    Cockpit (Schneider et al., 2021): the step t = 1 mapped so that −1 is "did not move", 0 the
    valley floor t*, +1 the opposite wall at 2t*; i.e. alpha = 1/t* − 1. Concave or linear along
    a descent direction gives −1 (still going downhill where it stopped); so does a curvature term
    no larger than the rounding ``noise`` of the two losses (no measurable curvature). ``alpha`` is ``nan``
    when the step is not a first-order descent direction (first_order ≥ 0): there is no valley
    ahead to place it in.
    """
    curvature = loss_after - loss_before - first_order  # c, the remainder
    if not all(map(math.isfinite, (loss_before, loss_after, first_order))):
        return {"alpha": math.nan, "best_scale": math.nan}
    if first_order < 0:
        if curvature <= noise:
            return {"alpha": -1.0, "best_scale": math.inf}
        best = -first_order / (2.0 * curvature)
        return {"alpha": 1.0 / best - 1.0, "best_scale": best}
    if curvature > 0:  # uphill start, convex: the minimum lies behind, at a negative scale
        return {"alpha": math.nan, "best_scale": -first_order / (2.0 * curvature)}
    return {"alpha": math.nan, "best_scale": math.nan}


def verdict(loss_before: float, loss_after: float, rounding_noise: float, moved: bool = True) -> str:
    """Classify the step: ``nonfinite``, ``flat`` (|delta| within rounding noise), ``decrease`` or ``increase``."""
    if not (math.isfinite(loss_before) and math.isfinite(loss_after)):
        return "nonfinite"
    delta = loss_after - loss_before
    if not moved or abs(delta) <= rounding_noise:
        return "flat"
    return "decrease" if delta < 0 else "increase"


def rounding_noise(loss_before: float, loss_after: float, relative_error: float) -> float:
    """Bound on the rounding error of ``delta``: both evaluations may each be off by relative_error·|loss|.

    ``relative_error`` comes from a measurement (see ``precision.measure_relative_error``) or,
    failing that, from the unit roundoff of the dtype the loss was computed in.
    """
    scale = max(abs(loss_before), abs(loss_after))
    return 2.0 * relative_error * scale if math.isfinite(scale) else math.inf


def step_fields(loss_before: float, loss_after: float, first_order: float, noise: float, moved: bool) -> dict:
    """All own-batch fields of one step from its two losses and its first-order promise."""
    delta = loss_after - loss_before
    record = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "delta": delta,
        "first_order": first_order,
        "remainder": delta - first_order,
        "rounding_noise": noise,
        "verdict": verdict(loss_before, loss_after, noise, moved),
    }
    record.update(parabola(loss_before, loss_after, first_order, noise))
    return record

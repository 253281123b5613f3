"""Learning-rate suggestions from a range test: fastai's four rules and stepaudit's own.

fastai's rules (as documented for ``Learner.lr_find``'s ``suggest_funcs``; written here from those
definitions) read the smoothed loss curve after dropping its first tenth and last five points:

- ``minimum``: the lr at the lowest smoothed loss, divided by 10;
- ``steep``: the lr where the loss falls fastest per decade, d loss / d log10(lr) most negative
  (forward differences; the lr at the left end of the steepest segment);
- ``valley``: the longest strictly decreasing subsequence of the losses (not necessarily contiguous), of
  length ℓ ending at index e; it spans the ℓ + 1 points from s = e − ℓ to e (fastai's own count), and
  the suggestion is the lr at index s + ⌊ℓ/3⌋ + ⌊ℓ/6⌋, about halfway down that valley;
- ``slide``: with the loss gradient taken per grid step (``np.gradient``), slide a window of 15 points
  leftward from the right end of the curve until the gradients at its two ends differ by at most 0.005;
  the lr at the window's left end then (the last one it moved past while they still differed).

stepaudit's rule (``stepaudit_rule``), in three parts:

1. ``lr_up``: the first lr of the sweep from which steps raised the loss of their own batch (beyond rounding
   noise) on at least ``RISE_NEEDED`` = 3 of ``RISE_WINDOW`` = 5 consecutive steps, starting with a rise (a
   majority of what is left when the sweep ends sooner). On a quadratic, a plain SGD step raises its batch's
   loss exactly when lr > 2/λ along its gradient, and every step above that rises, so the rule finds the first
   such lr; on real batches a single rise can be one batch's accident (the transformer LM with Adam: the first
   single rise moved from 0.0013 to 0.079 across seeds), a majority of the next five steps (a factor 2.1 in lr
   on the default grid) is the typical step overshooting.
2. Half of it: a plain step at lr_up/2 lands near its batch's valley floor (α ≈ 0, lr·λ = 1) instead of past it.
3. Momentum: scale by the gain the sweep did not see. A heavy-ball step is Δw = −lr·b with b ← β·b + (1−d)·g
   (torch's SGD; fastai's ``mom``), so along a persistent gradient it reaches the steady-state gain
   G_train = (1−d)/(1−β) (Nesterov: 1 + β(1−d)/(1−β)) times a plain step at the same lr: 10 for β = 0.9.
   The sweep measures the gain each of its steps actually had along its own gradient,
   G = −g·Δw / (lr·‖g‖²) (1 for plain SGD), which differs from G_train because the buffer was built over a few
   steps at smaller lrs and other batches. A step with G > 0 raises its batch's loss when it overshoots,
   lr·G·λ > 2 along g (the parabola through the two losses); a step with G ≤ 0 went uphill: the buffer carried
   it, which says nothing about curvature. So G_sweep is the median G of the rising steps with G > 0 among the
   five that define lr_up (1 if none), lr_up·G_sweep ≈ 2/λ is the plain step that overshoots, and a
   training step at lr has lr·G_train along g, at the valley floor when lr·G_train·λ = 1: the suggestion is
   ½·lr_up·G_sweep/G_train. For plain SGD the factor is 1. On the quadratic it is ≈ (1−β)/λ (tested),
   inside the band (1−√β)²/λ ≤ lr ≤ (1+√β)²/λ where heavy ball contracts at its fastest, √β per step.
4. Adam, AdamW, RMSprop: the floor along the step in the optimizer's metric. They step Δw = −lr·P⁻¹m (P diagonal
   from the second moment, ``probes.preconditioner``). The two losses of a step and its slope g·Δw give the own
   batch's curvature along it, κ_P = ΔwᵀHΔw/ΔwᵀPΔw = 2(Δloss − g·Δw)/ΔwᵀPΔw; a training step lands on its floor
   at lr·G_train·κ_P = 1 (G_train = 1 for Adam's averaged moment, 1/(1−μ) for RMSprop with momentum μ), so the
   suggestion is 1/(G_train·κ_P), κ_P the median over the rising steps of the rise window. With m ∥ g it is
   part 3's ½·lr_up·G_sweep/G_train in the metric P; it does not need m ∥ g (at Adam's rise G_sweep ≈ 1−β₁:
   the part of m built on earlier batches is orthogonal to the new gradient, and part 3 misreads that).
   κ_P needs no rise, only a resolved quadratic term, and the sweep resolves it twice: first where steps reach
   their own batch's floor (α ≥ 0, i.e. ΔwᵀHΔw ≥ −g·Δw, or a rise, on 3 of 5 steps: ``lr_floor``, at lr·G·κ_P = 1
   on a quadratic), then at the rise. On a stationary landscape both give the same κ_P; when they differ the sweep's
   own large steps moved the weights between them (a GRU under Adam: κ_P 230–280 at the floor, then 13–15 at a
   rise that came only at 0.5–0.6, after overshooting steps had carried the net to a flatter region). A training
   step from the start weights must stay at or before the floor at both, so κ_P is the larger of the two medians
   (each over the window's steps that met its condition, α ≥ 0 or a rise).

Capped by the stability bound measured at the start weights: the optimizer's safe lr (2/λ_max for plain SGD,
(2+2β)/λ_max with momentum, ``probes.curvature.safe_lr``) or, for Adam-like optimizers, the lr at which the
preconditioned sharpness meets its bound. Without an own-batch rise in the sweep it falls back to valley.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

SAFE_FRACTION = 0.5  # stepaudit's suggestion: this fraction of the lr where the own-batch loss first rises
RISE_WINDOW, RISE_NEEDED = 5, 3  # the rise: on at least 3 of 5 consecutive steps, the first of them rising
SLIDE_WINDOW, SLIDE_THRESHOLD = 15, 0.005


def smooth_step(average: float, loss: float, beta: float, index: int) -> tuple[float, float]:
    """One step of the bias-corrected exponential average: (new raw average, smoothed value)."""
    average = beta * average + (1 - beta) * loss
    return average, average / (1 - beta ** (index + 1))


def trimmed(lrs: np.ndarray, losses: np.ndarray, planned: int) -> tuple[np.ndarray, np.ndarray, int]:
    """fastai's view of the curve: without its first ``planned // 10`` and last 5 points, cut at the first NaN.

    Returns the trimmed arrays and the index of their first element in the original ones.
    """
    offset = planned // 10
    lrs, losses = np.asarray(lrs, float)[offset:-5], np.asarray(losses, float)[offset:-5]
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        lrs, losses = lrs[: bad[0]], losses[: bad[0]]
    return lrs, losses, offset


def minimum(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index of the lowest loss (the suggestion is lrs[index] / 10)."""
    return int(np.argmin(losses))


def steep(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index where the loss falls fastest per unit of log(lr) (left end of the steepest segment)."""
    slopes = np.diff(np.asarray(losses, float)) / np.diff(np.log(np.asarray(lrs, float)))
    return int(np.argmin(slopes))


def valley(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index about halfway down the longest strictly decreasing run of points (see the module docstring)."""
    losses = np.asarray(losses, float)
    length = [1] * len(losses)  # length of the longest decreasing subsequence ending at each point
    end = 0
    for i in range(1, len(losses)):
        length[i] = 1 + max((length[j] for j in range(i) if losses[j] > losses[i]), default=0)
        if length[i] > length[end]:
            end = i
    span = length[end]
    start = end - span
    return start + int(span / 3) + int(span / 6)


def slide(lrs: np.ndarray, losses: np.ndarray, window: int = SLIDE_WINDOW, threshold: float = SLIDE_THRESHOLD) -> int:
    """Index of the lr the interval slide rule picks (see the module docstring); negative-free index."""
    gradient = np.gradient(np.asarray(losses, float))
    n = len(gradient)
    right, left = n - 1, n - 1 - window
    chosen = left
    while left >= 0 and abs(gradient[right] - gradient[left]) > threshold:
        chosen = left
        right, left = right - 1, left - 1
    return chosen % n


def fastai_suggestions(lrs: np.ndarray, smooth: np.ndarray, planned: int) -> dict[str, float]:
    """fastai's four suggestions on the trimmed smoothed curve (NaN when too few points remain)."""
    cut, losses, _ = trimmed(lrs, smooth, planned)
    out = {"minimum": math.nan, "steep": math.nan, "valley": math.nan, "slide": math.nan}
    if len(losses) >= 2:
        out["minimum"] = float(cut[minimum(cut, losses)]) / 10
        out["steep"] = float(cut[steep(cut, losses)])
        out["valley"] = float(cut[valley(cut, losses)])
    if len(losses) > SLIDE_WINDOW:
        out["slide"] = float(cut[slide(cut, losses)])
    return out


def first_index(flags: list[bool], run: int = 1) -> int | None:
    """Index of the first ``run`` consecutive True values (a run cut short by the end of the list counts)."""
    for i in range(len(flags)):
        window = flags[i : i + run]
        if window and all(window):
            return i
    return None


def first_rise(flags: list[bool], window: int = RISE_WINDOW, needed: int = RISE_NEEDED) -> int | None:
    """Index of the first True with ≥ ``needed`` of ``window`` True from it (a window cut short: its majority)."""
    for i, flag in enumerate(flags):
        held = flags[i : i + window]
        if flag and sum(map(bool, held)) >= min(needed, len(held) // 2 + 1):
            return i
    return None


def steady_gain(optimizer: Any) -> tuple[float, float]:
    """(β, G_train): heavy-ball momentum and its steady-state gain over a plain step (1: none), torch's names."""
    group = optimizer.param_groups[0]
    beta = float(group.get("momentum", 0.0) or 0.0)
    if beta <= 0 or not isinstance(optimizer, (torch.optim.SGD, torch.optim.RMSprop)):
        return 0.0, 1.0
    damped = 1.0 - float(group.get("dampening", 0.0) or 0.0)
    if group.get("nesterov", False):
        return beta, 1.0 + beta * damped / (1.0 - beta)
    return beta, damped / (1.0 - beta)


def stepaudit_rule(
    lrs: np.ndarray,
    rises: list[bool],
    bound: float,
    bound_name: str,
    fallback: float,
    gains: np.ndarray | None = None,
    gain_train: float = 1.0,
    preconditioned: bool = False,
    curvatures: np.ndarray | None = None,
    alphas: np.ndarray | None = None,
) -> tuple[float, str]:
    """stepaudit's suggestion and its one-line reason (the rule is in the module docstring)."""
    up = first_rise(rises)
    if preconditioned:
        kappa_all = np.asarray(curvatures if curvatures is not None else np.full(len(rises), np.nan), float)
        # the own-batch parabola along the step, in P's metric: floor of a steady-state step at lr·G_train·κ_P = 1;
        # κ_P read where the sweep resolves it, at its floor window and at its rise window, the larger of the two
        floors = reached_floor(alphas if alphas is not None else np.full(len(rises), np.nan), rises)
        read = [
            (k, float(lrs[start]), what)
            for flags, what in ((floors, "reached their own batch's floor"), (rises, "raised their own batch's loss"))
            for start in [first_rise(flags)]
            if start is not None
            for k in [window_kappa(kappa_all, flags, start)]
            if math.isfinite(k)
        ]
        if read:
            k, lr_at, what = max(read)
            suggestion = 1.0 / (gain_train * k)
            others = "; ".join(f"{o:.3g} from {at:.3g}" for o, at, w in read if w != what)
            reason = (
                f"1/κ_P: the floor of the own-batch parabola along the step, κ_P = ΔwᵀHΔw/ΔwᵀPΔw = {k:.3g} (P: the "
                f"optimizer's metric) on the steps from {lr_at:.3g} that {what} (3 of 5)"
                + (f", the larger of the two (the other: {others})" if others else "")
                + (f", / the steady-state gain ({gain_train:.3g})" if gain_train != 1.0 else "")
            )
            return capped(suggestion, reason, bound, bound_name)
    if up is None:
        return fallback, "no step of the sweep raised its own batch's loss: fastai's valley"
    lr_up = float(lrs[up])
    suggestion = SAFE_FRACTION * lr_up
    reason = f"half of {lr_up:.3g}, the lr from which steps raised their own batch's loss (3 of 5 steps)"
    if gain_train != 1.0 or preconditioned:
        seen = np.asarray(gains if gains is not None else np.full(len(rises), np.nan), float)
        seen = np.array([g for g, r in zip(seen[up : up + RISE_WINDOW], rises[up : up + RISE_WINDOW]) if r and g > 0])
        g_sweep = float(np.median(seen)) if seen.size else 1.0
        suggestion *= g_sweep / gain_train  # ½·lr_up·G_sweep/G_train: lr·G_train·λ = 1, the floor (docstring)
        kind = "preconditioned" if preconditioned and gain_train == 1.0 else "momentum"
        reason = (
            f"half of {lr_up:.3g}, the lr from which steps raised their own batch's loss, × the {kind} "
            f"gain the sweep saw ({g_sweep:.3g}) / the steady-state gain ({gain_train:.3g})"
        )
    return capped(suggestion, reason, bound, bound_name)


def capped(suggestion: float, reason: str, bound: float, bound_name: str) -> tuple[float, str]:
    """The suggestion, or the stability bound measured at the start weights where that is lower."""
    if math.isfinite(bound) and bound > 0 and bound < suggestion:
        return bound, f"{bound_name} {bound:.3g} (measured early in the sweep), below the rule's {suggestion:.3g}"
    return suggestion, reason


def reached_floor(alphas, rises: list[bool]) -> list[bool]:
    """Per step: did it land at or past its own batch's floor: α ≥ 0, or it raised its own batch's loss (a step
    carried uphill by a momentum buffer has no α, NaN, but went past the floor all the same)."""
    return [bool(a >= 0) or bool(r) for a, r in zip(np.asarray(alphas, float), rises)]


def window_kappa(kappa: np.ndarray, flags: list[bool], start: int) -> float:
    """Median κ_P over the steps of the window from ``start`` that met the condition, finite and > 0 (NaN: none)."""
    held = [kappa[i] for i in range(start, min(start + RISE_WINDOW, len(flags), len(kappa))) if flags[i]]
    held = [k for k in held if np.isfinite(k) and k > 0]
    return float(np.median(held)) if held else math.nan

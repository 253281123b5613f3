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

stepaudit's rule (``stepaudit_rule``): take ``lr_up``, the first lr of the sweep at which the step raised the
loss of its own batch (beyond rounding noise, the same ``lr_rise`` the result reports; on a quadratic, plain SGD raises it
exactly when lr > 2/λ along the gradient, so ``lr_up`` is where steps start to overshoot their batch's
valley), and suggest half of it, where such a step lands near the valley floor (α ≈ 0) instead of beyond the
opposite wall. Capped by the stability bound measured at the start weights: the optimizer's safe lr
(2/λ_max for plain SGD, ``probes.curvature.safe_lr``) or, for Adam-like optimizers, the lr at which the
preconditioned sharpness meets its bound. Without an own-batch rise in the sweep it falls back to valley.
"""
from __future__ import annotations

import math

import numpy as np

SAFE_FRACTION = 0.5  # stepaudit's suggestion: this fraction of the lr where the own-batch loss first rises
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
        window = flags[i:i + run]
        if window and all(window):
            return i
    return None


def stepaudit_rule(lrs: np.ndarray, rises: list[bool], bound: float, bound_name: str,
                   fallback: float) -> tuple[float, str]:
    """stepaudit's suggestion and its one-line reason (the rule is in the module docstring)."""
    up = first_index(rises)
    if up is None:
        return fallback, "no step of the sweep raised its own batch's loss: fastai's valley"
    lr_up = float(lrs[up])
    suggestion = SAFE_FRACTION * lr_up
    reason = (f"half of {lr_up:.3g}, the lr from which steps raised their own batch's loss (overshoot)")
    if math.isfinite(bound) and bound > 0 and bound < suggestion:
        return bound, f"{bound_name} {bound:.3g} at the start weights, below half of the overshoot lr {lr_up:.3g}"
    return suggestion, reason

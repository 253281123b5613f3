"""Rules about the learning dynamics: the learning rate, the labels, and gradient noise (sources in ``rules.py``)."""
from __future__ import annotations

import math

from .diagnosis import Diagnosis, clip as _clip, fmt as _g, not_training as _not_training
from .facts import Facts, finite, med


def lr_too_high(f: Facts) -> Diagnosis | None:
    """Steps that overshoot: the loss climbs above its start [DL], own-batch increases, lr beyond 2/λ_max."""
    parts, first, strength = [], None, 0.0
    peak = f.peak
    # a spike the run recovers from (or ends far below its start after) is a catapult, not a fault
    ended_high = f.loss_end is not None and f.loss_start is not None and \
        f.loss_end >= f.loss_start - 0.1 * abs(f.loss_start)  # "still high at the end" must be true
    if peak and peak[1] is not None and not f.recovered and not f.learning_well and ended_high:
        parts.append(f"the loss rose to {_g(peak[0])} (rolling median; it started at {_g(f.loss_start)}) "
                     f"and was still at {_g(f.loss_end)} at the end")
        first, strength = peak[1], strength + 0.35
    found = f.first_nonfinite
    growth = f.grad_growth
    grew = first is not None or (growth is not None and growth[0] >= 10)
    if found and found["step"] > 0 and grew and (f.update_ratio_early or 0) >= 1e-2:
        parts.append(f"then went non-finite at step {found['step']}")  # after growth, not out of the blue
        first = found["step"] if first is None else first
        strength += 0.2
    own = [r for r in f.own_batch if isinstance(r.get("first_order"), (int, float)) and r["first_order"] < 0]
    if len(own) >= 5:
        up = sum(r["delta"] > 0 for r in own) / len(own)
        alpha = med(r.get("alpha") for r in own)
        if up >= 0.25 or (alpha is not None and alpha > 1):
            parts.append(f"{up:.0%} of steps raised the loss on their own batch (median α {_g(alpha)}; α > 1 overshoots the valley)")
            first = first if first is not None else next(int(r["step"]) for r in own if r["delta"] > 0)
            strength += 0.35
    killed = f.first_at("dead_relu_share", 0.5)
    if (f.update_ratio_early or 0) >= 5e-2 and killed is not None and 0 < killed <= 10 \
            and (f.share_init("dead_relu_share") or 0) < 0.5:
        # ReLUs alive at initialisation, half of them dead within the first steps that moved the weights by
        # ≥ 5% of their norm (50× cs231n's 1e-3): the steps pushed their pre-activations below 0 for good.
        parts.append(f"the first steps moved the weights by {_g(f.update_ratio_early)} of their norm and "
                     f"{f.share_late('dead_relu_share')[0]:.0%} of the hidden ReLUs were dead by step {killed}")
        first = killed if first is None else min(first, killed)
        strength += 0.4 - 0.1  # the step-size part below is already said here
    unsafe = [r for r in f.healthy_records if r.get("lr_exceeds_safe") in (True, 1) or r.get("precond_exceeds") in (True, 1)]
    judged = [r for r in f.healthy_records if r.get("lr_exceeds_safe") is not None or r.get("precond_exceeds") is not None]
    if judged and len(unsafe) >= 0.5 * len(judged):
        parts.append(f"lr exceeded the stability bound 2/λ_max at {len(unsafe)} of {len(judged)} measured steps")
        first = first if first is not None else int(unsafe[0]["step"])
        strength += 0.3
    if not parts:
        return None
    ratio = f.update_ratio_early
    if ratio is not None and ratio >= 1e-2 and not any("moved the weights" in part for part in parts):
        parts.append(f"early steps moved the weights by {_g(ratio)} of their norm (cs231n: ≈ 1e-3)")
        strength += 0.1 + (0.1 if ratio >= 1e-1 else 0)
    elif not f.own_batch and not unsafe:
        strength -= 0.15  # a rising loss with modest steps may be bad data or wiring rather than the lr
    lr = next((r.get("lr") for r in f.records if isinstance(r.get("lr"), (int, float))), None)
    lr_text = f" (lr = {_g(lr)})" if lr else ""
    return Diagnosis("lr_too_high", "error", _clip(0.4 + strength), first, "; ".join(parts) + ".",
                     f"lower the learning rate{lr_text} by 3–10× (or add warm-up / gradient clipping)", lr_direction=-1)


def lr_too_low(f: Facts) -> Diagnosis | None:
    """Steps too small to matter: tiny ‖Δw‖/‖w‖ [CS], a first-order promise that adds up to little, α ≈ −1;
    or a schedule that drove the learning rate to nothing while the loss was still high."""
    collapsed = _schedule_collapse(f)
    if collapsed is not None:
        return collapsed
    if not f.moved or not _not_training(f):
        return None
    parts, strength = [], 0.0
    ratio = f.update_ratio
    if ratio is not None and ratio <= 1e-4:
        parts.append(f"‖Δw‖/‖w‖ is {_g(ratio)} per step (median; cs231n: ≈ 1e-3)")
        strength += 0.3
    total, start = f.predicted_total, f.loss_start
    if total is not None and start and total < 0.1 * abs(start):
        parts.append(f"even if every step's own-batch decrease −g·Δw carried over, the whole run would remove only "
                     f"{_g(total)} of a loss of {_g(start)}")
        strength += 0.3
    own = f.own_batch
    alpha, scale = med(r.get("alpha") for r in own), med(r.get("best_scale") for r in own)
    if alpha is not None and alpha <= -0.8 and scale is not None and scale >= 10:
        parts.append(f"on its own batch each step stops far short of the valley floor (median α {_g(alpha)}, "
                     f"best step {_g(scale)}× longer)")
        strength += 0.35
    if not parts:
        return None
    cos = f.grad_cos_early
    if cos is not None and cos >= 0.2:
        parts.append(f"consecutive gradients agree (cos {_g(cos, 2)}), so longer steps would follow a reliable direction")
        strength += 0.1
    lr = next((r.get("lr") for r in f.records if isinstance(r.get("lr"), (int, float))), None)
    return Diagnosis("lr_too_low", "warning" if strength < 0.5 else "error", _clip(0.4 + strength), 0,
                     f"the loss went from {_g(f.loss_start)} to {_g(f.loss_end)} in {f.n_steps} steps; " + "; ".join(parts) + ".",
                     f"raise the learning rate{f' (lr = {_g(lr)})' if lr else ''} by 10× and watch the loss; "
                     "an lr range test finds the largest one that still descends", whole_run=True, lr_direction=+1)


def _schedule_collapse(f: Facts) -> Diagnosis | None:
    """The lr fell below 1/1000 of its peak well before the end, and the loss stopped improving after that."""
    found = f.lr_collapse
    if found is None or f.first_nonfinite is not None:
        return None
    after = [v for s, v in f.losses if s >= found["step"]]
    before = [v for s, v in f.losses if s < found["step"]]
    if len(after) < 10 or not before:
        return None
    # after the collapse the loss should keep falling if the lr still mattered; ≤ 5% further progress
    # (median of the first against the last fifth of the remaining steps) means the run has stopped learning.
    width = max(3, len(after) // 5)
    head, tail = sorted(after[:width])[width // 2], sorted(after[-width:])[width // 2]
    if head <= 0 or (head - tail) / abs(head) > 0.05 or f.learning_well:
        return None
    schedulers = found["schedulers"]
    named = ", ".join(f"{name} (step() called {count}× in {f.n_steps} optimizer steps)"
                      for name, count in schedulers.items()) or "the learning-rate schedule"
    per_batch = any(count >= 0.5 * f.n_steps for count in schedulers.values())
    return Diagnosis("lr_too_low", "error", 0.85, found["step"],
                     f"the learning rate fell from {_g(found['peak'])} to {_g(found['final'])} (below 1/1000 of its peak "
                     f"by step {found['step']}) under {named}; after that the loss stayed at {_g(tail)}.",
                     ("call scheduler.step() once per epoch, not once per batch (or size step_size / T_max in "
                      "batches)" if per_batch else "lengthen the schedule or raise its floor (eta_min / gamma)")
                     + "; keep the learning rate within ~100× of its peak while the loss is still falling",
                     kind="schedule", lr_direction=+1)


def labels_unlearnable(f: Facts) -> Diagnosis | None:
    """Steps help their own batch but not the others; the loss stays near the label entropy [ZK]."""
    found = f.label_entropy
    end, start = f.loss_end, f.loss_start
    if end is None or start is None or not f.moved:
        return None
    reference, what = (found if found else (abs(start), "its starting value"))
    if reference <= 0 or not 0.9 * reference <= end <= 1.5 * reference:  # near the entropy, not far above it
        return None
    parts = [f"after {f.n_steps} steps the loss is {_g(end)}, still {end / reference:.0%} of {what} ({_g(reference)}): "
             "the model has learnt little beyond the label frequencies"]
    strength = 0.25 if found else 0.05
    ratio, promised = f.update_ratio_early, f.predicted_total
    if ratio is not None and ratio >= 1e-4 and promised is not None and promised >= 0.1 * reference:
        # the steps were not too small to learn (cs231n's 1e-3 within an order) and promised progress
        parts.append(f"yet the weights moved normally (‖Δw‖/‖w‖ {_g(ratio)} early on) and the steps promised "
                     f"{_g(promised)} of decrease on their own batches (Σ −g·Δw)")
        strength += 0.2
    transfer = f.transfer
    if transfer is not None and transfer[1] >= 0.05 * reference and transfer[0] <= 0.1:
        parts.append(f"over the first half only {max(transfer[0], 0):.0%} of the promised decrease showed on new batches")
        strength += 0.3 + (0.1 if transfer[1] >= 0.5 * reference else 0)
    active = _transfer(f)
    if active is not None and active <= 0.1:
        parts.append(f"only {max(active, 0):.0%} of each step's own-batch decrease carried over to other data "
                     "(next-batch / reference delta)")
        strength += 0.3
    if not found:
        strength *= 0.6  # without the label entropy, "stuck at the start" is weaker evidence of the labels
    carried = (transfer is not None and transfer[1] >= 0.05 * reference and transfer[0] <= 0.1) or (
        active is not None and active <= 0.1)
    if strength < 0.45 or not carried:  # the defining evidence: the steps fit their batch, not the others
        return None
    return Diagnosis("labels_unlearnable", "error" if found else "warning", _clip(0.35 + strength), 0,
                     "; ".join(parts) + ".",
                     "check that inputs and labels stay aligned (same shuffle/permutation, same indexing, no "
                     "label column leaking or lost); overfit a single small batch first [Karpathy]", whole_run=True)


def _transfer(f: Facts) -> float | None:
    """Active audit: median change on other data (next batch / reference) over median own-batch change."""
    own = med(r.get("delta") for r in f.own_batch)
    other = med(r.get("next_delta") if isinstance(r.get("next_delta"), (int, float)) else r.get("ref_delta")
                for r in f.own_batch)
    if own is None or other is None or own >= 0:
        return None
    return other / own


def gradient_noise_dominates(f: Facts) -> Diagnosis | None:
    """Batch far below the noise scale: each step mostly follows noise [MC].

    Passive: two estimates of the signal fraction 1/(1 + B_noise/B) over the first half of the run, the
    mean cosine of consecutive gradients (unbiased, noisy) and the share of the decrease promised on the
    steps' own batches that shows on new ones (biased low by curvature), combined by their geometric
    mean: ≤ 0.1 means the noise is ≥ 9× the signal. A clearly negative cosine means the steps overshoot
    (curvature), not noise. Active: the measured B_simple ≥ 10 B.
    """
    b = f.batch_size
    parts, strength = [], 0.0
    scales = finite(r.get("noise_scale") for r in f.healthy_records)
    if scales and b and med(scales) / b >= 10:
        parts.append(f"the measured noise scale B_simple ≈ {_g(med(scales))} is {_g(med(scales) / b, 2)}× the batch size {b}")
        strength += 0.45
    cos, transfer = f.grad_cos_half, f.transfer
    start = abs(f.loss_start or 0)
    material = transfer is not None and start > 0 and transfer[1] >= 0.05 * start  # a promise worth measuring
    # "Nearly orthogonal" must be true of the cosine itself: above 0.3 the gradients agree, and a small
    # carried-over share then means steps too small (or curvature), not noise.
    if cos is not None and material and -0.2 < cos <= 0.3 and not f.oscillating:
        signal = math.sqrt(max(cos, 0.0) * max(transfer[0], 0.0))
        if signal <= 0.1:
            estimate = "≫ 100" if signal <= 0.01 else f"≈ {_g(1 / signal - 1, 2)}"
            parts.append(f"consecutive gradients are nearly orthogonal (mean cos {cos:.2g}) and only "
                         f"{max(transfer[0], 0):.1%} of the decrease the steps promised on their own batches showed on "
                         f"new ones (first half): signal fraction ≈ {signal:.2g}, so B_noise/B {estimate}")
            strength += 0.4
    if not parts:
        return None
    converged = f.loss_end is not None and f.loss_start and abs(f.loss_end) < 0.1 * abs(f.loss_start)
    rising = f.peak is not None and f.peak[1] is not None and not f.recovered
    if converged or rising:
        return None
    found = f.label_entropy
    if found and f.loss_end is not None and f.loss_end >= 0.8 * found[0]:
        strength -= 0.2  # nothing learnt beyond the prior: unlearnable labels explain it better
    tiny = b is not None and b <= 8
    strength += 0.15 if tiny else 0
    # Every mini-batch run is noisy; it is a problem where the batch is tiny or the loss barely moves.
    slow = f.progress is not None and f.progress < 0.3
    severity = "warning" if tiny or slow or scales else "info"
    return Diagnosis("gradient_noise_dominates", severity, _clip(0.35 + strength), 0,
                     f"batch size {b or '?'}: " + "; ".join(parts) + f" (loss {_g(f.loss_start)} → {_g(f.loss_end)}).",
                     "increase the batch size (or accumulate gradients) toward the noise scale; decaying the "
                     "learning rate late in training also averages the noise out", whole_run=True, persistent=tiny)

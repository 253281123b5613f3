"""The batch is far below the gradient noise scale: each step mostly follows noise [MC]."""

from __future__ import annotations

import math

from ...maths import finite
from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..facts import Facts, med
from .base import Code


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
        parts.append(
            f"the measured noise scale B_simple ≈ {_g(med(scales))} is {_g(med(scales) / b, 2)}× the batch size {b}"
        )
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
            parts.append(
                f"consecutive gradients are nearly orthogonal (mean cos {cos:.2g}) and only "
                f"{max(transfer[0], 0):.1%} of the decrease the steps promised on their own batches showed on "
                f"new ones (first half): signal fraction ≈ {signal:.2g}, so B_noise/B {estimate}"
            )
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
    falling = not slow and _still_falling(f)
    if falling:
        # online SGD (batch 1, the char-RNN tutorial) is noisy by design; while the loss still falls markedly
        # the noise is not what stops training: a note, and not persistent (the story may lower it further)
        severity, tiny = "info", False
        parts[-1] += "; the loss is still falling markedly, so this only slows training"
    return Diagnosis(
        "gradient_noise_dominates",
        severity,
        _clip(0.35 + strength),
        0,
        f"batch size {b or '?'}: " + "; ".join(parts) + f" (loss {_g(f.loss_start)} → {_g(f.loss_end)}).",
        "increase the batch size (or accumulate gradients) toward the noise scale; decaying the "
        "learning rate late in training also averages the noise out",
        whole_run=True,
        persistent=tiny,
    )


def _still_falling(f: Facts) -> bool:
    """The loss still falls markedly late in the run: the median of its last fifth is ≥ 10% below the median
    of its middle fifth (a run that levelled off has the two equal, within its noise)."""
    losses = [v for _, v in f.losses]
    k = len(losses) // 5
    if k < 3:
        return False
    middle, last = med(losses[2 * k : 3 * k]), med(losses[-k:])
    return middle is not None and last is not None and middle > 0 and last <= 0.9 * middle


CODE = Code(
    name="gradient_noise_dominates",
    rule=gradient_noise_dominates,
    priority=120,
    causes=(),
    quiet_after_divergence=True,
    note_when_learning=True,
)

"""Steps help their own batch but not the others; the loss stays near the label entropy [ZK]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..facts import Facts, med
from .base import Code


def labels_unlearnable(f: Facts) -> Diagnosis | None:
    """Steps help their own batch but not the others; the loss stays near the label entropy [ZK]."""
    found = f.label_entropy
    end, start = f.loss_end, f.loss_start
    if end is None or start is None or not f.moved:
        return None
    reference, what = found if found else (abs(start), "its starting value")
    if reference <= 0 or not 0.9 * reference <= end <= 1.5 * reference:  # near the entropy, not far above it
        return None
    parts = [
        f"after {f.n_steps} steps the loss is {_g(end)}, still {end / reference:.0%} of {what} ({_g(reference)}): "
        "the model has learnt little beyond the label frequencies"
    ]
    strength = 0.25 if found else 0.05
    ratio, promised = f.update_ratio_early, f.predicted_total
    if ratio is not None and ratio >= 1e-4 and promised is not None and promised >= 0.1 * reference:
        # the steps were not too small to learn (cs231n's 1e-3 within an order) and promised progress;
        # "normally" only within a factor 3 of cs231n's 1e-3, else the number is given as measured
        # (a median of 1.8e-4 is small, not normal, even if the promised decrease was large)
        moved = "moved, if slowly," if ratio < 3e-4 else "moved by large steps" if ratio > 3e-3 else "moved normally"
        parts.append(
            f"yet the weights {moved} (‖Δw‖/‖w‖ {_g(ratio)} early on; cs231n: ≈ 1e-3) and the steps promised "
            f"{_g(promised)} of decrease on their own batches (Σ −g·Δw)"
        )
        strength += 0.2
    transfer = f.transfer
    if transfer is not None and transfer[1] >= 0.05 * reference and transfer[0] <= 0.1:
        parts.append(
            f"over the first half only {max(transfer[0], 0):.0%} of the promised decrease showed on new batches"
        )
        strength += 0.3 + (0.1 if transfer[1] >= 0.5 * reference else 0)
    active = _transfer(f)
    if active is not None and active <= 0.1:
        parts.append(
            f"only {max(active, 0):.0%} of each step's own-batch decrease carried over to other data "
            "(next-batch / reference delta)"
        )
        strength += 0.3
    if not found:
        strength *= 0.6  # without the label entropy, "stuck at the start" is weaker evidence of the labels
    carried = (transfer is not None and transfer[1] >= 0.05 * reference and transfer[0] <= 0.1) or (
        active is not None and active <= 0.1
    )
    if strength < 0.45 or not carried:  # the defining evidence: the steps fit their batch, not the others
        return None
    return Diagnosis(
        "labels_unlearnable",
        "error" if found else "warning",
        _clip(0.35 + strength),
        0,
        "; ".join(parts) + ".",
        "check that inputs and labels stay aligned (same shuffle/permutation, same indexing, no "
        "label column leaking or lost); overfit a single small batch first [Karpathy]",
        whole_run=True,
    )


def _transfer(f: Facts) -> float | None:
    """Active audit: median change on other data (next batch / reference) over median own-batch change."""
    own = med(r.get("delta") for r in f.own_batch)
    other = med(
        r.get("next_delta") if isinstance(r.get("next_delta"), (int, float)) else r.get("ref_delta")
        for r in f.own_batch
    )
    if own is None or other is None or own >= 0:
        return None
    return other / own


CODE = Code(
    name="labels_unlearnable",
    rule=labels_unlearnable,
    priority=110,
    causes=("gradient_noise_dominates",),
    quiet_after_divergence=True,
)

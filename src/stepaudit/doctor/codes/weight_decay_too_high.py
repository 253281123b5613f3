"""Weight decay that outweighs the loss: every step removes a large share of every weight [LH]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code

# lr × weight_decay is the share of every weight the decay removes per step (AdamW's decoupled
# w ← w − lr·λ·w [LH]; SGD's coupled λ·w term gives the same lr·λ). Common settings stay at or below 1e-3
# per step: AdamW 1e-3 × 1e-2 = 1e-5 (torch's default), GPT-style 6e-4 × 0.1 = 6e-5, SGD 0.1 × 5e-4 = 5e-5,
# a heavy 0.1 × 1e-2 = 1e-3. 5e-3 per step halves a weight the loss does not defend within 140 steps.
SHARE_PER_STEP = 5e-3
# The weights' norm must also have fallen to half of what it was at the first measured step: the decay
# winning in the run, not only on paper (measured: AdamW lr 1e-3 with weight_decay 20 on the digits MLP
# shrinks it 6.8 → 2.7; healthy Adam runs at lr 1e-3 to 0.3 grow it 1.3× to 23×).
SHRINK = 0.5


def weight_decay_too_high(f: Facts) -> Diagnosis | None:
    """Decay removes ≥ 0.5% of every weight per step, the weights' norm halves, and the loss does not fall [LH]."""
    if f.learning_well or f.first_nonfinite is not None:
        return None
    rated = []
    for g in f.param_groups:
        lr, decay = g.get("lr"), g.get("weight_decay")
        if isinstance(lr, (int, float)) and isinstance(decay, (int, float)) and lr > 0 and decay > 0:
            if g.get("n_params") is None or g["n_params"] > 0:  # an empty group decays nothing
                rated.append((lr * decay, lr, decay, g))
    if not rated:
        return None
    share, lr, decay, group = max(rated, key=lambda t: t[0])
    if share < SHARE_PER_STEP:
        return None
    growth = f.weight_growth
    if growth is None or growth[0] > SHRINK:
        return None
    _, first, late = growth
    optimizer = (group.get("opt") or {}).get("optimizer") or f.meta.get("optimizer") or "the optimizer"
    prior = f.label_entropy
    level = (
        f"; the loss went from {_g(f.loss_start)} to {_g(f.loss_end)}"
        + (f" ({f.loss_end / prior[0]:.0%} of the {prior[1]})" if prior and prior[0] > 0 and f.loss_end else "")
        if f.loss_start is not None and f.loss_end is not None
        else ""
    )
    evidence = (
        f"{optimizer} has weight_decay = {_g(decay)} at lr {_g(lr)}: each step takes lr × weight_decay = "
        f"{_g(share)} of every weight away, whatever the loss asks; the weights' norm fell from {_g(first)} "
        f"to {_g(late)} (median of the last sampled steps){level}"
    )
    stuck = _not_training(f)
    return Diagnosis(
        "weight_decay_too_high",
        "error" if stuck else "warning",
        _clip(0.55 + (0.2 if stuck else 0) + (0.1 if share >= 10 * SHARE_PER_STEP else 0)),
        0,
        evidence + ".",
        f"lower weight_decay (= {_g(decay)}) by 100× or more: AdamW's default is 1e-2, and lr × weight_decay "
        "is usually ≤ 1e-4 per step",
        whole_run=True,
    )


CODE = Code(
    name="weight_decay_too_high",
    rule=weight_decay_too_high,
    priority=55,
    causes=("labels_unlearnable", "gradient_noise_dominates", "vanishing_gradients", "lr_too_low", "dead_relu"),
    quiet_after_divergence=True,
)

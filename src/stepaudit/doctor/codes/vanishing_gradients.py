"""The relative gradient shrinks by orders of magnitude from the last layer to the first [GB]."""

from __future__ import annotations

import math

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code


def vanishing_gradients(f: Facts) -> Diagnosis | None:
    """Relative gradient shrinking by orders of magnitude from the last layer to the first [GB]."""
    found = f.depth_ratio
    if found is None:
        return None
    ratio, first, last = found
    if ratio > 1e-2:
        return None
    severity = "error" if _not_training(f) or ratio <= 1e-4 else "warning"
    step = int(f.sampled[0]["step"]) if f.sampled else 0
    return Diagnosis(
        "vanishing_gradients",
        severity,
        _clip(0.6 + 0.08 * -math.log10(ratio / 1e-2)),
        step,
        f"the first weight layer ({first}) gets a relative gradient ‖g‖/‖w‖ {ratio:.2g}× that of the last "
        f"({last}) (median over sampled steps): the early layers barely learn.",
        "use ReLU-family activations with kaiming init, add residual connections or "
        "BatchNorm/LayerNorm, and avoid deep stacks of sigmoid/tanh",
    )


CODE = Code(
    name="vanishing_gradients",
    rule=vanishing_gradients,
    priority=90,
    causes=("lr_too_low", "labels_unlearnable", "gradient_noise_dominates", "params_not_updating:no_grad"),
    quiet_after_divergence=True,
    note_when_learning=True,
)

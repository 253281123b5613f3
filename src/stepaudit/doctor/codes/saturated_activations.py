"""Hidden sigmoid/tanh units stuck near their limits, where the derivative is ~0 [GB]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code


def saturated_activations(f: Facts) -> Diagnosis | None:
    """Hidden sigmoid/tanh units stuck near their asymptotes, where the derivative is ~0 [GB].

    At initialisation a hidden layer is saturated only if its pre-activations have a spread ≳ 4 (half of
    N(0, σ²) beyond ±2.65 needs σ ≈ 3.9): a mis-scaled initialisation or input, whatever the loss does
    later. Saturation that develops during training counts only when the loss has not halved.
    """
    late, layer = f.share_late("saturated_share"), f.share_late("saturated_max")
    if late is None:
        return None
    share, first = late
    init_layer = f.share_init("saturated_max") or 0
    at_init = init_layer >= 0.5
    if not at_init and (share < 0.5 or ((f.progress or 0) >= 0.5 and share < 0.9)):
        return None
    worst = max(init_layer, layer[0] if layer else 0)
    severity = "error" if _not_training(f) or share >= 0.5 else "warning"
    when = "from initialisation on" if at_init else f"from step {first} on"
    return Diagnosis(
        "saturated_activations",
        severity,
        _clip(0.45 + 0.5 * max(share, worst)),
        0 if at_init else first,
        f"{share:.0%} of hidden sigmoid/tanh outputs (worst layer {worst:.0%}) sit within 1% of their "
        f"limits {when}, where the derivative is < 2% of its maximum, so little gradient flows through them.",
        "initialise with the fan-in in mind (xavier / N(0, 1/fan_in)), normalise the inputs, "
        "or use ReLU-family activations / normalisation layers",
        persistent=at_init and share >= 0.5,
    )


CODE = Code(
    name="saturated_activations",
    rule=saturated_activations,
    priority=80,
    causes=(
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "params_not_updating:no_grad",
    ),
    note_when_learning=True,
)

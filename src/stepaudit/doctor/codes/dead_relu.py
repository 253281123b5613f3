"""Hidden ReLU units silent on a whole batch, or a ReLU on the output [CS]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code


def dead_relu(f: Facts) -> Diagnosis | None:
    """Hidden ReLU units that output 0 for every example of a batch [CS: up to 40% can die], or a ReLU on
    the model's output that is 0 for every example (all predictions 0, no gradient back)."""
    output = f.dead_output
    if output is not None:
        return Diagnosis(
            "dead_relu",
            "error",
            0.9,
            output,
            f"the model's output goes through a ReLU that is 0 for every example of the batch from step "
            f"{output} on (median over sampled steps): every prediction is 0 and no gradient flows back.",
            "remove the ReLU after the last layer (predict the raw output; use Softplus or exp if the "
            "target must be positive)",
        )
    overall, layer = f.share_late("dead_relu_share"), f.share_late("dead_relu_max")
    if overall is None:
        return None
    share, first = overall
    layer_share = layer[0] if layer else share
    if share < 0.5 and layer_share < 0.9:  # half the units, or a layer that passes (almost) nothing
        return None
    at_init = (f.share_init("dead_relu_share") or 0) >= 0.5 or (f.share_init("dead_relu_max") or 0) >= 0.9
    if not at_init and (f.progress or 0) >= 0.5 and share < 0.9:
        return None  # units died along the way but the loss halved: not what stops training
    severity = "error" if share >= 0.9 or at_init or _not_training(f) else "warning"
    onsets = [s for s in (f.first_at("dead_relu_share", 0.5), f.first_at("dead_relu_max", 0.9)) if s is not None]
    first = 0 if at_init else min(onsets, default=first)
    when = "from initialisation on" if at_init else f"from step {first} on"
    fix = (
        "check biases and initialisation (no large negative bias; kaiming init); LeakyReLU or normalisation "
        "layers keep units alive"
    )
    return Diagnosis(
        "dead_relu",
        severity,
        _clip(0.5 + 0.5 * max(share, layer_share - 0.2)),
        first,
        f"{share:.0%} of hidden ReLU units never fire on a whole batch (worst layer {layer_share:.0%} dead) "
        f"{when}, so they pass no gradient and never recover.",
        fix if at_init else "lower the learning rate (large steps push units below zero for good); " + fix,
        lr_direction=0 if at_init else -1,
    )


CODE = Code(
    name="dead_relu",
    rule=dead_relu,
    priority=70,
    causes=(
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "params_not_updating:no_grad",
    ),
    note_when_learning=True,
)

"""NaN or Inf in the loss, the gradient, the update or the weights: seen directly, not inferred."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import fmt as _g
from ..facts import Facts
from .base import Code


def nonfinite(f: Facts) -> Diagnosis | None:
    """NaN/Inf in the loss, the gradient, the update or the weights."""
    found = f.first_nonfinite
    if found is None:
        return None
    step, what = found["step"], found["what"]
    before = [v for s, v in f.losses if s < step]
    grew = bool(before) and f.loss_init is not None and max(before) > 1.5 * abs(f.loss_init)
    if what == "input":
        detail, fix = (
            "the first layer's input already contained NaN/Inf",
            "clean the data: assert torch.isfinite(x).all() when loading; impute or drop the bad rows",
        )
    elif grew:
        detail, fix = (
            f"after the loss had grown to {_g(max(before))} (from {_g(f.loss_init)})",
            "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0))",
        )
    elif not before:
        detail, fix = (
            "at the first step, before any update",
            "look for NaN/Inf in the data (torch.isfinite(x).all()) and for log(0), division by zero "
            "or sqrt(0) in the loss; add an epsilon (e.g. log(p + 1e-8)) or use the fused loss",
        )
    else:
        detail, fix = (
            f"suddenly, with the loss still near {_g(before[-1] if before else None)} just before",
            "look for NaN/Inf in the data (torch.isfinite(x).all()) and for log(0), division by zero "
            "or sqrt(0) in the loss; add an epsilon (e.g. log(p + 1e-8)) or use the fused loss",
        )
    return Diagnosis(
        "nonfinite",
        "error",
        0.95,
        step,
        f"the {what} became NaN/Inf at step {step}, {detail}.",
        fix,
        kind="growth" if grew else what,
        lr_direction=-1 if grew else 0,
    )


CODE = Code(name="nonfinite", rule=nonfinite, priority=130, causes=())

"""``.grad`` is never cleared, so each step follows the sum of all gradients so far (passive check)."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..facts import Facts
from .base import Code


def missing_zero_grad(f: Facts) -> Diagnosis | None:
    """``.grad`` still holds the previous step's gradient when the next backward begins (passive check)."""
    checks = [c for c in f.obs.get("zero_checks") or [] if isinstance(c.get("kept"), (int, float))]
    if len(checks) < 2:
        return None
    kept = [c for c in checks if c["kept"] >= 0.5]
    share = len(kept) / len(checks)
    if share < 0.9:  # deliberate accumulation still clears .grad after every step
        return None
    first = kept[0].get("next", kept[0].get("step", -1) + 1)
    return Diagnosis(
        "missing_zero_grad",
        "error",
        _clip(0.75 + 0.25 * share),
        int(first),
        f"at {len(kept)} of {len(checks)} checked steps the previous step's gradient was still in .grad "
        "when the next backward() began, so gradients add up across steps (step k uses g_1+…+g_k).",
        "call optimizer.zero_grad() once per iteration, before loss.backward()",
    )


CODE = Code(
    name="missing_zero_grad",
    rule=missing_zero_grad,
    priority=20,
    causes=(
        "exploding_gradients",
        "lr_too_high",
        "nonfinite",
        "dead_relu",
        "gradient_noise_dominates",
        "labels_unlearnable",
        "saturated_activations",
    ),
)

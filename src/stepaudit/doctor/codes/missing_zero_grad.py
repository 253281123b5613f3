"""``.grad`` is never cleared, so each step follows the sum of all gradients so far (passive check)."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..facts import Facts
from .base import Code


def missing_zero_grad(f: Facts) -> Diagnosis | None:
    """``.grad`` still holds the previous step's gradient when the next backward begins (passive check)."""
    checks = [c for c in f.obs.get("zero_checks") or [] if isinstance(c.get("kept"), (int, float))]
    by_optimizer: dict = {}
    for c in checks:  # judged per optimizer: two optimizers, one of them never cleared, is still the fault
        by_optimizer.setdefault(c.get("optimizer"), []).append(c)
    found = None
    for index, own in by_optimizer.items():
        kept = [c for c in own if c["kept"] >= 0.5]
        share = len(kept) / len(own)
        # deliberate accumulation still clears .grad after every step
        if len(own) >= 2 and share >= 0.9 and (found is None or share > found[1]):
            found = (index, share, kept, own)
    if found is None:
        return None
    index, share, kept, own = found
    first = kept[0].get("next", kept[0].get("step", -1) + 1)
    which, fix = "", "call optimizer.zero_grad() once per iteration, before loss.backward()"
    if len(by_optimizer) > 1:
        kinds = {o.get("index"): o.get("optimizer") for o in f.obs.get("optimizers") or []}
        which = f" of optimizer {index} ({kinds.get(index, '?')})"
        fix = f"call zero_grad() on every optimizer (here optimizer {index}) once per iteration, before loss.backward()"
    return Diagnosis(
        "missing_zero_grad",
        "error",
        _clip(0.75 + 0.25 * share),
        int(first),
        f"at {len(kept)} of {len(own)} checked steps{which} the previous step's gradient was still in .grad "
        "when the next backward() began, so gradients add up across steps (step k uses g_1+…+g_k).",
        fix,
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

"""Gradients growing by orders of magnitude, huge against the weights, a cliff or an overflow [PM]."""

from __future__ import annotations

import math

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code


def summed_note(f: Facts) -> str | None:
    """The loss reduced with 'sum' (or 'none' then summed): its gradient is the mean's times the count summed."""
    names = f.obs.get("summed_losses") or []
    if not names:
        return None
    # d(Σ ℓ_i)/dw = n · d(mean ℓ_i)/dw: a sum over a batch of B examples (× every output value) multiplies the
    # gradient, and with SGD the step, by that count, so an lr tuned for the mean is that many times too large
    return (
        f"the loss ({', '.join(names)}) is summed, not averaged, over the batch: its gradient and each SGD step "
        "are the mean's times the number of summed values"
    )


def exploding_gradients(f: Facts) -> Diagnosis | None:
    """Gradients growing by orders of magnitude over the run, or already huge relative to the weights [PM]."""
    parts, first = [], None
    growth = f.grad_growth
    if growth and growth[0] >= 100:
        parts.append(f"‖g‖ grew {growth[0]:.3g}× over the run")
        first = growth[1]
    rel, early = f.relative_grad_init, f.relative_grad_early
    if rel is not None and rel >= 10 and early is not None and early >= 10:
        # ‖g‖/‖w‖ ≥ 10: even lr = 1e-2 would move the weights by 10% per step, 100× cs231n's 1e-3. Required at
        # initialisation and still over the first sampled steps: one large first gradient is not a trend.
        parts.append(
            f"at step {f.sampled[0]['step']} the gradient was {rel:.3g}× the weights' norm (median over "
            f"layers), and still {early:.3g}× over the first sampled steps"
        )
        first = int(f.sampled[0]["step"])
    cliff = f.loss_cliff
    if cliff is not None:
        parts.append(
            f"the loss was {_g(cliff['before'])} (below its start) until step {cliff['calm']}, then jumped to "
            f"{_g(cliff['top'])} and went non-finite at step {cliff['nonfinite']}: a sudden gradient blow-up "
            "(a cliff), not a slow divergence"
        )
        first = cliff["calm"] + 1
    overflow = next(
        (
            r
            for r in f.records
            if r.get("grad_nonfinite")
            and isinstance(r.get("loss_before"), (int, float))
            and math.isfinite(r["loss_before"])
        ),
        None,
    )
    if overflow is not None:
        parts.append(f"the gradient overflowed to NaN/Inf at step {overflow['step']} while the loss was finite")
        first = int(overflow["step"]) if first is None else first
    if not parts:
        return None
    severity = "error" if f.first_nonfinite or _not_training(f) else "warning"
    kind = "init" if first == (f.sampled[0]["step"] if f.sampled else None) else "cliff" if cliff else "growth"
    fix = (
        "clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) and use a smaller "
        "initialisation or normalisation layers"
    )
    confidence = _clip(0.55 + 0.15 * len(parts))  # the findings above, not the note below
    summed = summed_note(f)
    if summed:
        parts.append(summed)
        fix = "reduce the loss with 'mean' (or divide the lr by the number of summed values); else " + fix
    return Diagnosis(
        "exploding_gradients",
        severity,
        confidence,
        first,
        "; ".join(parts) + ".",
        fix,
        kind="overflow" if overflow is not None else kind,
        persistent=overflow is not None or cliff is not None,
    )


CODE = Code(
    name="exploding_gradients",
    rule=exploding_gradients,
    priority=60,
    causes=("nonfinite", "lr_too_high", "loss_wiring:init", "dead_relu", "saturated_activations", "labels_unlearnable"),
    note_when_learning=True,
)

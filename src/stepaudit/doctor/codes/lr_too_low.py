"""Steps too small to matter, or a schedule that drove the learning rate to nothing [CS; DL]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..diagnosis import not_training as _not_training
from ..facts import Facts, med
from .base import Code


def lr_too_low(f: Facts) -> Diagnosis | None:
    """Steps too small to matter: tiny ‖Δw‖/‖w‖ [CS], a first-order promise that adds up to little, α ≈ −1;
    or a schedule that drove the learning rate to nothing while the loss was still high."""
    collapsed = schedule_collapse(f)
    if collapsed is not None:
        return collapsed
    if not f.moved or not _not_training(f):
        return None
    parts, strength = [], 0.0
    ratio = f.update_ratio
    if ratio is not None and ratio <= 1e-4:
        parts.append(f"‖Δw‖/‖w‖ is {_g(ratio)} per step (median; cs231n: ≈ 1e-3)")
        strength += 0.3
    total, start = f.predicted_total, f.loss_start
    # the loss fell markedly (a tenth of its start: not batch noise around a flat loss) and by more than twice what
    # the steps promised (a promise curvature only takes back from): something else moves it (another optimizer's
    # steps, as the generator's move the discriminator's loss in a GAN)
    fell = start - f.loss_end if start and f.loss_end is not None else None
    outpaced = total is not None and fell is not None and fell > max(2 * max(total, 0), 0.1 * abs(start))
    if total is not None and start and total < 0.1 * abs(start) and not outpaced:
        parts.append(
            f"even if every step's own-batch decrease −g·Δw carried over, the whole run would remove only "
            f"{_g(total)} of a loss of {_g(start)}"
        )
        strength += 0.3
    own = f.own_batch
    alpha, scale = med(r.get("alpha") for r in own), med(r.get("best_scale") for r in own)
    if alpha is not None and alpha <= -0.8 and scale is not None and scale >= 10:
        parts.append(
            f"on its own batch each step stops far short of the valley floor (median α {_g(alpha)}, "
            f"best step {_g(scale)}× longer)"
        )
        strength += 0.35
    if not parts:
        return None
    cos = f.grad_cos_early
    if cos is not None and cos >= 0.2:
        parts.append(
            f"consecutive gradients agree (cos {_g(cos, 2)}), so longer steps would follow a reliable direction"
        )
        strength += 0.1
    lr = next((r.get("lr") for r in f.records if isinstance(r.get("lr"), (int, float))), None)
    fix = (
        f"raise the learning rate{f' (lr = {_g(lr)})' if lr else ''} by 10× and watch the loss; "
        "an lr range test finds the largest one that still descends"
    )
    clipped = clipped_norm(f)
    if clipped is not None:
        parts.append(
            f"the gradient reaching step() had the same norm {_g(clipped[0])} at {clipped[1]} of {clipped[2]} "
            "sampled steps: it is rescaled to a fixed norm (gradient clipping) at every step, so the steps are "
            "set by the clipping threshold, not by the gradient"
        )
        strength += 0.2
        fix = (
            f"raise the gradient-clipping threshold (max_norm = {_g(clipped[0])}) above the gradient's usual norm "
            "(e.g. clip_grad_norm_(…, 1.0)), so that clipping only catches spikes; else " + fix
        )
    return Diagnosis(
        "lr_too_low",
        "warning" if strength < 0.5 else "error",
        _clip(0.4 + strength),
        0,
        f"the loss went from {_g(f.loss_start)} to {_g(f.loss_end)} in {f.n_steps} steps; " + "; ".join(parts) + ".",
        fix,
        whole_run=True,
        lr_direction=+1,
    )


def clipped_norm(f: Facts) -> tuple[float, int, int] | None:
    """(norm, steps, sampled): ≥ 80% of ≥ 5 sampled steps reached step() with one and the same ‖g‖ (±0.1%).

    A mini-batch gradient's norm varies from batch to batch by tens of percent; the same value to 0.1% at
    almost every step is a gradient rescaled to a fixed norm, clip_grad_norm_ clipping every step.
    """
    norms = sorted(
        r["grad_norm"] for r in f.sampled if isinstance(r.get("grad_norm"), (int, float)) and r["grad_norm"] > 0
    )
    if len(norms) < 5:
        return None
    best, count = None, 0
    for value in norms:
        near = sum(1 for v in norms if abs(v - value) <= 1e-3 * value)
        if near > count:
            best, count = value, near
    if count < 0.8 * len(norms):
        return None
    return best, count, len(norms)


def schedule_collapse(f: Facts) -> Diagnosis | None:
    """The lr fell below 1/1000 of its peak well before the end, and the loss stopped improving after that."""
    found = f.lr_collapse
    if found is None or f.first_nonfinite is not None:
        return None
    after = [v for s, v in f.losses if s >= found["step"]]
    before = [v for s, v in f.losses if s < found["step"]]
    if len(after) < 10 or not before:
        return None
    # after the collapse the loss should keep falling if the lr still mattered; ≤ 5% further progress
    # (median of the first against the last fifth of the remaining steps) means the run has stopped learning.
    width = max(3, len(after) // 5)
    head, tail = sorted(after[:width])[width // 2], sorted(after[-width:])[width // 2]
    if head <= 0 or (head - tail) / abs(head) > 0.05 or f.learning_well:
        return None
    schedulers = found["schedulers"]
    named = (
        ", ".join(
            f"{name} (step() called {count}× in {f.n_steps} optimizer steps)" for name, count in schedulers.items()
        )
        or "the learning-rate schedule"
    )
    per_batch = any(count >= 0.5 * f.n_steps for count in schedulers.values())
    return Diagnosis(
        "lr_too_low",
        "error",
        0.85,
        found["step"],
        f"the learning rate fell from {_g(found['peak'])} to {_g(found['final'])} (below 1/1000 of its peak "
        f"by step {found['step']}) under {named}; after that the loss stayed at {_g(tail)}.",
        (
            "call scheduler.step() once per epoch, not once per batch (or size step_size / T_max in batches)"
            if per_batch
            else "lengthen the schedule or raise its floor (eta_min / gamma)"
        )
        + "; keep the learning rate within ~100× of its peak while the loss is still falling",
        kind="schedule",
        lr_direction=+1,
    )


CODE = Code(
    name="lr_too_low", rule=lr_too_low, priority=100, causes=("labels_unlearnable",), quiet_after_divergence=True
)

"""Steps that overshoot: the loss climbs above its start, own-batch increases, lr beyond 2/λ_max [DL; CS]."""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..facts import Facts, med
from .base import Code
from .exploding_gradients import summed_note


def lr_too_high(f: Facts) -> Diagnosis | None:
    """Steps that overshoot: the loss climbs above its start [DL], own-batch increases, lr beyond 2/λ_max."""
    parts, first, strength = [], None, 0.0
    loss_level = False  # a loss that rose and stayed high, or went non-finite (not only a mechanism)
    crippled = False  # ≥ 90% of the hidden ReLUs killed for good (dead_relu's bar for "whatever the loss did")
    peak = f.peak
    # a spike the run recovers from (or ends far below its start after) is a catapult, not a fault
    ended_high = (
        f.loss_end is not None and f.loss_start is not None and f.loss_end >= f.loss_start - 0.1 * abs(f.loss_start)
    )  # "still high at the end" must be true
    if peak and peak[1] is not None and not f.recovered and not f.learning_well and ended_high:
        parts.append(
            f"the loss rose to {_g(peak[0])} (rolling median; it started at {_g(f.loss_start)}) "
            f"and was still at {_g(f.loss_end)} at the end"
        )
        first, strength = peak[1], strength + 0.35
        loss_level = True
    found = f.first_nonfinite
    growth = f.grad_growth
    grew = first is not None or (growth is not None and growth[0] >= 10)
    if found and found["step"] > 0 and grew and (f.update_ratio_early or 0) >= 1e-2:
        parts.append(f"then went non-finite at step {found['step']}")  # after growth, not out of the blue
        first = found["step"] if first is None else first
        strength += 0.2
        loss_level = True
    own = [r for r in f.own_batch if isinstance(r.get("first_order"), (int, float)) and r["first_order"] < 0]
    if len(own) >= 5:
        up = sum(r["delta"] > 0 for r in own) / len(own)
        alpha = med(r.get("alpha") for r in own)
        if up >= 0.25 or (alpha is not None and alpha > 1):
            parts.append(
                f"{up:.0%} of steps raised the loss on their own batch (median α {_g(alpha)}; α > 1 overshoots the valley)"
            )
            first = first if first is not None else next(int(r["step"]) for r in own if r["delta"] > 0)
            strength += 0.35
    killed = f.first_at("dead_relu_share", 0.5)
    if (
        (f.update_ratio_early or 0) >= 5e-2
        and killed is not None
        and 0 < killed <= 10
        and (f.share_init("dead_relu_share") or 0) < 0.5
    ):
        # ReLUs alive at initialisation, half of them dead within the first steps that moved the weights by
        # ≥ 5% of their norm (50× cs231n's 1e-3): the steps pushed their pre-activations below 0 for good.
        parts.append(
            f"the first steps moved the weights by {_g(f.update_ratio_early)} of their norm and "
            f"{f.share_late('dead_relu_share')[0]:.0%} of the hidden ReLUs were dead by step {killed}"
        )
        first = killed if first is None else min(first, killed)
        strength += 0.4 - 0.1  # the step-size part below is already said here
        crippled = f.share_late("dead_relu_share")[0] >= 0.9
    unsafe = [
        r for r in f.healthy_records if r.get("lr_exceeds_safe") in (True, 1) or r.get("precond_exceeds") in (True, 1)
    ]
    judged = [
        r for r in f.healthy_records if r.get("lr_exceeds_safe") is not None or r.get("precond_exceeds") is not None
    ]
    if judged and len(unsafe) >= 0.5 * len(judged):
        parts.append(f"lr exceeded the stability bound 2/λ_max at {len(unsafe)} of {len(judged)} measured steps")
        first = first if first is not None else int(unsafe[0]["step"])
        strength += 0.3
    bounce = _bouncing(f)
    if bounce and not parts:
        parts.append(bounce)
        first, strength = 0, strength + 0.35
        loss_level = True
    if not parts:
        return None
    ratio = f.update_ratio_early
    if ratio is not None and ratio >= 1e-2 and not any("moved the weights" in part for part in parts):
        parts.append(f"early steps moved the weights by {_g(ratio)} of their norm (cs231n: ≈ 1e-3)")
        strength += 0.1 + (0.1 if ratio >= 1e-1 else 0)
    elif not f.own_batch and not unsafe:
        strength -= 0.15  # a rising loss with modest steps may be bad data or wiring rather than the lr
    lr = next((r.get("lr") for r in f.records if isinstance(r.get("lr"), (int, float))), None)
    lr_text = f" (lr = {_g(lr)})" if lr else ""
    fix = f"lower the learning rate{lr_text} by 3–10× (or add warm-up / gradient clipping)"
    summed = summed_note(f)
    if summed:
        parts.append(summed)
        fix = "reduce the loss with 'mean' (or divide the lr by the number of summed values); else " + fix
    return Diagnosis(
        "lr_too_high",
        "error",
        _clip(0.4 + strength),
        first,
        "; ".join(parts) + ".",
        fix,
        lr_direction=-1,
        mechanism_only=not loss_level,  # on a run whose loss halved, the story lowers this to a note…
        persistent=crippled,  # …unless the steps killed nearly every ReLU for good: capacity lost to the end
    )


def _bouncing(f: Facts) -> str | None:
    """Steps far too large for a loss that does not fall: it bounces at a plateau instead of diverging.

    Adam's step is about lr per coordinate whatever the gradient's size, so at 100× its usual lr the loss
    need not climb above its start (the branches above): it stalls, the consecutive gradients point apart
    (each step jumps across the valley it should descend) or the steps, not the loss, set the weights'
    scale (the norm grows by an order of magnitude in a few hundred steps).
    """
    early, late = f.update_ratio_early, f.update_ratio
    # ≥ 0.1 early (100× cs231n's 1e-3) or ≥ 1e-2 over the whole run (10×). Measured on the digits and tabular
    # MLPs: Adam at lr 1e-3 gives 0.013 early and 0.004 over the run; at lr 0.3 and 1.0 0.34–0.42 early.
    big = (early is not None and early >= 0.1) or (late is not None and late >= 1e-2)
    # the loss did not halve [learning_well's bar]: a run with large steps that still learns is left alone
    # (healthy Adam with BatchNorm at lr 0.1–0.3 also moves its weights by 0.3 early, and halves its loss)
    stalled = f.progress is not None and f.progress < 0.5 and f.first_nonfinite is None and f.loss_form is None
    if not (big and stalled):
        return None
    # a gradient already ≥ 10× the weights' norm at initialisation (exploding_gradients' own bar) makes the
    # steps large at any sane lr: that finding explains them, not this one (c13, a ReLU RNN at SGD lr 1e-3
    # with ‖g‖/‖w‖ 37 at init and a cosine mean of +0.04 ± 0.16, fired here on runs whose mean fell below 0;
    # c78, Adam at lr 0.3, has 0.019)
    rel = f.relative_grad_init
    if rel is not None and rel >= 10:
        return None
    growth, cos = f.weight_growth, f.grad_cos_mean
    # 10× in one run: with Adam at lr 1e-3 the tabular MLP's norm grew 1.3×, at lr 0.3 and 1.0 34× and 65×;
    # supporting evidence only: a small initialisation (N(0, 0.01)) grows as much on a healthy run
    grew = growth is not None and growth[0] >= 10
    # mean consecutive-gradient cosine ≤ 0: E[g_t·g_t+1] ≈ ‖G‖² − η g_tᵀHg_t ≥ 0 for steps short enough
    # [MC; DL], so a mean at or below 0 means the curvature term wins: the steps overshoot (required: a healthy
    # logistic regression from a small init moved 0.8 of its weights early, grew 30×, cosine +0.13)
    # The mean must also be told from 0: a mean within two standard errors of 0 is consecutive gradients
    # nearly orthogonal (noise, or a loss that gives no signal), which is what gradient_noise_dominates reads,
    # not overshoot. It counts as overshoot when it is clearly negative (mean < −2 s.e.: Facts.oscillating),
    # or with the weights' norm grown ≥ 10× as independent sign that the steps set the weights' scale (c78,
    # Adam at lr 0.3: −0.05 ± 0.09, 34×). A zero-initialised ReLU net (−0.05 ± 0.15, its ‖w‖ starting at 0
    # so that any step is "large") and an LSTM fed (batch, time) as (time, batch) (−0.01 ± 0.07, 3×, Adam
    # at lr 0.01 whose fixed run moves as far) stall for other reasons and were named lr_too_high.
    # With the norm grown ≥ 10×, a mean within two standard errors of 0 counts whichever its sign: the sign of a
    # mean inside its own noise is a coin flip (c78's −0.05 ± 0.09 on one CPU read +0.01 ± 0.03 on another).
    stats = f.grad_cos_stats
    level = cos is not None and (cos <= 0 or (grew and stats is not None and stats[0] < 2 * stats[1]))
    apart = level and (f.oscillating or grew)
    if not apart:
        return None
    size, whole = (early, False) if early is not None and early >= 0.1 else (late, True)
    said = [
        f"the steps moved the weights by {_g(size)} of their norm"
        + (" per step over the run" if whole else " early on")
    ]
    if cos <= 0:
        said.append(f"consecutive gradients pointed apart (mean cosine {_g(cos)}): each step overshot")
    else:  # within its noise of 0 (see ``level``)
        said.append(
            f"consecutive gradients were nearly orthogonal (mean cosine {_g(cos)} ± {_g(stats[1])}): "
            "no step kept the direction of the one before"
        )
    if grew:
        said.append(f"the weights' norm grew {_g(growth[0])}× ({_g(growth[1])} → {_g(growth[2])})")
    said.append(f"yet the loss only went from {_g(f.loss_start)} to {_g(f.loss_end)}: it bounces, it does not descend")
    return "; ".join(said)


CODE = Code(
    name="lr_too_high",
    rule=lr_too_high,
    priority=50,
    causes=(
        "nonfinite",
        "exploding_gradients",
        "dead_relu",
        "saturated_activations",
        "gradient_noise_dominates",
        "labels_unlearnable",
        "vanishing_gradients",
    ),
)

"""A recurrent layer built with ``batch_first=False`` is fed (batch, time, features) tensors (passive check).

``nn.LSTM``/``nn.GRU``/``nn.RNN`` read a 3-D input as (time, batch, features) unless ``batch_first=True``.
Fed (batch, time, features), the recurrence runs across the examples of the batch and every time step is
an independent sequence: the model still learns per-step features, far worse, and ``out[:, -1]`` is not the
last time step. The shapes give it away: the layer's dim 0 is the loss's batch and its dim 1 is not.
"""

from __future__ import annotations

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..facts import Facts
from .base import Code

MIN_CHECKED = 3  # sampled steps with both a recurrent input and a loss (steps 0-4 are all sampled)


def _swapped(call: list, shapes: list[list]) -> bool | None:
    """Whether one input (step, d0, d1, d2) has the loss's batch first; None when no loss of its step is known.

    Dim 0 must be every loss's leading size and dim 1 none's: a seq-first model taking ``out[-1]`` has the
    batch at dim 1; a loss over every step sees T·B rows; a per-step loss that keeps the (d0, d1) layout
    cannot tell time from batch and is left alone, as is a dim 1 of 1 (batch 1 fed seq-first). Losses
    whose rows add up to d0·d1 or more cover every position (a seq-first loss over ``out[:, b]`` for each
    example b, in a loop): left alone too.
    """
    _, d0, d1, _ = call
    if not shapes:
        return None
    if d0 == d1 or d1 < 2 or sum(loss[0] for loss, _ in shapes) >= d0 * d1:
        return False
    for loss, target in shapes:
        keeps_layout = len(loss) >= 2 and loss[1] == d1
        if loss[0] != d0 or keeps_layout or (target and target[0] == d1):
            return False
    return True


def rnn_batch_time_swapped(f: Facts) -> Diagnosis | None:
    """A seq-first recurrent layer whose input's dim 0 is the loss's batch at (nearly) every sampled step."""
    by_step: dict[int, list[list]] = {}
    for step, loss, target in f.obs.get("loss_shapes") or []:
        by_step.setdefault(step, []).append([loss, target])
    best = None
    for layer in f.obs.get("recurrent_inputs") or []:
        steps: dict[int, list] = {}  # per sampled step: its calls' verdicts (a layer may run twice a step)
        for call in layer.get("calls") or []:
            verdict = _swapped(call, by_step.get(call[0], []))
            if verdict is not None:
                steps.setdefault(call[0], []).append((call, verdict))
        checked = len(steps)
        hits = [calls[0][0] for calls in steps.values() if all(v for _, v in calls)]
        if checked < MIN_CHECKED or len(hits) < 0.9 * checked:
            continue
        if best is None or len(hits) > len(best[1]):
            best = (layer, hits, checked)
    if best is None:
        return None
    layer, hits, checked = best
    _, d0, d1, d2 = hits[0]
    bad = not f.learning_well
    return Diagnosis(
        "rnn_batch_time_swapped",
        "error" if bad else "warning",
        _clip(0.7 + 0.2 * len(hits) / checked + (0.05 if bad else 0)),
        int(hits[0][0]),
        f"{layer['module']} ({layer['layer']}, batch_first=False) reads its input as (time, batch, features) "
        f"but received ({d0}, {d1}, {d2}) while the loss's batch was {d0}, at {len(hits)} of {checked} sampled "
        f"steps: the recurrence runs across the {d0} examples of the batch and treats each of the {d1} time "
        "steps as a separate sequence (so out[:, -1] would not be the last time step).",
        f"build the layer with nn.{layer['layer']}(..., batch_first=True), or feed it x.transpose(0, 1) "
        "(time first; its last time step is then out[-1])",
        whole_run=True,
    )


CODE = Code(
    name="rnn_batch_time_swapped",
    rule=rnn_batch_time_swapped,
    priority=35,
    causes=(
        "lr_too_high",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "vanishing_gradients",
        "exploding_gradients",
        "saturated_activations",
        "dead_relu",
    ),
)

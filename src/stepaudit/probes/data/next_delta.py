"""The ``next_delta`` probe: what step t did to the next batch, L_{t+1}(w_{t+1}) − L_{t+1}(w_t).

Known only at step t+1, so it amends the previous record (``ctx.amend_previous``); it needs every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...context import StepContext
from ...maths import views
from ...precision import is_float64
from ...state import AutocastState, preserved
from .. import register
from ..base import NoOptions, Probe
from .common import evaluate, functional_state, rounding_bound


@dataclass
class NextDeltaState:
    """The previous audited step (its index and its weights before) and how many gaps were seen in a row."""

    previous: tuple[int, Tensor] | None = None
    gaps: int = 0


def _replayed_loss(ctx: StepContext, flat_weights: Tensor, float64: bool) -> float:
    """This step's objective (its batch, its dropout masks) at other weights, nothing left changed."""
    weights = views(flat_weights, ctx.params)
    total = 0.0
    with torch.no_grad():
        for part in ctx.parts:
            with preserved(ctx.model, part.rng, AutocastState() if float64 else ctx.autocast):
                state = functional_state(ctx, weights, float64)
                if not float64:  # fresh buffer clones, as ctx.loss_of_params does
                    state.update({"model." + n: b.detach().clone() for n, b in ctx.model.named_buffers()})
                total += float(evaluate(ctx, state, part.batch, float64))
    return total / len(ctx.parts)


def _next_delta(ctx: StepContext, options: NoOptions, state: NextDeltaState) -> dict:
    """For the previous step t: next_delta = L_{t+1}(w_{t+1}) − L_{t+1}(w_t), one extra forward at w_t."""
    previous = state.previous
    state.previous = (ctx.step, ctx.flat_before.clone())  # the audit reuses its buffers next step
    if previous is None:
        return {}
    if previous[0] != ctx.step - 1:
        state.gaps += 1
        if state.gaps >= 2:
            raise ValueError("next_delta compares consecutive steps; schedule it every step: probes={'next_delta': 1}")
        return {}  # one gap: a step in between failed to audit
    state.gaps = 0
    float64 = is_float64(ctx)
    loss_at_old = _replayed_loss(ctx, previous[1], float64)
    loss_at_new = ctx.record.get("loss_before", math.nan)  # L_{t+1}(w_{t+1}), same masks
    ctx.amend_previous(
        next_delta=loss_at_new - loss_at_old,
        next_loss_before=loss_at_old,
        next_loss_after=loss_at_new,
        next_rounding_noise=rounding_bound(ctx.record, loss_at_old, loss_at_new),
    )
    return {}


FIELDS = ("next_delta", "next_loss_before", "next_loss_after", "next_rounding_noise")
next_delta_probe = register(
    Probe(
        "next_delta",
        _next_delta,
        fields=FIELDS,
        needs=frozenset({"weights_before", "record", "batch"}),
        state=NextDeltaState,
        amends=FIELDS,
        every_step="it compares consecutive steps",
    )
)

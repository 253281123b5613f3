"""What the data probes share: functional evaluation at explicit weights and the step's rounding rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from ...context import StepContext, check_scalar_loss
from ...precision import cast_batch


def functional_state(ctx: StepContext, weights: Sequence[Tensor], float64: bool) -> dict[str, Tensor]:
    """``functional_call`` state for the objective module: the audited weights (all in float64 if asked)."""
    state = {"model." + n: w for n, w in zip(ctx.names, weights)}
    if not float64:
        return state
    state = {k: v.double() for k, v in state.items()}
    audited = set(ctx.names)
    for n, p in ctx.model.named_parameters():
        if n not in audited:
            state["model." + n] = p.detach().double()
    for n, b in ctx.model.named_buffers():
        state["model." + n] = b.detach().double() if b.is_floating_point() else b.detach().clone()
    return state


def evaluate(ctx: StepContext, state: dict, batch: Any, float64: bool) -> Tensor:
    """The objective on ``batch`` with the given functional state (batch cast to float64 if asked)."""
    if float64:
        batch = cast_batch(batch, torch.float64)
    return check_scalar_loss(functional_call(ctx.objective(), state, (batch,)))


def _relative_error(record: dict) -> float:
    """Relative rounding error of one loss evaluation, as the core audit estimated it for this step."""
    noise, a, b = record.get("rounding_noise"), record.get("loss_before"), record.get("loss_after")
    try:
        scale = max(abs(a), abs(b))
        return noise / (2.0 * scale) if math.isfinite(noise) and scale > 0 else math.nan
    except TypeError:
        return math.nan


def rounding_bound(record: dict, a: float, b: float) -> float:
    """Rounding bound of ``b − a`` with the step's relative error (same rule as ``rounding_noise``)."""
    return 2.0 * _relative_error(record) * max(abs(a), abs(b))

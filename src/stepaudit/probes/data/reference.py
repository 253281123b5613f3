"""The ``reference`` probe: what the step did to fixed reference (held-out) data, and how its gradient agrees.

``ref_delta`` = L_ref(w_{t+1}) − L_ref(w_t); ``grad_cos_ref`` = cos(g, ∇L_ref(w_t)). All evaluations are
functional (``torch.func.functional_call``) at explicit weights, replayed and wrapped in ``state.preserved``:
nothing the training loop can observe is changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ... import noise as noise_stats
from ...context import StepContext
from ...maths import flat_copy, views
from ...precision import is_float64
from ...state import AutocastState, RngState, cuda_devices, preserved
from .. import register
from ..base import Options, Probe
from .common import evaluate, functional_state, rounding_bound


def reference_batches(reference: Any) -> Callable[[], Iterable]:
    """How to iterate the reference data, again and again.

    A tensor, tuple (incl. namedtuple) or dict is ONE batch. A list, a DataLoader or any other
    re-iterable object is a sequence of batches (streamed: one batch in memory at a time). A
    one-shot iterator or generator is refused: it would be empty on the second pass.
    """
    if reference is None:
        raise ValueError("no reference data: pass Audit(..., reference=(x, y)) or a DataLoader")
    if isinstance(reference, (Tensor, tuple, dict)):
        return lambda: (reference,)
    if isinstance(reference, Iterator):
        raise TypeError(
            "reference is a one-shot iterator/generator and would be empty after the first "
            "evaluation; pass a list of batches or a DataLoader (re-iterable), or one batch as a tuple"
        )
    if isinstance(reference, Iterable) and not isinstance(reference, (str, bytes)):
        return lambda: iter(reference)
    raise TypeError(
        f"reference must be a batch (tensor, tuple, dict) or a re-iterable of batches "
        f"(list, DataLoader), got {type(reference).__name__}; wrap a Dataset in a DataLoader"
    )


def check_reference(reference: Any) -> None:
    """Refuse unusable reference data at construction time (for ``Audit.__init__``)."""
    if reference is not None:
        reference_batches(reference)


@dataclass
class ReferenceOptions(Options):
    """``grad_cos``: also the reference gradient at the old weights and its cosine with g (one backward)."""

    grad_cos: bool = True


@dataclass
class ReferenceState:
    """The fixed dropout masks of ``reference_mode="train"``, and the last L_ref(w_{t+1}) to reuse as "before"."""

    rng: RngState | None = None
    after: tuple | None = None  # (flat weights, loss, (mode, float64), buffers)


def _reference_loss(
    ctx: StepContext,
    weights: Sequence[Tensor] | None,
    batches: Callable[[], Iterable],
    mode: str,
    rng: RngState | None,
    float64: bool,
) -> tuple[float, Tensor | None]:
    """Example-weighted mean reference loss at ``weights``; with ``weights=None``, at the OLD weights
    together with the reference gradient there (flat, float64). One batch in memory at a time."""
    gradient = weights is None
    if gradient:
        flat = (ctx.flat_before.double() if float64 else ctx.flat_before).detach().requires_grad_(True)
        weights = views(flat, ctx.params)
    total, count, grad = 0.0, 0, None
    with preserved(ctx.model, rng, AutocastState() if float64 else ctx.autocast):
        if mode == "eval":
            ctx.model.eval()
        state = functional_state(ctx, weights, float64)
        for index, batch in enumerate(batches()):
            n = noise_stats.batch_len(batch) or 1
            try:
                with torch.enable_grad() if gradient else torch.no_grad():
                    value = evaluate(ctx, state, batch, float64)
                    if gradient:
                        g = torch.autograd.grad(value * n, flat)[0].double()
                        grad = g if grad is None else grad + g
            except Exception as error:
                reference = ctx.options.get("reference")
                if index == 0 and isinstance(reference, list) and all(isinstance(b, Tensor) for b in reference):
                    raise type(error)(
                        f"{error} (reference is a list, read as a list of batches; for one batch (x, y) pass a tuple)"
                    ) from error
                raise
            total += n * float(value.detach())
            count += n
    if count == 0:
        raise ValueError("the reference data yielded no batches")
    return total / count, (grad / count if gradient else None)


def _same_buffers(ctx: StepContext, saved: list[Tensor]) -> bool:
    live = list(ctx.model.buffers())
    return len(live) == len(saved) and all(torch.equal(a, b) for a, b in zip(live, saved))


def _reference(ctx: StepContext, options: ReferenceOptions, memory: ReferenceState) -> dict:
    """ref_delta = L_ref(w_{t+1}) − L_ref(w_t) on fixed reference data, and grad_cos_ref at w_t.

    Both losses use the buffers as they are after the step (BatchNorm running statistics already
    updated by this step's forward): ref_delta is what the weight update did.
    """
    batches = reference_batches(ctx.options.get("reference"))
    mode = ctx.options.get("reference_mode", "eval")
    want_cos = options.grad_cos
    float64 = is_float64(ctx)
    rng = None
    if mode == "train":  # one fixed set of dropout masks for the whole run: L_ref stays one function of w
        if memory.rng is None:
            memory.rng = RngState.capture(cuda_devices(ctx.model))
        rng = memory.rng
    key = (mode, float64)
    cached, memory.after = memory.after, None
    grad = None
    if want_cos:
        loss_before, grad = _reference_loss(ctx, None, batches, mode, rng, float64)
    elif cached and cached[2] == key and torch.equal(cached[0], ctx.flat_before) and _same_buffers(ctx, cached[3]):
        loss_before = cached[1]  # the previous step's "after" at exactly these weights and buffers
    else:
        loss_before, _ = _reference_loss(ctx, ctx.before, batches, mode, rng, float64)
    live = [p.detach() for p in ctx.params]
    loss_after, _ = _reference_loss(ctx, live, batches, mode, rng, float64)
    if not want_cos and ctx.options.get("reference_every", 1) == 1:
        memory.after = (flat_copy(ctx.params), loss_after, key, [b.detach().clone() for b in ctx.model.buffers()])
    fields = {
        "ref_loss_before": loss_before,
        "ref_loss_after": loss_after,
        "ref_delta": loss_after - loss_before,
        "ref_rounding_noise": rounding_bound(ctx.record, loss_before, loss_after),
        "ref_mode": mode,
    }
    if grad is not None:
        g = ctx.flat_grad.double()
        denominator = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(grad))
        fields["grad_cos_ref"] = float(g @ grad) / denominator if denominator > 0 else math.nan
    return fields


reference_probe = register(
    Probe(
        "reference",
        _reference,
        fields=("ref_loss_before", "ref_loss_after", "ref_delta", "ref_rounding_noise", "ref_mode", "grad_cos_ref"),
        options=ReferenceOptions,
        needs=frozenset({"weights_before", "gradient", "record", "reference"}),
        state=ReferenceState,
        turned_on_by="reference",
        check_inputs=lambda options: check_reference(options.get("reference")),
    )
)

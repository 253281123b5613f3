"""The Hessian operator the curvature probes share: H·v at the old weights, on the step's batch or a fixed one.

Every Hessian is taken at the old weights with the training forward's semantics (same dropout masks,
BatchNorm batch statistics, buffers restored), via ``StepContext.hvp``; with ``Audit(precision="float64")``
on a float64 twin. Also here: the warm-started Lanczos the eigenvalue probes share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ... import linalg, maths
from ...context import Part, StepContext
from ...precision import cast_batch, is_float64, shared_twin
from ...state import AutocastState, RngState, cuda_devices
from .options import CurvatureSettings, settings_of, state

HVP_FIELDS = ("hvp_method", "hvp_fallback")  # every curvature probe says which product ran
NEEDS = frozenset({"weights_before", "update", "record", "batch", "hessian"})


def generator(ctx: StepContext) -> torch.Generator:
    """A private CPU generator kept across steps: random start vectors never consume training RNG."""
    kept = state(ctx)
    if kept.generator is None:
        kept.generator = torch.Generator().manual_seed(settings_of(ctx.options).seed)
    return kept.generator


def method_slot(ctx: StepContext) -> dict:
    """The context's memory of the HVP method for this precision (measured once per audit, then reused)."""
    return ctx.memory.setdefault("_hvp_method64" if is_float64(ctx) else "_hvp_method", {})


def _twin_loss(ctx: StepContext, parts: list[Part]) -> tuple[Callable, torch.nn.Module]:
    """(``params -> loss``, the model it runs) on the audit's shared float64 twin (Audit(precision="float64")).

    The twin is the one the loss evaluator uses (``precision.shared_twin``): loaded here with the live
    model's buffers and train/eval flags; the weights are substituted anyway.
    """
    twin = shared_twin(ctx)
    parts64 = [Part(cast_batch(p.batch, torch.float64), p.rng) for p in parts]
    shadow = dataclasses.replace(ctx, model=twin.twin, parts=parts64, autocast=AutocastState(), cache={})
    return shadow.loss_of_params(), twin.twin


def _in_eval_mode(model: torch.nn.Module, loss: Callable) -> Callable:
    """Wrap ``loss`` so it runs with every module in eval mode, flags restored afterwards."""

    def evaluated(params: tuple) -> torch.Tensor:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return loss(params)
        finally:
            for module, mode in modes:
                module.training = mode

    return evaluated


def _seeded_rng_state(seed: int, devices: list[int]) -> RngState:
    """Generator states as after seeding with ``seed``, read from private generators.

    torch.manual_seed would reseed every CUDA device (or queue that for a lazy CUDA init): a change to
    the training run's random streams even inside fork_rng, which restores only the devices it is given.
    """
    cuda = {d: torch.Generator(device=f"cuda:{d}").manual_seed(seed).get_state() for d in devices}
    return RngState(torch.Generator().manual_seed(seed).get_state(), cuda)


def _reference_part(ctx: StepContext, batch: Any) -> Part:
    """The fixed reference batch with a fixed RNG state (same dropout masks at every step)."""
    kept = state(ctx)
    if kept.reference_rng is None:
        kept.reference_rng = _seeded_rng_state(settings_of(ctx.options).seed, cuda_devices(ctx.model))
    return Part(batch, kept.reference_rng)


def hessian(ctx: StepContext, on: str = "batch") -> linalg.Hvp:
    """H·v at the old weights on the step's batch (``on="batch"``) or the fixed reference (cached per step).

    With ``Audit(precision="float64")`` the products run on a float64 twin; otherwise in the
    model's dtype. The HVP method is chosen once per audit ("auto": measured) and then reused.
    """
    key = f"_hessian:{on}"
    if key in ctx.cache:
        return ctx.cache[key]
    float64 = is_float64(ctx)
    if on == "batch" and not float64:
        operator = ctx.hvp()
    else:
        if on == "batch":
            parts = ctx.parts
        else:
            parts = [_reference_part(ctx, settings_of(ctx.options).reference_batch)]
        loss, model = _twin_loss(ctx, parts) if float64 else (ctx.loss_of_params(parts), ctx.model)
        if on == "reference" and ctx.options.get("reference_mode", "eval") == "eval":
            loss = _in_eval_mode(model, loss)
        params = tuple(p.detach().to(torch.float64) if float64 else p for p in ctx.before)
        slot = method_slot(ctx)
        operator = linalg.make_hvp(loss, params, method=slot.get("method", "auto"))
        slot["method"] = operator.method
    slot = method_slot(ctx)
    if operator.fallback_reason:
        slot["fallback"] = operator.fallback_reason
    ctx.cache[key] = operator
    return operator


def method_fields(ctx: StepContext, operator: linalg.Hvp) -> dict:
    """``hvp_method`` (and ``hvp_fallback`` when forward mode failed) of the operator."""
    fields = {"hvp_method": operator.method}
    slot = ctx.memory.get("_hvp_method64" if is_float64(ctx) else "_hvp_method", {})
    if slot.get("fallback"):
        fields["hvp_fallback"] = slot["fallback"]
    return fields


def working_dtype(ctx: StepContext) -> torch.dtype:
    """Dtype of the Lanczos vectors: the Hessian operator's (float64 twin or model dtype), at least float32."""
    return maths.working_dtype(torch.float64 if is_float64(ctx) else ctx.flat_before.dtype)


def delta_w(ctx: StepContext) -> torch.Tensor:
    """Δw in the dtype of the Hessian operator (float64 twin: recomputed from the weights, exactly)."""
    if is_float64(ctx):
        return maths.flat_copy(ctx.params).double() - ctx.flat_before.double()
    return ctx.flat_delta_w


def nan_fields(prefix: str, note: str) -> dict:
    """``{prefix: nan, prefix_note: note}``: an estimate that could not be made, and why."""
    return {prefix: math.nan, f"{prefix}_note": note}


def top_eigen(
    ctx: StepContext,
    operator: Callable,
    dim: int,
    memory_key: str,
    hint: torch.Tensor | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> linalg.LanczosResult:
    """Lanczos for λ_max, warm-started from the previous step's top eigenvector (plus a little noise).

    A cold start mixes a random vector with ``hint`` (the gradient): gradients lie largely in the
    top Hessian eigenspace (Gur-Ari et al. 2018), which cuts iterations and the chance of settling
    on the second eigenvalue when the first is barely present in a random start. Under DDP the start
    is the same on every rank: the generator is seeded alike, the gradient is the all-reduced one, and
    the previous vector came out of the same global products. ``memory_key`` names the warm start.
    """
    settings: CurvatureSettings = settings_of(ctx.options)
    gen, dtype, vectors = generator(ctx), working_dtype(ctx), state(ctx).vectors
    previous = vectors.get(memory_key)
    if previous is not None and previous.numel() == dim:
        # A small random admixture keeps the start from being exactly orthogonal to a new top direction.
        previous = previous.to(dtype)
        noise = maths.rademacher(dim, gen, dtype, previous.device)
        start = previous + 1e-2 * noise / math.sqrt(dim)
    else:
        start = maths.rademacher(dim, gen, dtype, ctx.flat_before.device) / math.sqrt(dim)
        if hint is not None:
            norm = float(torch.linalg.vector_norm(hint))
            if math.isfinite(norm) and norm > 0:
                start = start + hint.to(start) / norm
    result = linalg.lanczos(
        operator,
        dim,
        iterations=settings.max_hvps,
        start=start,
        tol=settings.tol,
        stop=settings.stop,
        verify=settings.verify,
        agree=agree,
    )
    vectors[memory_key] = result.eigenvector
    return result

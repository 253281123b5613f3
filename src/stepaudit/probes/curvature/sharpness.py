"""The ``sharpness`` probe: λ_max of the Hessian, and the learning rate below which gradient descent is stable.

With several processes, ``scope`` says whose Hessian: "local" (this rank's batch, no collective) or
"global" (the mean loss over all ranks' batches: one all-reduce per HVP, the stopping test agreed across
ranks); recorded as ``sharpness_scope``.
"""

from __future__ import annotations

import math

import torch

from ... import distributed, linalg
from ...context import StepContext
from .. import register
from ..base import Probe
from .hessian import HVP_FIELDS, NEEDS, hessian, method_fields, method_slot, nan_fields, top_eigen
from .options import KEY, OPTION_KEYS, CurvatureSettings, CurvatureState, collective, global_scope


def safe_lr(optimizer: torch.optim.Optimizer, sharpness: float) -> tuple[float, str]:
    """Largest stable learning rate on the quadratic model with curvature ``sharpness``, and its rule.

    Plain GD: η < 2/λ (descent lemma). Heavy-ball momentum β with PyTorch's dampening d:
    η(1−d) < (2+2β)/λ; Nesterov: η < (2+2β)/((1+2β)λ) (Cohen et al., ICLR 2021, Appendix).
    Weight decay wd adds wd to the curvature the optimizer sees. Dampening 1: after the first step no
    gradient enters the momentum buffer, so no learning rate diverges. Uses the first parameter group.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return math.nan, "adaptive or unknown optimizer: see precond_sharpness"
    group = optimizer.param_groups[0]
    beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    curvature = sharpness + float(group.get("weight_decay", 0.0))
    if curvature <= 0:
        return math.inf, "no positive curvature"
    if beta == 0:
        return 2.0 / curvature, "2/λ"
    if dampening == 1:
        return math.inf, "dampening 1: no gradient enters the momentum buffer"
    if group.get("nesterov"):
        return (2 + 2 * beta) / ((1 + 2 * beta) * curvature), "(2+2β)/((1+2β)λ) nesterov"
    return (2 + 2 * beta) / ((1 - dampening) * curvature), "(2+2β)/((1−d)λ) heavy-ball"


def _global_hessian(ctx: StepContext, on: str) -> linalg.Hvp:
    """H = (1/W) Σ_r H_r, the Hessian of the mean of the ranks' losses: this rank's HVPs, each all-reduced.

    Lockstep: the HVP method is agreed first (reverse-mode everywhere if any rank chose or fell back to
    it; a rank whose operator could not be built makes every rank refuse), and each product goes
    through ``distributed.mean_over_ranks`` (a failing rank sends NaN). The caller runs it on every
    rank or on none (after the step's packed all-reduce).
    """
    try:
        local, failure = hessian(ctx, on), None
    except Exception as error:  # noqa: BLE001 - the peers must hear of it before any product
        local, failure = None, error
    failed, reverse = distributed.any_rank(failure is not None, local is not None and local.method == linalg.REVERSE)
    if failed:
        raise RuntimeError(f"the Hessian operator could not be built on every rank ({failure or 'another rank'})")
    if reverse and local.method != linalg.REVERSE:  # timings differ between ranks; the method must not
        method_slot(ctx)["method"] = "reverse"
        for key in ("hvp", f"_hessian:{on}"):
            ctx.cache.pop(key, None)
        local = hessian(ctx, on)
    return linalg.Hvp(distributed.mean_over_ranks(local), local.method, local.dim, local.fallback_reason)


def _sharpness(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """λ_max of the Hessian (Lanczos, warm-started), its residual, HVPs used, and the safe learning rate."""
    on = options.sharpness_on
    scope = "global" if "sharpness" in collective(ctx.options) else "local"
    operator = _global_hessian(ctx, on) if scope == "global" else hessian(ctx, on)
    agree = (lambda stop: distributed.any_rank(stop)[0]) if scope == "global" else None
    labels = {"sharpness_on": on, **({"sharpness_scope": scope} if distributed.world()[1] > 1 else {})}
    calls = operator.calls
    try:
        result = top_eigen(ctx, operator, operator.dim, f"sharpness:{on}", hint=ctx.flat_grad, agree=agree)
    except FloatingPointError as error:
        return {
            **nan_fields("sharpness", f"non-finite Hessian-vector product ({error}); diverged weights?"),
            **labels,
            **method_fields(ctx, operator),
        }
    safe, rule = safe_lr(ctx.optimizer, result.eigenvalue)
    lr = ctx.lr()
    return {
        "sharpness": result.eigenvalue,
        "sharpness_residual": result.residual,
        "sharpness_hvps": operator.calls - calls,
        **labels,
        "safe_lr": safe,
        "safe_lr_rule": rule,
        "lr_exceeds_safe": (lr > safe) if math.isfinite(safe) else (None if math.isnan(safe) else False),
        **method_fields(ctx, operator),
    }


FIELDS = (
    "sharpness",
    "sharpness_note",
    "sharpness_residual",
    "sharpness_hvps",
    "sharpness_on",
    "sharpness_scope",
    "safe_lr",
    "safe_lr_rule",
    "lr_exceeds_safe",
    *HVP_FIELDS,
)
sharpness_probe = register(
    Probe(
        "sharpness",
        _sharpness,
        fields=FIELDS,
        options=CurvatureSettings,
        options_keys=OPTION_KEYS,
        needs=NEEDS | {"gradient"},
        state=CurvatureState,
        state_key=KEY,
        collective=global_scope,
    )
)

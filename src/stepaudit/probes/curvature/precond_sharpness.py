"""The ``precond_sharpness`` probe: λ_max(P⁻¹(H + wd)) of an adaptive optimizer vs its stability bound.

P comes from the optimizer's second-moment state (``preconditioner.py``), wd is its L2 (coupled) weight
decay; the bound is Cohen et al. (2022, "Adaptive Gradient Methods at the Edge of Stability").
"""

from __future__ import annotations

import torch

from ...context import StepContext
from .. import register
from ..base import Probe
from .hessian import HVP_FIELDS, NEEDS, hessian, method_fields, nan_fields, top_eigen, working_dtype
from .options import KEY, OPTION_KEYS, CurvatureSettings, CurvatureState
from .preconditioner import preconditioner


def _precond_sharpness(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """λ_max(P⁻¹(H + wd)) with P from the optimizer's second-moment state and wd its L2 (coupled) weight decay,
    vs the stability bound (Cohen et al. 2022)."""
    found = preconditioner(ctx.optimizer, ctx.params)
    if found.inverse_sqrt is None:
        return nan_fields("precond_sharpness", found.rule)
    operator = hessian(ctx)
    scale = found.inverse_sqrt.to(device=ctx.flat_before.device)
    dtype = working_dtype(ctx)  # never the 16-bit model dtype: P⁻ᐟ² rounded to 8 bits is another matrix
    d = scale.to(dtype)
    decay = None if found.weight_decay is None else (scale**2 * found.weight_decay.to(scale.device)).to(dtype)
    calls = operator.calls

    def preconditioned(v: torch.Tensor) -> torch.Tensor:
        # λ(P⁻¹(H + wd)) = λ(P^{-½} H P^{-½} + P⁻¹wd): a similar, symmetric operator Lanczos can handle.
        v = v.to(dtype)
        out = d * operator(d * v).to(dtype)
        return out if decay is None else out + decay * v

    try:
        hint = None if ctx.flat_grad is None else scale * ctx.flat_grad.to(scale.dtype)
        result = top_eigen(ctx, preconditioned, operator.dim, "precond", hint=hint)
    except FloatingPointError as error:
        return {
            **nan_fields("precond_sharpness", f"non-finite Hessian-vector product ({error})"),
            "precond_bound": found.bound,
        }
    return {
        "precond_sharpness": result.eigenvalue,
        "precond_sharpness_residual": result.residual,
        "precond_hvps": operator.calls - calls,
        "precond_bound": found.bound,
        "precond_rule": found.rule,
        "precond_exceeds": result.eigenvalue > found.bound,
        **method_fields(ctx, operator),
    }


FIELDS = (
    "precond_sharpness",
    "precond_sharpness_note",
    "precond_sharpness_residual",
    "precond_hvps",
    "precond_bound",
    "precond_rule",
    "precond_exceeds",
    *HVP_FIELDS,
)
precond_sharpness_probe = register(
    Probe(
        "precond_sharpness",
        _precond_sharpness,
        fields=FIELDS,
        options=CurvatureSettings,
        options_keys=OPTION_KEYS,
        needs=NEEDS | {"gradient", "optimizer_state"},
        state=CurvatureState,
        state_key=KEY,
    )
)

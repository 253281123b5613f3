"""The ``quadratic`` probe: ½ Δwᵀ H Δw, the second-order Taylor term of the step, and what is left above it."""

from __future__ import annotations

import math

from ...context import StepContext
from ...maths import dot64
from .. import register
from ..base import Probe
from .hessian import HVP_FIELDS, NEEDS, delta_w, hessian, method_fields
from .options import KEY, OPTION_KEYS, CurvatureSettings, CurvatureState

FIELDS = ("quadratic", "cubic_remainder")


def quadratic_fields(ctx: StepContext, quadratic: float) -> dict:
    """``quadratic`` and ``cubic_remainder`` = delta − first_order − quadratic."""
    delta, first_order = ctx.record.get("delta", math.nan), ctx.record.get("first_order", math.nan)
    return {"quadratic": quadratic, "cubic_remainder": delta - first_order - quadratic}


def _quadratic(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """``quadratic`` = ½ Δwᵀ H Δw (one HVP) and ``cubic_remainder`` = delta − first_order − quadratic."""
    operator = hessian(ctx)
    step = delta_w(ctx)
    quadratic = 0.5 * dot64(step, operator(step))
    return {**quadratic_fields(ctx, quadratic), **method_fields(ctx, operator)}


quadratic_probe = register(
    Probe(
        "quadratic",
        _quadratic,
        fields=(*FIELDS, *HVP_FIELDS),
        options=CurvatureSettings,
        options_keys=OPTION_KEYS,
        needs=NEEDS,
        state=CurvatureState,
        state_key=KEY,
    )
)

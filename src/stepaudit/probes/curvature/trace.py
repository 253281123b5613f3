"""The ``hessian_trace`` probe: tr(H) by Hutchinson's estimator with Rademacher vectors, and its standard error."""

from __future__ import annotations

import torch

from ... import linalg
from ...context import StepContext
from ...precision import is_float64
from .. import register
from ..base import Probe
from .hessian import HVP_FIELDS, NEEDS, generator, hessian, method_fields
from .options import KEY, OPTION_KEYS, CurvatureSettings, CurvatureState


def _hessian_trace(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """tr(H) by Hutchinson's estimator with Rademacher vectors, and its standard error."""
    operator = hessian(ctx)
    samples = options.trace_samples
    trace, stderr = linalg.hutchinson_trace(
        operator,
        operator.dim,
        samples=samples,
        generator=generator(ctx),
        dtype=ctx.flat_before.dtype if not is_float64(ctx) else torch.float64,
        device=ctx.flat_before.device,
    )
    return {
        "hessian_trace": trace,
        "hessian_trace_stderr": stderr,
        "hessian_trace_samples": samples,
        **method_fields(ctx, operator),
    }


hessian_trace_probe = register(
    Probe(
        "hessian_trace",
        _hessian_trace,
        fields=("hessian_trace", "hessian_trace_stderr", "hessian_trace_samples", *HVP_FIELDS),
        options=CurvatureSettings,
        options_keys=OPTION_KEYS,
        needs=NEEDS,
        state=CurvatureState,
        state_key=KEY,
    )
)

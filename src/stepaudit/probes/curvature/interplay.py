"""The ``interplay`` and ``interplay_matrix`` probes: how much of ``quadratic`` is cross-layer, and between which layers.

One probe family in one file: ``interplay_matrix`` records everything ``interplay`` does plus the matrix.
"""

from __future__ import annotations

import torch

from ...context import StepContext
from .. import register
from ..base import Probe
from .hessian import HVP_FIELDS, NEEDS, delta_w, hessian, method_fields
from .options import KEY, OPTION_KEYS, CurvatureSettings, CurvatureState, state
from .quadratic import FIELDS as QUADRATIC_FIELDS
from .quadratic import quadratic_fields


def _layers(ctx: StepContext) -> tuple[list[str], torch.Tensor]:
    """Module paths (the parameters' parent modules, first-seen order) and each element's module index."""
    kept = state(ctx)
    if kept.layers is None:
        paths: list[str] = []
        index = []
        for name, p in zip(ctx.names, ctx.params):
            path = name.rsplit(".", 1)[0] if "." in name else "(root)"
            if path not in paths:
                paths.append(path)
            index.append(torch.full((p.numel(),), paths.index(path), dtype=torch.long))
        kept.layers = (paths, torch.cat(index).to(ctx.flat_before.device))
    return kept.layers


def interplay_matrix(ctx: StepContext) -> tuple[list[str], torch.Tensor]:
    """Layer names and the matrix C with C_ij = ½ Δw_iᵀ H_ij Δw_j (one HVP per layer); ΣC = quadratic."""
    if "_interplay" in ctx.cache:
        return ctx.cache["_interplay"]
    operator = hessian(ctx)
    step = delta_w(ctx)
    paths, element_layer = _layers(ctx)
    n = len(paths)
    columns = torch.zeros(n, n, dtype=torch.float64, device=step.device)
    for j in range(n):
        # H (Δw restricted to layer j), then dotted with Δw_i for every layer i: column j of the matrix.
        v = torch.where(element_layer == j, step, torch.zeros_like(step))
        if not bool(v.any()):
            continue
        products = (step * operator(v)).to(torch.float64)
        columns[:, j] = torch.zeros(n, dtype=torch.float64, device=step.device).index_add_(0, element_layer, products)
    matrix = 0.25 * (columns + columns.T)  # ½ and symmetrised (H is symmetric; HVPs are so to rounding)
    ctx.cache["_interplay"] = (paths, matrix.cpu())
    return ctx.cache["_interplay"]


def _interplay_fields(ctx: StepContext, options: CurvatureSettings) -> dict:
    paths, matrix = interplay_matrix(ctx)
    quadratic = float(matrix.sum())
    interplay = quadratic - float(matrix.diagonal().sum())
    pairs = [(2.0 * float(matrix[i, j]), i, j) for i in range(len(paths)) for j in range(i + 1, len(paths))]
    pairs.sort(key=lambda item: -abs(item[0]))
    top = [{"a": paths[i], "b": paths[j], "value": value} for value, i, j in pairs[: options.top_pairs] if value != 0.0]
    fields = {"interplay": interplay, "interplay_top": top, **method_fields(ctx, hessian(ctx))}
    if "quadratic" not in ctx.record:  # free here (ΣC); the quadratic probe's own value wins if it ran
        fields.update(quadratic_fields(ctx, quadratic))
    return fields


def _interplay(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """``interplay``: cross-layer part of ``quadratic``; ``interplay_top``: the largest Δw_iᵀH_ijΔw_j pairs."""
    return _interplay_fields(ctx, options)


def _interplay_matrix(ctx: StepContext, options: CurvatureSettings, state: CurvatureState) -> dict:
    """Everything ``interplay`` records plus the full matrix (``interplay_matrix``, ``interplay_layers``)."""
    paths, matrix = interplay_matrix(ctx)
    return {**_interplay_fields(ctx, options), "interplay_layers": list(paths), "interplay_matrix": matrix.tolist()}


FIELDS = ("interplay", "interplay_top", *QUADRATIC_FIELDS, *HVP_FIELDS)
_COMMON = dict(options=CurvatureSettings, options_keys=OPTION_KEYS, needs=NEEDS, state=CurvatureState, state_key=KEY)
interplay_probe = register(Probe("interplay", _interplay, fields=FIELDS, **_COMMON))
interplay_matrix_probe = register(
    Probe("interplay_matrix", _interplay_matrix, fields=(*FIELDS, "interplay_layers", "interplay_matrix"), **_COMMON)
)

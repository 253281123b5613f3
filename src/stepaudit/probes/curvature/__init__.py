"""Curvature probes: why a step did what it did beyond its first-order promise g·Δw.

``delta − first_order`` is curvature: ½ Δwᵀ H Δw (``quadratic``) plus higher-order terms
(``cubic_remainder``). The cross-layer part of ``quadratic`` is ``interplay``; the largest Hessian
eigenvalue (``sharpness``) sets the learning rate below which gradient descent is stable
(``safe_lr``); for Adam-like optimizers the preconditioned sharpness λ_max(P⁻¹H) plays that role
(``precond_sharpness`` vs ``precond_bound``); ``hessian_trace`` estimates tr(H). One probe per file; they
share the Hessian operator (``hessian.py``), their options and their state (``options.py``).

Settings (tolerance, HVP budget, batch vs reference) go through ``probe_options={"curvature": {...}}`` or
``configure(audit, ...)``.
"""

from __future__ import annotations

from .hessian import hessian
from .interplay import interplay_matrix, interplay_matrix_probe, interplay_probe
from .options import CurvatureSettings, CurvatureState, collective, configure, settings_of, state
from .precond_sharpness import precond_sharpness_probe
from .quadratic import quadratic_probe
from .sharpness import safe_lr, sharpness_probe
from .trace import hessian_trace_probe

__all__ = [
    "CurvatureSettings",
    "CurvatureState",
    "collective",
    "configure",
    "hessian",
    "hessian_trace_probe",
    "interplay_matrix",
    "interplay_matrix_probe",
    "interplay_probe",
    "precond_sharpness_probe",
    "quadratic_probe",
    "safe_lr",
    "settings_of",
    "sharpness_probe",
    "state",
]

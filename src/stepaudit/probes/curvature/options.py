"""The curvature probes' shared options (``probe_options={"curvature": {...}}`` or ``configure``) and state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ... import distributed
from ...context import StepContext
from ...state import RngState
from ..base import Options

KEY = "curvature"  # the probe_options entry (and state key) the curvature family shares
OPTION_KEYS = (KEY, "sharpness")  # probe_options["sharpness"] are the family's options too


@dataclass
class CurvatureSettings(Options):
    """Knobs of the curvature probes; the defaults give λ_max to a guaranteed 1e-3 relative residual."""

    sharpness_on: Any = "batch"  # "batch" (the step's own), "reference" (Audit(reference=<one batch>)) or a batch
    tol: float = 1e-3  # relative accuracy of λ_max (see ``stop``)
    stop: Literal["residual", "eigenvalue"] = "residual"  # Lanczos stopping rule: "residual" (‖Hv − λv‖ ≤ tol·|λ|,
    #   which bounds the error rigorously) or "eigenvalue" (an estimated error ≤ tol·|λ|: a quarter fewer HVPs, but
    #   it can stop on the second eigenvalue before finding the first: errors up to 1.3e-2 at tol 1e-3,
    #   bench/stopping.py)
    verify: bool = False  # one extra HVP per estimate for a directly computed ‖Hv − λv‖ (else Lanczos's own)
    max_hvps: int = 40  # Lanczos steps per estimate (warm starts usually need far fewer)
    trace_samples: int = 20  # Rademacher vectors per Hutchinson trace estimate
    top_pairs: int = 5  # layer pairs named in interplay_top
    seed: int = 0  # private generator for random vectors (the global RNG is never touched)
    scope: Literal["local", "global"] = "local"  # several processes: "local" (this rank's batch) or "global"
    reference_batch: Any = field(default=None, repr=False, metadata={"internal": True})  # resolved sharpness_on

    def check(self) -> None:
        """Refuse out-of-range settings, naming the fix."""
        on = self.sharpness_on
        if isinstance(on, str) and on not in ("batch", "reference"):
            raise ValueError(f"sharpness_on must be 'batch', 'reference' or a batch, got {on!r}")
        for name in ("max_hvps", "trace_samples", "top_pairs"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < float(self.tol) < 1:
            raise ValueError(f"tol must lie in (0, 1), got {self.tol!r}")

    def settle(self, audit_options: Mapping[str, Any]) -> CurvatureSettings:
        """``sharpness_on`` resolved: a batch becomes the fixed reference; "reference" takes the Audit's one batch."""
        on = self.sharpness_on
        if not isinstance(on, str):
            return dataclasses.replace(self, reference_batch=on, sharpness_on="reference")
        if on == "reference" and self.reference_batch is None:
            return dataclasses.replace(self, reference_batch=_single_batch(audit_options.get("reference")))
        return self


def configure(audit: Any, **settings: Any) -> CurvatureSettings:
    """Set the curvature probes' options on an ``Audit`` (kept in ``audit.options["settings"]["curvature"]``).

    ``sharpness_on`` is "batch" (default), "reference" (the Audit's ``reference`` must then be a
    single batch), or a batch itself (tensor, tuple, list or dict) used as the fixed reference.
    """
    chosen = CurvatureSettings.parse(settings, KEY).settle(audit.options)
    audit.options.setdefault("settings", {})[KEY] = chosen
    return chosen


def _single_batch(reference: Any) -> Any:
    """The Audit's reference if it is one replayable batch; otherwise refuse, naming the fix."""
    if reference is None:
        raise ValueError(
            "sharpness_on='reference' needs Audit(..., reference=<one batch>) or "
            "configure(audit, sharpness_on=<a batch>)"
        )
    if isinstance(reference, (torch.Tensor, tuple, dict)):  # a list is a set of batches (as for reference data)
        return reference
    raise ValueError(
        f"sharpness_on='reference' needs a single batch (tensor, tuple, list or dict), "
        f"not a {type(reference).__name__}; pass configure(audit, sharpness_on=next(iter(loader)))"
    )


def settings_of(options: Mapping[str, Any]) -> CurvatureSettings:
    """The curvature options of an audit (its ``options`` mapping): configured, from probe_options, or defaults."""
    settled = (options.get("settings") or {}).get(KEY)
    if isinstance(settled, CurvatureSettings):
        return settled
    raw = options.get("probe_options") or {}
    return CurvatureSettings.parse({k: v for key in OPTION_KEYS for k, v in (raw.get(key) or {}).items()}, KEY)


def global_scope(options: CurvatureSettings) -> bool:
    """Whether sharpness issues collectives of its own (scope "global" under several processes)."""
    return distributed.world()[1] > 1 and options.scope == "global"


def collective(options: Mapping[str, Any]) -> set[str]:
    """Probes that issue collectives of their own (global-scope sharpness under several processes)."""
    return {"sharpness"} if global_scope(settings_of(options)) else set()


@dataclass
class CurvatureState:
    """What the curvature probes keep across steps (one object per audit, shared by the family)."""

    generator: torch.Generator | None = None  # private random vectors: never the training RNG
    reference_rng: RngState | None = None  # the fixed reference batch's fixed random state
    layers: tuple[list[str], torch.Tensor] | None = None  # module paths and each element's module index
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)  # warm starts: "sharpness:<on>", "precond"


def state(ctx: StepContext) -> CurvatureState:
    """The curvature family's state in this audit."""
    return ctx.state(KEY, CurvatureState)

"""``LRFindResult``: the arrays of an audited range test, its suggestions, a plain summary, an SVG and notebook HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

from .lrfind_suggest import fastai_suggestions, first_rise, reached_floor, stepaudit_rule

ORDER = ("stepaudit", "valley", "steep", "minimum", "slide")
LABELS = {
    "stepaudit": "stepaudit",
    "valley": "fastai valley",
    "steep": "fastai steep",
    "minimum": "fastai minimum/10",
    "slide": "fastai slide",
}


@dataclass
class Curvature:
    """What was measured of the curvature: λ_max and its residual at the start weights on the first batch,
    the optimizer's safe lr with its rule, and (λ_max(P⁻¹H), lr at its bound, rule) with where it was taken."""

    sharpness: float = math.nan
    residual: float = math.nan
    safe_lr: float = math.nan
    safe_rule: str = "not measured"
    precond: tuple[float, float, str] | None = None
    precond_where: str = "not measured"

    @property
    def bound(self) -> tuple[float, str]:
        """The stability bound on the lr that caps stepaudit's suggestion, and its name (NaN: none)."""
        if math.isfinite(self.safe_lr):
            return self.safe_lr, "2/λ_max" if self.safe_rule == "2/λ" else f"safe lr {self.safe_rule}"
        if self.precond is not None:
            return self.precond[1], "the preconditioned bound"
        return math.nan, ""


@dataclass
class LRFindResult:
    """Per-step arrays of the sweep (one entry per lr tried), the suggestions and the curvature bounds."""

    lrs: np.ndarray
    losses: np.ndarray  # training loss of each batch at the weights before its step
    smooth_losses: np.ndarray  # bias-corrected exponential average of ``losses`` (β = 0.98)
    losses_after: np.ndarray  # the same batch at the weights after its step
    deltas: np.ndarray  # losses_after − losses: the own-batch change
    first_order: np.ndarray  # g·Δw, the change the gradient promised
    alphas: np.ndarray  # where the step landed on its parabola (−1 barely moved, 0 floor, 1 opposite wall)
    verdicts: list[str]
    grid: np.ndarray  # the planned geometric grid (the sweep may stop before its end)
    stopped: str
    curvature: Curvature
    suggestions: dict[str, float] = field(default_factory=dict)
    suggestion: float = math.nan
    reason: str = ""
    lr_rise: float = math.nan  # first lr from which steps raised their own batch's loss (3 of 5 steps)
    lr_overshoot: float = math.nan  # first lr from which α > 1 (3 of 5 steps)
    lr_floor: float = math.nan  # first lr from which steps reached their own batch's floor: α ≥ 0 or a rise (3 of 5)
    optimizer_name: str = ""
    gains: np.ndarray = field(default_factory=lambda: np.zeros(0))  # −g·Δw/(lr·gᵀP⁻¹g): gain over a plain step
    momentum: float = 0.0  # heavy-ball β of the optimizer (0: none, or an averaging first moment as in Adam)
    gain_train: float = 1.0  # the steady-state gain of a training step at constant lr, (1−d)/(1−β)
    preconditioned: bool = False  # gains in the optimizer's metric P⁻¹ (Adam, AdamW, RMSprop) instead of P = I
    curvatures: np.ndarray = field(default_factory=lambda: np.zeros(0))  # κ_P = 2(Δloss − g·Δw)/(ΔwᵀPΔw)

    @classmethod
    def build(
        cls,
        rows: list[dict],
        grid: np.ndarray,
        stopped: str,
        curvature: Curvature,
        optimizer_name: str = "",
        momentum: tuple[float, float] = (0.0, 1.0),
        preconditioned: bool = False,
    ) -> LRFindResult:
        """Assemble the result from the sweep's rows and compute every suggestion."""
        column = lambda key: np.array([r[key] for r in rows], dtype=float)
        verdicts = [r["verdict"] for r in rows]
        lrs = column("lr")
        result = cls(
            lrs,
            column("loss"),
            column("smooth_loss"),
            column("loss_after"),
            column("delta"),
            column("first_order"),
            column("alpha"),
            verdicts,
            np.asarray(grid),
            stopped,
            curvature,
            optimizer_name=optimizer_name,
        )
        result.momentum, result.gain_train = momentum
        result.preconditioned = preconditioned
        metric = column("grad_metric") if all("grad_metric" in r for r in rows) else column("grad_sq")
        with np.errstate(divide="ignore", invalid="ignore"):
            result.gains = -result.first_order / (lrs * metric)  # G = −g·Δw/(lr·gᵀP⁻¹g), P = I for SGD
            # the own-batch parabola's curvature along the step, in the optimizer's metric: ΔwᵀHΔw / ΔwᵀPΔw
            steps = column("step_metric") if all("step_metric" in r for r in rows) else np.full(len(rows), np.nan)
            result.curvatures = 2 * (result.deltas - result.first_order) / steps
        rises = [v == "increase" for v in verdicts]
        rise = first_rise(rises)
        result.lr_rise = float(lrs[rise]) if rise is not None else math.nan
        over = first_rise([bool(a > 1) for a in result.alphas])
        result.lr_overshoot = float(lrs[over]) if over is not None else math.nan
        floor = first_rise(reached_floor(result.alphas, rises))
        result.lr_floor = float(lrs[floor]) if floor is not None else math.nan
        result.suggestions = fastai_suggestions(lrs, result.smooth_losses, len(grid))
        bound, name = curvature.bound
        lr, reason = stepaudit_rule(
            lrs,
            rises,
            bound,
            name,
            result.suggestions["valley"],
            result.gains,
            result.gain_train,
            preconditioned,
            result.curvatures,
            result.alphas,
        )
        result.suggestions = {"stepaudit": lr, **result.suggestions}
        result.suggestion, result.reason = lr, reason
        return result

    def curvature_lines(self) -> list[str]:
        """The curvature measurements as plain sentences."""
        c = self.curvature
        lines = []
        if math.isfinite(c.sharpness):
            lines.append(f"λ_max {c.sharpness:.4g} (residual {c.residual:.2g}) at the start weights, first batch")
            if math.isfinite(c.safe_lr):
                lines.append(f"safe lr {c.safe_lr:.4g} ({c.safe_rule})")
            else:
                lines.append(f"safe lr: {c.safe_rule}")
        else:
            lines.append("λ_max: not measured")
        if c.precond is not None:
            value, lr, rule = c.precond
            lines.append(
                f"preconditioned sharpness λ_max(P⁻¹H) {value:.4g}: meets its bound {rule} at lr {lr:.4g} "
                f"({c.precond_where})"
            )
        else:
            lines.append(f"preconditioned bound: {c.precond_where}")
        return lines

    def __str__(self) -> str:
        rows = [
            (
                f"lr range test ({self.optimizer_name}): {len(self.lrs)} of {len(self.grid)} steps, "
                f"lr {self.grid[0]:.3g} to {self.lrs[-1]:.3g}; stopped: {self.stopped}"
            ),
            f"suggestion: {self.suggestion:.3g}  ({self.reason})",
            "",
        ]
        rows += [f"  {LABELS[k]:<18} {self.suggestions.get(k, math.nan):.3g}" for k in ORDER]
        rows += [
            "",
            f"  first lr where the own-batch loss rose: {_fmt(self.lr_rise)}  (on 3 of 5 steps)",
            f"  first lr with α > 1 (overshoot):         {_fmt(self.lr_overshoot)}",
            f"  first lr at or past the floor (α ≥ 0):  {_fmt(self.lr_floor)}",
        ]
        if self.gain_train != 1.0:
            rows.append(f"  momentum β {self.momentum:g}: steady-state gain {self.gain_train:.3g}")
        if self.preconditioned:
            rows.append(
                "  gains in the optimizer's metric: −g·Δw/(lr·gᵀP⁻¹g), steady-state 1 for Adam's averaged moment"
            )
        rows += [f"  {line}" for line in self.curvature_lines()]
        return "\n".join(rows)

    def plot_svg(self) -> str:
        """The loss curve against the lr (log axis) with the suggestions and bounds marked: a standalone SVG."""
        from .lrfind_plot import lr_find_svg

        return lr_find_svg(self)

    def _repr_html_(self) -> str:
        """The SVG and a table of the suggestions, self-contained (for Jupyter)."""
        cells = "".join(
            f"<tr><td>{escape(LABELS[k])}</td><td>{escape(_fmt(self.suggestions.get(k, math.nan)))}</td></tr>"
            for k in ORDER
        )
        facts = "".join(
            f"<li>{escape(line)}</li>"
            for line in [
                f"first lr where the own-batch loss rose: {_fmt(self.lr_rise)}",
                f"first lr with α > 1: {_fmt(self.lr_overshoot)}",
                f"first lr at or past the floor (α ≥ 0): {_fmt(self.lr_floor)}",
                *self.curvature_lines(),
                f"stopped: {self.stopped}",
            ]
        )
        return (
            f'<div class="stepaudit-lr-find" style="font-family:system-ui,sans-serif;max-width:780px">'
            f"{self.plot_svg()}<p><b>suggestion {escape(_fmt(self.suggestion))}</b>: {escape(self.reason)}</p>"
            f'<table style="border-collapse:collapse">{cells}</table><ul>{facts}</ul></div>'
        )


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "none in the sweep"

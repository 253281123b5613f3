"""The audit's two loss evaluations (before and after the step) and the rounding noise they are judged by.

``loss_before`` is the user's training loss when they hand it over (``audit.step`` always does),
else one replayed forward; ``loss_after`` is always one replayed forward at the new weights. With
``precision="float64"`` both run on a float64 twin of the model and the noise is float64's epsilon.
Otherwise the relative rounding error of one evaluation is measured once, against the float64 twin,
and the noise of a difference follows from it (``probes.step.rounding_noise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .context import StepContext
from .precision import Float64Twin, shared_twin, working_roundoff
from .probes.step import rounding_noise


class LossEvaluator:
    """Evaluates the step's objective before and after the step, in the working dtype or in float64."""

    def __init__(
        self, model: torch.nn.Module, loss_fn: Callable, params: list[torch.Tensor], precision: str | None
    ) -> None:
        self.model, self.loss_fn, self.params, self.precision = model, loss_fn, params, precision
        self._relative_error: float | None = None  # measured once (see _rounding)
        self._failed_measurements = 0
        self._noise_method = "roundoff"

    def before(self, ctx: StepContext, training_loss: Any = None) -> float:
        """Loss at the old weights: the training pass's own value if given, else one replayed forward."""
        if self.precision == "float64":
            return self._twin_loss(ctx)
        if training_loss is not None:
            return float(training_loss.detach() if isinstance(training_loss, torch.Tensor) else training_loss)
        return ctx.loss_now()

    def after(self, ctx: StepContext, loss_before: float) -> tuple[float, float, str]:
        """(loss at the new weights, rounding noise of loss_after − loss_before, how the noise was found)."""
        if self.precision == "float64":
            loss_after = self._twin_loss(ctx)
            return loss_after, rounding_noise(loss_before, loss_after, torch.finfo(torch.float64).eps), "float64"
        relative_error, method = self._rounding(ctx)
        loss_after = ctx.loss_now()
        return loss_after, rounding_noise(loss_before, loss_after, relative_error), method

    def _twin_loss(self, ctx: StepContext) -> float:
        """The step's objective at the live weights, in float64 on the audit's shared twin."""
        twin = shared_twin(ctx)
        return sum(twin.loss(self.loss_fn, part.batch, part.rng) for part in ctx.parts) / len(ctx.parts)

    def _rounding(self, ctx: StepContext) -> tuple[float, str]:
        """Relative rounding error of one loss evaluation and how it was found, measured once.

        Measured against a float64 twin in eval mode (×4 for margin, never below the dtype's roundoff
        floor). Falls back to 64× the roundoff floor, labelled "roundoff", for models the twin cannot
        copy and for a ``loss_fn`` that draws random numbers itself; a non-finite measurement (NaN
        weights or data on that step) is not kept, so the next audited step measures again (three
        tries, then the fallback: a diverged run must not copy the model to float64 every step).
        """
        if self._relative_error is not None:
            return self._relative_error, self._noise_method
        floor = working_roundoff(self.params, ctx.autocast)
        try:
            twin = Float64Twin(self.model)
            twin.load(self.model)
            measured = twin.relative_error(self.model, self.loss_fn, ctx.parts[0].batch, ctx.autocast)
        except Exception:  # odd models (no deepcopy, dtype-specific code)
            measured = None
        if measured is not None and not math.isfinite(measured):
            self._failed_measurements += 1
            if self._failed_measurements < 3:  # a bad batch: measure again at the next audited step
                return 64 * floor, "roundoff"
            measured = None  # a diverged run: stop building a float64 copy of the model every step
        if measured is None:
            self._relative_error, self._noise_method = 64 * floor, "roundoff"
        else:
            self._relative_error, self._noise_method = max(4.0 * measured, floor), "measured"
        return self._relative_error, self._noise_method

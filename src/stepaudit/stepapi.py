"""The public step API: the calls any training framework makes to have one optimizer step audited.

In this order, once per optimizer step (``Audit.watch`` makes the first and the last around a block):

  1. ``audit.begin(batch)``       — before the step's first forward: decides whether the step is audited and
                                    keeps the random state the re-evaluations replay (dropout masks match);
  2. ``audit.before_update()``    — the gradient is final (after backward, clipping, unscaling) and the optimizer
                                    is about to change the weights: weights, gradient and loss before;
  3. ``audit.after_update()``     — the optimizer changed the weights: Δw, loss after, probes, record (returned);
  4. ``audit.end(failure=None)``  — the step is over (``failure``: the exception training raised in it).

A ``torch.optim.Optimizer`` calls 2 and 3 itself through its step hooks: call only 1 and 4. Any other
optimizer (fastai's, or an object with ``param_groups``) is read through ``optimizers.py`` and never hooked:
call all four. A step whose 2 and 3 never come (the framework skipped it) is closed by 4 with ``skipped=True``.
``begin_step``/``end_step(failed=...)``, their first names, still work and warn (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings
from typing import Any

from .arguments import check_replayable
from .faults import contained


class StepAPI:
    """``begin``/``before_update``/``after_update``/``end`` and the audit's public state, mixed into ``Audit``."""

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called: no later step is audited."""
        return self._closed

    @property
    def next_step(self) -> int:
        """Index of the next optimizer step (a resumed run counts on from ``first_step``)."""
        return self._step_count

    def log(self, name: str, value: float, step: int | None = None) -> None:
        """Put a metric into the run (accuracy, validation loss …): charted in the report and shown by ``compare``.

        ``step`` defaults to the last optimizer step taken. Never breaks training: a value that is not one
        number (None, a string, a tensor of several values) or a failed write is a one-line warning and
        nothing is logged (``strict=True``: a ``TypeError`` / the error instead).
        """
        with contained(self.strict, f"logging {name!r}", lambda e: _not_logged(name, e), wrap=False):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                and not (hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1)
            ):
                raise TypeError(f"audit.log({name!r}, value): value must be a number, got {type(value).__name__}")
            at = max(self._step_count - 1, self._first_step) if step is None else int(step)
            self.store.log_metric(at, name, float(value.item() if hasattr(value, "item") else value))

    def begin(self, batch: Any, *, accumulate: int = 1) -> Any:
        """Open the optimizer step on ``batch`` before its first forward; returns the step's ``StepWatch``.

        With gradient accumulation pass the micro-batches as a list and ``accumulate=len(list)``.
        """
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
        if accumulate > 1:
            if not isinstance(batch, (list, tuple)) or len(batch) != accumulate:
                raise ValueError(
                    f"with accumulate={accumulate}, pass a list of {accumulate} micro-batches "
                    "in the order you forward them"
                )
            batches = list(batch)
        else:
            batches = [batch]
        for b in batches:
            check_replayable(b)
        return self._begin(batches).watch

    def end(self, failure: BaseException | None = None, *, skipped: bool = False) -> None:
        """Close the step opened by ``begin``. ``failure``: what training raised in it (no warning is added);
        ``skipped``: the framework took no optimizer step (neither counted nor warned about). A due step closed
        without an update is counted as skipped."""
        if self._pending is None:
            raise RuntimeError("audit.end() without audit.begin(batch): open the step first")
        self._end(stacklevel=3, failed=failure is not None or skipped)

    def begin_step(self, batch: Any, *, accumulate: int = 1) -> Any:
        """Deprecated first name of ``begin``."""
        warnings.warn("audit.begin_step(batch) is deprecated: call audit.begin(batch)", DeprecationWarning, 2)
        return self.begin(batch, accumulate=accumulate)

    def before_update(self, loss: Any = None) -> None:
        """The gradient is final and the optimizer is about to update (``loss``: the step's training loss, to
        save a forward; it must be ``loss_fn`` on the step's batch)."""
        pending = self._manual_pending("before_update")
        if loss is not None:
            pending.watch.loss = loss
        if pending.due:
            self._sync(pending)  # this step's hyperparameters (a scheduler may have set them since the last)
        self._on_step_pre((self.optimizer,), {})

    def after_update(self) -> dict | None:
        """The optimizer updated the weights: audit the step; returns its record (None when not audited)."""
        pending = self._manual_pending("after_update")
        if pending.updated:
            raise RuntimeError(
                "audit.after_update() was already called for this step; call it once per "
                "optimizer step, then audit.end()"
            )
        pending.updated = True
        if pending.due:
            self._sync(pending)  # the state after the step (the second moment that produced this Δw)
        self._on_step_post()
        return pending.watch.record

    def end_step(self, *, failed: bool = False, skipped: bool = False) -> None:
        """Deprecated first name of ``end`` (``failed=True``: ``end(failure=the exception)``)."""
        warnings.warn("audit.end_step() is deprecated: call audit.end(failure=None)", DeprecationWarning, 2)
        if self._pending is None:
            raise RuntimeError("audit.end() without audit.begin(batch): open the step first")
        self._end(stacklevel=3, failed=failed or skipped)

    def _sync(self, pending: Any) -> None:
        """Refresh what the audit reads of the optimizer; a failure is the step's recorded error (never training's)."""
        with contained(
            self._strict_at_once, f"auditing step {self._step_count}: reading the optimizer failed", pending.keep_first
        ):
            self._reader.sync()

    def _manual_pending(self, call: str) -> Any:
        """The open step, for a call only optimizers without torch's step hooks make."""
        if self._reader.hooked:
            raise RuntimeError(
                f"audit.{call}() is for optimizers that are not torch.optim.Optimizer; "
                f"{type(self.optimizer).__name__}'s own step hooks do it: call only "
                "audit.begin(batch) and audit.end()"
            )
        if self._pending is None:
            raise RuntimeError(f"audit.{call}() outside a step: call audit.begin(batch) before the forward")
        return self._pending


def _not_logged(name: str, error: Exception) -> None:
    """``Audit.log`` outside ``strict``: a one-line warning, nothing logged."""
    warnings.warn(f"stepaudit did not log {name!r}: {error}", stacklevel=6)

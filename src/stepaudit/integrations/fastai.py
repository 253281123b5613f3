"""fastai: ``AuditCallback`` audits the optimizer steps of a ``Learner``'s training batches.

fastai's optimizers are not ``torch.optim.Optimizer`` and fire none of torch's step hooks, so the callback
drives the audit through its public step API (``stepapi.py``); the audit reads ``learn.opt`` through
``optimizers.py`` (fastai's ``SGD``/``RMSProp``/``Adam`` under torch's names; ``OptimWrapper``'s torch
optimizer as it is). Events, per fit:
  ``before_fit``    — build the ``Audit`` on ``learn.model`` and ``learn.opt`` (steps counted on from an
                      earlier fit of this callback); under ``learn.lr_find()`` nothing is audited, unless
                      ``lr_find=True``: then fastai's sweep is measured by an in-memory audit of its own
                      (``lrfind_fastai.py``: own-batch rise, α, λ_max, the preconditioned bound) and, after it,
                      ``.lr_find_result`` is an ``LRFindResult`` with stepaudit's suggestion beside fastai's;
  ``before_batch``  — (training batches only; after the callbacks that change the batch, such as MixUp)
                      ``audit.begin((xb, yb))``: the random state here is what the re-evaluation replays;
  ``before_step``   — ``audit.before_update()``: the gradient the optimizer gets (after clipping, unscaling);
  ``after_step``    — ``audit.after_update()``: Δw, loss after, probes, record;
  ``after_batch``   — ``audit.end()`` (a batch fastai cancelled before its step is not counted; a cancelled
                      step, e.g. fp16 overflow, is counted as a skipped step);
  ``after_fit``     — close the audit.
The audited loss is ``learn.loss_func(learn.model(*xb), *yb)``, read at each call (callbacks that swap it, such
as MixUp, are followed), or ``loss_fn(model, (xb, yb))`` if given: pass one when a callback changes the
prediction or the loss after the forward (``after_pred``/``after_loss``). Each fit is its own run;
with ``run=...`` the second fit of the same callback (``fine_tune``'s unfrozen phase) writes ``<run>-fit2``.
Refused with the fix: fastai's ``GradientAccumulation`` (one step spans several batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastai.callback.core import Callback

from ..audit import Audit
from ..lrfind_fastai import SweepAudit
from .adapter import Adapter

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AuditCallback(Callback):
    """Audit every (or every ``every``-th) optimizer step of ``Learner.fit``; ``.audit`` holds the records."""

    order = 100  # after the callbacks that change the batch, schedule hyperparameters or clip gradients
    run_valid = False

    def __init__(
        self,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        *,
        lr_find: bool = False,
        **audit_options: Any,
    ) -> None:
        super().__init__()
        self.loss_fn, self.audit_options, self.measure_lr_find = loss_fn, audit_options, lr_find
        self.adapter = Adapter(audit_options)  # the fits' audits; .current: the one the step calls go to
        self.sweep: SweepAudit | None = None  # the last measured learn.lr_find() (with lr_find=True)
        self._phase: str | None = None  # the open step: "open", "updating", "updated", "cancelled"

        def stepaudit(lrs: Any, losses: Any, num_it: int) -> tuple[float, tuple[float, float]]:
            """fastai suggestion function: stepaudit's lr from the sweep just measured, and its point on the curve."""
            if self.sweep is None or self.sweep.result is None:
                raise RuntimeError("stepaudit's suggestion needs AuditCallback(lr_find=True) in the Learner's cbs")
            return self.sweep.result.suggestion, self.sweep.point()

        self.suggest = stepaudit  # learn.lr_find(suggest_funcs=(valley, steep, learn.stepaudit.suggest))

    @property
    def audit(self) -> Audit | None:
        """This fit's audit (after the fit: the last fit's, closed); None before the first fit."""
        return self.adapter.audit

    @property
    def audits(self) -> list[Audit]:
        """One audit per fit, in order."""
        return self.adapter.audits

    @property
    def lr_find_result(self) -> Any:
        """The ``LRFindResult`` of the last measured ``learn.lr_find()`` (None before one)."""
        return None if self.sweep is None else self.sweep.result

    @property
    def name(self) -> str:
        """``learn.stepaudit`` (``learn.audit`` would shadow fastai's own attribute names)."""
        return "stepaudit"

    def _audited_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``learn.loss_func`` on the model's prediction for ``batch = (xb, yb)`` (as ``Learner`` computes it)."""
        xb, yb = batch
        pred = model(*xb)
        if isinstance(pred, torch.Tensor) and pred.dtype in _LOW_PRECISION:
            pred = pred.float()  # as MixedPrecision's after_pred does
        return self.learn.loss_func(pred, *yb)

    def before_fit(self) -> None:
        """Build the audit for this fit (under ``lr_find``: the sweep's, if asked); refuse gradient accumulation."""
        self._close(RuntimeError("an earlier fit raised"))  # it left its step and audit open
        names = {type(cb).__name__ for cb in self.learn.cbs}
        if "LRFinder" in names:
            if self.measure_lr_find:
                finder = next(cb for cb in self.learn.cbs if type(cb).__name__ == "LRFinder")
                self.sweep = SweepAudit(
                    self.learn.model,
                    self.learn.opt,
                    self.loss_fn or self._audited_loss,
                    finder.num_it,
                    self.audit_options.get("precision"),
                )
                self.adapter.follow(self.sweep.audit)
            return
        if "GradientAccumulation" in names:
            raise ValueError(
                "AuditCallback cannot audit fastai's GradientAccumulation: one optimizer step spans "
                "several batches; remove GradientAccumulation, or audit the loop in plain PyTorch "
                "with audit.watch(micro_batches, accumulate=N)"
            )
        earlier = self.adapter.audits[-1] if self.adapter.audits else None
        self.adapter.start(
            self.learn.model,
            self.learn.opt,
            self.loss_fn or self._audited_loss,
            first_step=0 if earlier is None else earlier.next_step,  # a later fit counts on
            suffix=None if earlier is None else f"fit{len(self.adapter.audits) + 1}",
        )

    def _sweeping(self) -> bool:
        """Whether the step calls go to the ``learn.lr_find()`` sweep's audit."""
        return self.sweep is not None and self.adapter.current is self.sweep.audit

    def before_batch(self) -> None:
        if self.adapter.current is None or not self.training:
            return
        self.adapter.open((tuple(self.learn.xb), tuple(self.learn.yb)))
        self._phase = "open"

    def before_step(self) -> None:
        if self._phase == "open":
            self._phase = "updating"
            self.adapter.current.before_update()

    def after_step(self) -> None:
        if self._phase == "updating":
            self._phase = "updated"
            record = self.adapter.current.after_update()
            if self._sweeping():
                self.sweep.seen(record)

    def after_cancel_step(self) -> None:
        if self._phase is not None:
            self._phase = "cancelled"

    def after_batch(self) -> None:
        phase, self._phase = self._phase, None
        if phase == "open":
            self.adapter.abandon()  # fastai cancelled the batch before its step: not counted
        elif phase is not None:
            self.adapter.close()

    def after_fit(self) -> None:
        sweeping = self._sweeping()
        self._close()
        if sweeping:
            self.sweep.finish()

    def _close(self, failure: BaseException | None = None) -> None:
        """Close the open step (as failed when ``failure``: training raised in it) and the audit."""
        self._phase = None
        self.adapter.finish(failure)

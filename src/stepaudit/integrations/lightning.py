"""Lightning: ``AuditCallback`` audits the optimizer steps of ``Trainer.fit`` without touching your module.

A thin adapter onto ``Audit.watch``. Hook order, per training batch:
  ``on_train_start``        — build the ``Audit`` on the LightningModule and the Trainer's (first) optimizer;
  ``on_train_batch_start``  — open ``audit.watch(batch)``: the random state here is what the re-evaluation
                              replays, so dropout masks match;
  (Lightning runs ``optimizer.step(closure)``: the closure — ``training_step`` and ``backward`` — runs
  inside the step, where the audit's step hooks capture the gradient, Δw and the loss after;)
  ``on_train_batch_end``    — close the watch;
  ``on_train_end`` / ``on_exception`` — close the audit (the run folder keeps every committed step).

The loss the audit re-evaluates is ``loss_fn(module, batch)`` if given, else your ``training_step``
(its ``Tensor`` or ``{"loss": ...}``), called with ``self.log``/``self.log_dict`` silenced so that the
re-evaluations leave your logged metrics alone (any other side effect of ``training_step`` would run again:
pass ``loss_fn`` then). Refused with the fix: gradient accumulation (``accumulate_grad_batches > 1``; audit
such loops with ``Audit.watch(..., accumulate=N)`` in plain PyTorch) and manual optimization without a
``loss_fn`` (its ``training_step`` steps the optimizer itself).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..audit import Audit

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback


def _training_loss(output: Any) -> torch.Tensor:
    """The loss tensor a ``training_step`` returned (a tensor, or a mapping with "loss")."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise TypeError(f"training_step returned {type(output).__name__}, not a loss tensor or a dict with 'loss'; "
                    "pass AuditCallback(loss_fn=lambda module, batch: ...) instead")


class _Silenced:
    """Shadow ``module.log`` and ``module.log_dict`` with no-ops for the duration of a block."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.__dict__["log"] = self.module.__dict__["log_dict"] = lambda *args, **kwargs: None

    def __exit__(self, *exc: Any) -> None:
        self.module.__dict__.pop("log", None)
        self.module.__dict__.pop("log_dict", None)


class AuditCallback(Callback):
    """Audit every (or every ``every``-th) optimizer step of ``Trainer.fit``; ``.audit`` holds the records."""

    def __init__(self, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 optimizer: int = 0, **audit_options: Any) -> None:
        super().__init__()
        self.loss_fn, self.optimizer_index, self.audit_options = loss_fn, optimizer, audit_options
        self.audit: Audit | None = None
        self._watch: Any = None
        self._batch_idx = 0

    def _training_step_loss(self, module: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``training_step`` as a ``loss_fn``, with logging silenced (re-evaluations must not log)."""
        with _Silenced(module):
            return _training_loss(module.training_step(batch, self._batch_idx))

    def on_train_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Build the audit on the module and the Trainer's optimizer (refusing what it cannot audit)."""
        if getattr(trainer, "accumulate_grad_batches", 1) != 1:
            raise ValueError(f"AuditCallback cannot audit accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                             "one optimizer step spans several training batches; use accumulate_grad_batches=1, or "
                             "audit the loop in plain PyTorch with audit.watch(micro_batches, accumulate=N)")
        if self.loss_fn is None and not getattr(pl_module, "automatic_optimization", True):
            raise ValueError("with manual optimization training_step steps the optimizer itself, so the audit cannot "
                             "re-evaluate it as the loss; pass AuditCallback(loss_fn=lambda module, batch: ...)")
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"AuditCallback(optimizer={self.optimizer_index}) but the Trainer has "
                             f"{len(optimizers)} optimizer(s); pass an index below {len(optimizers)}")
        if self.audit is not None:  # a second fit() on the same callback: start a fresh run
            self.audit.close()
        self.audit = Audit(pl_module, optimizers[self.optimizer_index], self.loss_fn or self._training_step_loss,
                           **self.audit_options)

    def on_train_batch_start(self, trainer: Any, pl_module: torch.nn.Module, batch: Any, batch_idx: int) -> None:
        """Open ``audit.watch(batch)`` around the step Lightning is about to take."""
        self._close_watch()  # a batch skipped by on_train_batch_start returning -1 never reached its end hook
        if self.audit is None:
            return
        self._batch_idx = batch_idx
        self._watch = self.audit.watch(batch)
        self._watch.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: torch.nn.Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._close_watch()

    def on_train_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self._close_watch()
        if self.audit is not None:
            self.audit.close()

    def on_exception(self, trainer: Any, pl_module: torch.nn.Module, exception: BaseException) -> None:
        """Training failed: close the open step as failed and the audit (committed steps stay on disk)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.__exit__(type(exception), exception, exception.__traceback__)
        if self.audit is not None:
            self.audit.close()

    def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.__exit__(None, None, None)

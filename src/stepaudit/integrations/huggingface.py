"""Hugging Face: ``AuditMixin`` audits the optimizer steps of a ``transformers.Trainer`` subclass.

Mix it in front of any Trainer (``class AuditedTrainer(AuditMixin, Trainer)``; ``SFTTrainer`` and other
subclasses alike) — the way Hugging Face documents changing what a Trainer computes. A thin adapter onto
``Audit.watch``; hook order, per optimizer step:
  ``training_step`` (first call)  — build the ``Audit`` on the unwrapped model and the torch optimizer
                                    inside the Trainer's (Accelerate's) wrapper, counting steps from the
                                    Trainer's global step (a resumed run continues its count);
  ``training_step``               — open ``audit.watch(inputs)`` before the forward: the random state
                                    here is what the re-evaluation replays, so dropout masks match; the
                                    training loss it returns is the audit's ``loss_before``;
  ``optimizer.step()``            — the audit's step hooks: gradient, Δw, loss after, probes, record;
  ``on_step_end`` (a callback)    — close the watch;
  ``train()`` returns or raises   — close the audit (the run folder keeps every committed step).

The audited loss is ``self.compute_loss(model, inputs)`` — yours if you override it — on a copy of the
inputs, with the item count the Trainer normalises by (``num_items_in_batch``); or ``audit_loss_fn(model,
inputs)``: use it when ``compute_loss`` has side effects, such as metrics recorded there, which would run
again at each re-evaluation. ``gradient_accumulation_steps > 1`` is refused with the fix. With several
processes each rank writes its own folder (``<run>-rank<i>``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from ..audit import Audit


class _CloseStep(TrainerCallback):
    """Closes the audited step once the Trainer's optimizer step (and zero_grad) is done."""

    def __init__(self, trainer: "AuditMixin") -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._close_audit_watch()


class AuditMixin:
    """Mix into a ``transformers.Trainer`` subclass to audit every (or every N-th) optimizer step.

    ``audit_options``: any ``Audit(...)`` keyword (``run``, ``every``, ``probes``, ...); ``trainer.audit``
    holds the ``Audit`` once training has started.
    """

    def __init__(self, *args: Any, audit_options: dict | None = None,
                 audit_loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audit_options, self.audit_loss_fn = dict(audit_options or {}), audit_loss_fn
        self.audit: Audit | None = None
        self._audit_watch: Any = None
        self._audit_inputs: Any = None  # the step's own (prepared) inputs and the Trainer's item count for them
        self._audit_items: Any = None
        self.add_callback(_CloseStep(self))

    def _audited_loss(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """The Trainer's own ``compute_loss`` on a shallow copy (it may pop "labels" from what it is given), with
        the item count it normalises by (the Trainer's own for the step's batch; counted alike for any other)."""
        if inputs is self._audit_inputs:
            items = self._audit_items
        elif self.args.world_size == 1:  # a reference or next batch (data probes): count its items as the Trainer
            count = getattr(self, "_get_num_items_in_batch", None)  # would (across processes that count gathers:
            items = count([inputs], self.args.device) if count is not None else None  # never inside a probe)
        else:
            items = None
        if items is None:
            return self.compute_loss(model, dict(inputs))
        return self.compute_loss(model, dict(inputs), num_items_in_batch=items)

    def _build_audit(self, model: torch.nn.Module) -> Audit:
        """The Audit on the unwrapped model and the torch optimizer inside Accelerate's wrapper."""
        options = dict(self.audit_options)
        if self.args.world_size > 1 and options.get("run") is not None:
            options["run"] = Path(f"{options['run']}-rank{self.args.process_index}")  # ranks never share a folder
        options.setdefault("first_step", self.state.global_step)  # a resumed run continues its count
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        return Audit(self.accelerator.unwrap_model(model), optimizer, self.audit_loss_fn or self._audited_loss,
                     **options)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, then the audit closed — also when training raises."""
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"AuditMixin cannot audit gradient_accumulation_steps={self.args.gradient_accumulation_steps}: "
                             "one optimizer step spans several batches; use gradient_accumulation_steps=1, or audit "
                             "the loop in plain PyTorch with audit.watch(micro_batches, accumulate=N)")
        failure: BaseException | None = None
        try:
            return super().train(*args, **kwargs)
        except BaseException as error:
            failure = error
            raise
        finally:
            self._close_audit_watch(failure)
            if self.audit is not None:
                self.audit.close()

    def training_step(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Open ``audit.watch(inputs)`` around the Trainer's own training step, and hand it the training loss."""
        self._close_audit_watch()
        if self.audit is None or self.audit._closed:
            self.audit = self._build_audit(model)
        self._audit_inputs = self._prepare_inputs(inputs)
        self._audit_items = args[0] if args else kwargs.get("num_items_in_batch")
        self._audit_watch = self.audit.watch(self._audit_inputs)
        handle = self._audit_watch.__enter__()
        loss = super().training_step(model, inputs, *args, **kwargs)
        handle.loss = loss  # loss_before without a replayed forward (gradient accumulation is refused: unscaled)
        return loss

    def _close_audit_watch(self, failure: BaseException | None = None) -> None:
        watch, self._audit_watch = self._audit_watch, None
        if watch is None:
            return
        if failure is None:
            watch.__exit__(None, None, None)
        else:
            watch.__exit__(type(failure), failure, failure.__traceback__)

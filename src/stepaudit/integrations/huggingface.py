"""Hugging Face: ``AuditMixin`` audits the optimizer steps of a ``transformers.Trainer`` subclass.

Mix it in front of any Trainer (``class AuditedTrainer(AuditMixin, Trainer)``; ``SFTTrainer`` and other
subclasses alike) — the way Hugging Face documents changing what a Trainer computes. A thin adapter onto
``Audit.watch``; hook order, per optimizer step:
  ``get_batch_samples``   — the Trainer fetches the step's micro-batches (one, or ``gradient_accumulation_steps``):
                            keep them (prepared as the Trainer will);
  ``training_step`` ×n    — the first builds the ``Audit`` on first use (unwrapped model, the torch optimizer
                            inside Accelerate's wrapper, steps counted from the Trainer's global step so that a
                            resumed run continues its count) and opens ``audit.watch(micro_batches, accumulate=n)``:
                            the random state here, after a resume's RNG reload, is what the re-evaluation
                            replays, so dropout masks match; then the Trainer's own step, whose returned
                            losses add up to the audit's ``loss_before``;
  ``optimizer.step()``    — the audit's step hooks: gradient, Δw, loss after, probes, record;
  ``on_step_end``         — (a callback) close the watch;
  ``train()`` returns or raises — close the audit (the run folder keeps every committed step).

The audited loss is ``self.compute_loss(model, inputs)`` — yours if you override it — on a copy of the
inputs, scaled so that the mean over the micro-batches is the Trainer's objective (with the item count it
normalises by, ``num_items_in_batch``: Σ token losses / all tokens of the step); or ``audit_loss_fn(model,
inputs)`` — the mean of it over the micro-batches is then the audited objective — which you want when
``compute_loss`` has side effects, such as metrics recorded there, which would run again at each
re-evaluation. One run folder per training run, also under ``torchrun``: rank 0 writes ``run`` itself (the global
records), rank r > 0 writes ``run/rank<r>`` (``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from ..audit import Audit
from .adapter import Adapter


class _CloseStep(TrainerCallback):
    """Closes the audited step once the Trainer's optimizer step (and zero_grad) is done."""

    def __init__(self, trainer: AuditMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._close_audit_step()


class AuditMixin:
    """Mix into a ``transformers.Trainer`` subclass to audit every (or every N-th) optimizer step.

    ``audit_options``: any ``Audit(...)`` keyword (``run``, ``every``, ``probes``, ...); ``trainer.audit``
    holds the ``Audit`` once training has started.
    """

    def __init__(
        self,
        *args: Any,
        audit_options: dict | None = None,
        audit_loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.audit_options, self.audit_loss_fn = dict(audit_options or {}), audit_loss_fn
        self.audit_adapter = Adapter(self.audit_options)  # the audit, its run folder, the optimizer step held open
        self._audit_batches: list = []  # the step's (prepared) micro-batches, the Trainer's item count for them,
        self._audit_items: Any = None  # and whether it normalised the loss by that count over all of them
        self._audit_scaled = False
        self._audit_opening = False  # micro-batches fetched, watch not yet open (it opens at their first forward)
        self.add_callback(_CloseStep(self))

    @property
    def audit(self) -> Audit | None:
        """The audit of the last (or running) ``train()``; None before the first."""
        return self.audit_adapter.audit

    def _audited_loss(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """The Trainer's own ``compute_loss`` on a shallow copy (it may pop "labels" from what it is given).

        The audit's objective is the mean of this over the step's n micro-batches; the Trainer's is Σᵢ lossᵢ/n,
        or — when it treats the loss as already scaled for accumulation (it normalises by the item count N of
        all micro-batches) — Σᵢ lossᵢ. Then micro-batch i is n·compute_loss(i, N). Any other batch (the data
        probes' reference or next batch) is its own mean.
        """
        if self._is_step_batch(inputs):
            items = self._audit_items
            scale = len(self._audit_batches) if self._audit_scaled else 1
        else:
            scale = 1
            count = getattr(self, "_get_num_items_in_batch", None)  # counted as the Trainer would; across processes
            single = self.args.world_size == 1  # that count gathers, which a probe must never do
            items = count([inputs], self.args.device) if count is not None and single else None
        loss = (
            self.compute_loss(model, dict(inputs))
            if items is None
            else self.compute_loss(model, dict(inputs), num_items_in_batch=items)
        )
        return loss if scale == 1 else scale * loss

    def _is_step_batch(self, inputs: Any) -> bool:
        """Whether ``inputs`` is one of the step's micro-batches: the object itself, or a copy the audit made of it
        (the float64 twin casts floating tensors; other values stay the same objects)."""
        for batch in self._audit_batches:
            if inputs is batch:
                return True
            if (
                isinstance(inputs, dict)
                and isinstance(batch, dict)
                and inputs.keys() == batch.keys()
                and all(
                    a is b
                    or (
                        isinstance(a, torch.Tensor)
                        and isinstance(b, torch.Tensor)
                        and a.shape == b.shape
                        and torch.equal(a.to(b.dtype), b)
                    )
                    for a, b in ((inputs[k], batch[k]) for k in batch)
                )
            ):
                return True
        return False

    def _loss_is_scaled(self, items: Any) -> bool:
        """Whether the Trainer normalises micro-batch losses by the step's item count (its own rule)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and items is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _build_audit(self, model: torch.nn.Module) -> Audit:
        """The Audit on the unwrapped model and the torch optimizer inside Accelerate's wrapper."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        return self.audit_adapter.start(
            self.accelerator.unwrap_model(model),
            optimizer,
            self.audit_loss_fn or self._audited_loss,
            first_step=self.state.global_step,  # a resumed run continues its count
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, then the audit closed — also when training raises."""
        failure: BaseException | None = None
        try:
            return super().train(*args, **kwargs)
        except BaseException as error:
            failure = error
            raise
        finally:
            self._close_audit_step(failure)
            self.audit_adapter.finish()

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer fetches all micro-batches of the next optimizer step here: keep them for its watch."""
        batch_samples, items = super().get_batch_samples(*args, **kwargs)
        self._close_audit_step()
        if batch_samples:
            self._audit_batches = [self._prepare_inputs(batch) for batch in batch_samples]
            self._audit_items, self._audit_scaled = items, self._loss_is_scaled(items)
            self._audit_opening = True
        return batch_samples, items

    def training_step(self, model: torch.nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's own training step; the first of a step opens ``audit.watch(micro_batches, accumulate=n)``
        (here, not when the batches are fetched: a resumed run reloads its RNG state in between), and the losses
        it returns add up to the audit's ``loss_before``."""
        if self._audit_opening:
            self._audit_opening = False
            if self.audit_adapter.current is None:  # the first step of this train()
                self._build_audit(model)
            n = len(self._audit_batches)
            self.audit_adapter.open(self._audit_batches if n > 1 else self._audit_batches[0], n)
        loss = super().training_step(model, inputs, *args, **kwargs)
        handle = self.audit_adapter.handle
        if handle is not None:  # each returned loss is already divided (or normalised) for accumulation
            handle.loss = loss if handle.loss is None else handle.loss + loss
        return loss

    def _close_audit_step(self, failure: BaseException | None = None) -> None:
        self._audit_batches, self._audit_opening = [], False  # the step is over: hold no copy of its inputs
        self.audit_adapter.close(failure)

"""Lightning: ``AuditCallback`` audits the optimizer steps of ``Trainer.fit`` without touching your module.

A thin adapter onto ``Audit.watch``. Hook order, per training batch:
  ``on_train_start``        — build the ``Audit`` on the LightningModule and the Trainer's (first) optimizer,
                              counting steps from ``trainer.global_step`` (a resumed fit continues its count;
                              with n optimizers, from global_step // n);
  ``on_train_batch_start``  — open ``audit.watch(batch)``: the random state here is what the re-evaluation
                              replays, so dropout masks match;
  (Lightning runs ``optimizer.step(closure)``: the closure — ``training_step`` and ``backward`` — runs
  inside the step, where the audit's step hooks capture the gradient, Δw and the loss after;)
  ``on_train_batch_end``    — close the watch (a batch your ``on_train_batch_start`` skipped by returning
                              −1 is abandoned at the next hook instead, and not counted as a skipped step);
  ``on_train_end`` / ``on_exception`` — close the audit (the run folder keeps every committed step).

The loss the audit re-evaluates is ``loss_fn(module, batch)`` if given, else your ``training_step`` (its
``Tensor`` or ``{"loss": ...}``), called with ``self.log``/``self.log_dict`` silenced and the state of
every torchmetrics ``Metric`` registered in the module put back afterwards, so that the re-evaluations leave your
logged metrics alone (any other side effect of ``training_step`` would run again: pass ``loss_fn`` then).
Either runs inside the Trainer's precision context (``precision="bf16-mixed"``: autocast, as in training).
Refused with the fix: gradient accumulation (``accumulate_grad_batches > 1`` or a
``GradientAccumulationScheduler``; audit such loops with ``Audit.watch(..., accumulate=N)`` in plain
PyTorch), manual optimization without a ``loss_fn`` (its ``training_step`` steps the optimizer itself) and
``strategy="fsdp"`` (FSDP1, refused as by ``Audit``: use ``strategy="ddp"``, or ``ModelParallelStrategy`` with
``fully_shard`` in ``configure_model``, which is FSDP2 and audited as such).
One run folder per fit, also with several processes (``strategy="ddp"``, ``ModelParallelStrategy``): rank 0
writes ``run`` itself (the global records), rank r > 0 writes ``run/rank<r>`` (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..audit import Audit
from ..distributed import refuse_fsdp1
from .adapter import Adapter

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback
    from pytorch_lightning.callbacks import GradientAccumulationScheduler
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature


def _training_loss(output: Any) -> torch.Tensor:
    """The loss tensor a ``training_step`` returned (a tensor, or a mapping with "loss")."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise TypeError(
        f"training_step returned {type(output).__name__}, not a loss tensor or a dict with 'loss'; "
        "pass AuditCallback(loss_fn=lambda module, batch: ...) instead"
    )


@contextlib.contextmanager
def _silenced(module: torch.nn.Module) -> Iterator[None]:
    """Shadow ``module.log`` and ``module.log_dict`` with no-ops for the duration of the block."""
    module.__dict__["log"] = module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


@contextlib.contextmanager
def _metrics_kept(module: torch.nn.Module) -> Iterator[None]:
    """Put back the state of every torchmetrics ``Metric`` registered in ``module`` after the block (same objects,
    old values); each state on its own, so one that cannot be written back does not leave the others updated."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - Lightning installs torchmetrics
        yield
        return
    saved = []
    for metric in (m for m in module.modules() if isinstance(m, Metric)):
        for name in [*metric._defaults, "_update_count", "_computed", "_forward_cache"]:
            value = getattr(metric, name)
            if isinstance(value, torch.Tensor):
                saved.append((metric, name, value, value.detach().clone(), value._version))
            else:
                saved.append((metric, name, value, list(value) if isinstance(value, list) else value, None))
    try:
        yield
    finally:
        for metric, name, value, copy, version in saved:
            try:
                if isinstance(value, torch.Tensor) and value._version != version:
                    with torch.no_grad():
                        value.copy_(copy)  # states are updated in place (``self.total += n``)
                elif isinstance(value, list):
                    value[:] = copy  # list states grow by append
                setattr(metric, name, value)
            except Exception:  # e.g. inside a torch.func transform (the HVP): the old value in a new object
                setattr(metric, name, copy)


class AuditCallback(Callback):
    """Audit every (or every ``every``-th) optimizer step of ``Trainer.fit``; ``.audit`` holds the records."""

    def __init__(
        self,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        optimizer: int = 0,
        **audit_options: Any,
    ) -> None:
        super().__init__()
        self.loss_fn, self.optimizer_index, self.audit_options = loss_fn, optimizer, audit_options
        self.adapter = Adapter(audit_options)  # the audit, its run folder, the step held from batch start to end
        self._trainer: Any = None
        self._batch_idx = 0
        self._passes_batch_idx = True  # whether training_step takes batch_idx (read once per fit)
        self._warned_accumulation = False

    @property
    def audit(self) -> Audit | None:
        """The audit of the last (or running) fit; None before the first."""
        return self.adapter.audit

    def _audited_loss(self, module: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``loss_fn`` or ``training_step`` (logging silenced, metrics kept), in the Trainer's precision context."""
        with self._trainer.precision_plugin.train_step_context():
            if self.loss_fn is not None:
                return self.loss_fn(module, batch)
            with _silenced(module), _metrics_kept(module):
                if self._passes_batch_idx:
                    return _training_loss(module.training_step(batch, self._batch_idx))
                return _training_loss(module.training_step(batch))

    def on_train_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Build the audit on the module and the Trainer's optimizer (refusing what it cannot audit)."""
        accumulation = getattr(trainer, "accumulate_grad_batches", 1)
        scheduled = any(
            isinstance(c, GradientAccumulationScheduler) and c.going_to_accumulate_grad_batches()
            for c in trainer.callbacks
        )
        if accumulation != 1 or scheduled:
            raise ValueError(
                "AuditCallback cannot audit gradient accumulation (accumulate_grad_batches="
                f"{accumulation}{', or a GradientAccumulationScheduler' if scheduled else ''}): one "
                "optimizer step spans several training batches; use accumulate_grad_batches=1, or "
                "audit the loop in plain PyTorch with audit.watch(micro_batches, accumulate=N)"
            )
        if self.loss_fn is None and not getattr(pl_module, "automatic_optimization", True):
            raise ValueError(
                "with manual optimization training_step steps the optimizer itself, so the audit cannot "
                "re-evaluate it as the loss; pass AuditCallback(loss_fn=lambda module, batch: ...)"
            )
        wrapped = getattr(trainer, "model", None)  # strategy="fsdp" wraps the module in FSDP1: refused, as by Audit
        if isinstance(wrapped, torch.nn.Module):
            refuse_fsdp1(wrapped)
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(
                f"AuditCallback(optimizer={self.optimizer_index}) but the Trainer has "
                f"{len(optimizers)} optimizer(s); pass an index below {len(optimizers)}"
            )
        # Lightning's global_step counts the steps of every optimizer: with several, assume each steps once
        # per batch (a GAN) and say so, since a resumed fit cannot tell how many this one took.
        first_step = trainer.global_step // len(optimizers)
        if "first_step" not in self.audit_options and len(optimizers) > 1 and trainer.global_step > 0:
            warnings.warn(
                f"AuditCallback numbers steps from global_step {trainer.global_step} // "
                f"{len(optimizers)} optimizers = {first_step}; pass first_step=... if "
                "the audited optimizer took another number of steps",
                stacklevel=2,
            )
        self._trainer = trainer
        self._passes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        self.adapter.start(  # a second fit() on the same callback closes the first's audit: a fresh run
            pl_module,
            optimizers[self.optimizer_index],
            self._audited_loss,
            first_step=first_step,
            rank=getattr(trainer, "global_rank", 0),
            world_size=getattr(trainer, "world_size", 1),
        )

    def on_train_batch_start(self, trainer: Any, pl_module: torch.nn.Module, batch: Any, batch_idx: int) -> None:
        """Open ``audit.begin(batch)`` before the step Lightning is about to take."""
        self.adapter.abandon()  # the batch before was skipped (on_train_batch_start returned -1): no step taken
        if self.adapter.current is None:
            return
        if getattr(trainer, "accumulate_grad_batches", 1) != 1:  # changed during the fit: stop auditing, say so once
            if not self._warned_accumulation:
                self._warned_accumulation = True
                warnings.warn(
                    f"accumulate_grad_batches became {trainer.accumulate_grad_batches} during the fit; "
                    "AuditCallback stops auditing (one step now spans several batches)",
                    stacklevel=2,
                )
            return
        self._batch_idx = batch_idx
        self.adapter.open(batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: torch.nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.adapter.close()

    def on_train_epoch_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self.adapter.abandon()  # a batch that never reached on_train_batch_end: Lightning skipped it, no step taken

    def on_train_end(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self.adapter.abandon()
        self.adapter.finish()

    def on_exception(self, trainer: Any, pl_module: torch.nn.Module, exception: BaseException) -> None:
        """Training failed: close the open step as failed and the audit (committed steps stay on disk)."""
        self.adapter.finish(exception)

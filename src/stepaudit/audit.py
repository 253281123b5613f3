"""Active capture: ``Audit`` sees every optimizer step through documented hook points.

Hook order for one audited step (nothing wraps or subclasses the optimizer):
  0. ``step()``/``watch()`` opens — the step is due: the random state here is the one the first
                                     (micro-)batch's re-evaluation replays; attach (1), start the due
                                     probes' captures (``probes.register_capture``: observe-only hooks);
  1. ``model`` forward hook       — autocast state of the training forward; with accumulation, the
                                     RNG state after each forward and, through a gradient hook on its
                                     output, when the backward reaches it (where the next micro-batch's
                                     loss_fn starts; ``replay.py``);
  2. optimizer step pre-hook       — stop the captures; weights before, the gradient the optimizer
                                     received (or, for closure optimizers such as LBFGS, a wrapped
                                     closure that captures the first evaluation), the loss before;
  3. optimizer step post-hook      — Δw, re-evaluation at the new weights, probes, record, store;
  4. the block closes              — detach (1), stop any capture still running.
Unaudited steps (``every``) pay only the two optimizer hook calls. The same four points are public
(``stepapi.py``): ``begin_step``/``end_step`` are 0 and 4, ``before_update``/``after_update`` are 2 and 3 for
optimizers that are not ``torch.optim.Optimizer`` (fastai's; read through ``optimizers.py``, never hooked).

Size (over 400 lines): the step state machine, its hooks and the record assembly share the pending step's
private state; the split by job (capture, assembly, fault policy, writing) is issue 18 point 3, not yet done.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import probes as probe_registry
from .arguments import batch_size, check_replayable, index_parameters, validate
from .context import Part, StepContext, check_scalar_loss, group_lr
from .distributed import (
    collective_device,
    global_objective,
    rank_folder,
    unwrap,
    unwrap_optimizer,
    world,
    wrapper_state_kept,
)
from .flat import FlatBuffers, is_sharded
from .losses import LossEvaluator
from .meta import describe
from .noise_ranks import CAPTURE, LocalGradNorms, noise_fields, rank_values
from .notebook import Diagnoses, NotebookMixin
from .optimizers import reader_for
from .probes.base import BUFFERS
from .probes.step import step_fields
from .records import layer_rows, summarize
from .replay import MAX_EVENTS_PER_BATCH, Replay
from .state import AutocastState, RngState, _cuda_devices
from .stepapi import StepAPI
from .store import RunStore, new_run_dir


class AuditError(RuntimeError):
    """Raised in ``strict=True`` mode when auditing a step fails (training would otherwise go on)."""


@dataclass
class StepWatch:
    """Handle yielded by ``Audit.watch``: set ``loss`` before ``optimizer.step()`` to save a forward."""

    loss: Any = None
    record: dict | None = None


@dataclass(slots=True)
class _Pending:
    """State of the step in progress inside ``step()``/``watch()``."""

    batches: list
    watch: StepWatch
    due: bool
    entry: RngState | None = None  # random state where the step began (step(): where loss_fn is called)
    events: list = field(default_factory=list)  # ("forward" | "mark", random state), in order (accumulation)
    handles: list = field(default_factory=list)  # gradient hooks on model outputs, removed when the step closes
    skipped: bool = False  # a fused optimizer was told by GradScaler to skip this step (inf/NaN gradients)
    autocast: AutocastState | None = None
    ctx: StepContext | None = None
    loss_before: float | None = None
    stepped: bool = False
    updated: bool = False  # after_update() was called (public step API)
    error: BaseException | None = None
    captures: dict = field(default_factory=dict)  # probe name → capture watching the training pass


class Audit(StepAPI, NotebookMixin):
    """Audit every (or every N-th) optimizer step of a training loop and record what it did.

    ``loss_fn(model, batch) -> scalar tensor`` is the training loss; the audit re-evaluates it on
    the same batch at the new weights. Use ``audit.step(batch)`` for the whole step, or
    ``with audit.watch(batch): ...`` around your own step code, or the public step API (``stepapi.py``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        run: str | os.PathLike | None = None,
        every: int = 1,
        strict: bool = False,
        precision: str | None = None,
        probes: Mapping[str, int] | None = None,
        *,
        name: str | None = None,
        reference: Any = None,
        reference_every: int = 1,
        reference_mode: str = "eval",
        probe_options: Mapping[str, dict] | None = None,
        tensorboard: str | os.PathLike | None = None,
        first_step: int = 0,
    ) -> None:
        # audit.step() trains through what the user passed (DDP's forward syncs gradients; Accelerate's step()
        # skips accumulation steps); hooks, reading and re-evaluations use what is inside
        self._trained_model, self._stepped_optimizer = model, optimizer
        optimizer = unwrap_optimizer(optimizer)  # Accelerate's wrapper: its step() calls this one's
        self._reader = reader_for(optimizer)  # what the audit reads: the optimizer, or its mirror under torch's names
        model, self._wrapper = unwrap(model)  # DDP: hooks and re-evaluations on the module it wraps
        self._rank, self._world_size = world()
        self._sharded = any(is_sharded(p) for p in model.parameters())  # FSDP2: the shard sums are all-reduced
        if run is not None:
            run = rank_folder(run, self._rank, self._world_size)  # ranks never share a store
        validate(model, self._reader.reads, loss_fn, every, precision, reference_mode, first_step)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.every, self.strict, self.precision = every, strict, precision
        self.options = {
            "reference": reference,
            "reference_every": reference_every,
            "reference_mode": reference_mode,
            "precision": precision,
        }
        probe_registry.check_inputs(self.options)  # e.g. reference data that would be empty on a second pass
        if isinstance(probes, (str, list, tuple, set, frozenset)) and any(isinstance(n, str) for n in probes):
            probe_registry.validate(probes)  # names without their schedule: refused with the dict to write
        probes = dict(probes or {})
        for implied, every_n in probe_registry.implied(self.options).items():  # reference= turns on "reference"
            probes.setdefault(implied, every_n)
        self.probes = probe_registry.validate(probes)
        self._configure_probes(dict(probe_options or {}))
        self.memory: dict = {}  # the step context's own flags across steps (HVP method, grad mode)
        self.probe_states: dict = {}  # each probe's state object, by state key (reset with the parameters)
        self._index_parameters(stacklevel=3)
        self.run = Path(run) if run is not None else new_run_dir(name=name)
        meta = describe(model, self._reader.reads, every=every, probes=self.probes, precision=precision)
        if not self._reader.hooked:
            meta.update(optimizer=self._reader.name, optimizer_mapping=self._reader.mapping)
        self.store = RunStore(self.run, meta, name=name)
        self.records: list[dict] = []
        self.skipped_steps = 0
        self._step_count = self._first_step = first_step  # index of the next optimizer step (resumed runs start later)
        self._pending: _Pending | None = None
        self.replay = Replay()  # which random state each re-evaluation replays
        self._warned_outside = False
        self._closed = False
        self._sinks: list[Callable[[dict], None]] = []
        if tensorboard is not None:
            from .export import TensorBoardSink

            self._sinks.append(TensorBoardSink(tensorboard))
        self._install_hooks()

    # -- construction ---------------------------------------------------------------------------
    def _configure_probes(self, probe_options: dict) -> None:
        """Per-probe settings ``{key: {...}}``, parsed into each probe's options type (refused with the fix)."""
        probe_registry.settle_options(self.options, probe_options)
        self._collective_probes: set[str] = set()  # probes with collectives of their own (after _globalize)
        for name in self.probes:
            probe = probe_registry.get(name)
            if probe.collective is not None and probe.collective(probe.read_options(self.options)):
                self._collective_probes.add(name)

    def _index_parameters(self, stacklevel: int) -> None:
        """Index the optimizer's parameters (again after ``add_param_group``); reset what depends on them."""
        index = index_parameters(self.model, self._reader.reads, stacklevel=stacklevel)
        self.memory.clear()  # state laid out by the old parameter list (warm starts, layer maps)
        self.probe_states.clear()
        self.names, self.params, self.modules, self.groups = index.names, index.params, index.modules, index.groups
        self._indexed = (len(self._reader.reads.param_groups), len(self.params))
        self._devices = _cuda_devices(self.model)
        self._device = self.params[0].device  # where the model was when _devices was read
        # float64 sums for float64 models and precision="float64"; the working dtype's BLAS otherwise
        self._exact_sums = self.precision == "float64" or any(p.dtype == torch.float64 for p in self.params)
        self.losses = LossEvaluator(self.model, self.loss_fn, self.params, self.precision)
        self._flat = None

    def _install_hooks(self) -> None:
        me = weakref.ref(self)  # hooks must not keep the audit alive, nor be deep-copied with it

        def forward_end(module, args, output):
            audit = me()
            if audit is not None and module is audit.model:
                audit._on_forward_end(output)

        def step_pre(optimizer, args, kwargs):
            audit = me()
            return None if audit is None else audit._on_step_pre(args, kwargs)

        def step_post(optimizer, args, kwargs):
            audit = me()
            if audit is not None:
                audit._on_step_post()

        # The forward hook is attached only while an audited step is pending (``_begin``/``_end``):
        # any forward hook sends every forward of the model through nn.Module's slower hook path.
        self._forward_end = forward_end
        self._forward_handle = None
        self._handles = (
            [
                self.optimizer.register_step_pre_hook(step_pre),
                self.optimizer.register_step_post_hook(step_post),
            ]
            if self._reader.hooked
            else []
        )  # other optimizers call before_update()/after_update() (stepapi.py)
        # an audit that is dropped without close() leaves no hooks on the optimizer
        self._finalizer = weakref.finalize(self, _cleanup, list(self._handles), self.replay)

    # -- public API ---------------------------------------------------------------------------------
    def due(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one) is audited."""
        step = self._step_count if step is None else step
        return step % self.every == 0 or self._probes_due(step)

    def step(self, batch: Any) -> torch.Tensor:
        """zero_grad, forward, backward, optimizer.step and the audit; returns the training loss."""
        check_replayable(batch)
        losses: list[torch.Tensor] = []

        trained, stepped = self._trained_model, self._stepped_optimizer

        def closure():
            stepped.zero_grad()
            loss = check_scalar_loss(self.loss_fn(trained, batch))
            loss.backward()
            losses.append(loss.detach())
            return loss

        pending = self._begin([batch])
        try:
            if self._takes_closure():
                stepped.step(closure)
            elif self._reader.hooked:
                closure()
                pending.watch.loss = losses[0]
                stepped.step()
            else:  # not a torch optimizer: no step hooks, so the public step API marks the update
                closure()
                self.before_update(losses[0])
                stepped.step()
                self.after_update()
        except BaseException:
            self._end(stacklevel=3, failed=True)
            raise
        self._end(stacklevel=3)
        return losses[0]

    @contextlib.contextmanager
    def watch(self, batch: Any, *, accumulate: int = 1) -> Iterator[StepWatch]:
        """Audit the optimizer step taken inside the block, on ``batch``.

        Gradient accumulation: pass the micro-batches as a list and ``accumulate=len(list)``; the
        audited objective is then the mean of ``loss_fn`` over them (divide each micro-batch loss
        by ``accumulate`` before ``backward()``, as usual), each replayed with its own dropout masks.
        """
        handle = self.begin_step(batch, accumulate=accumulate)
        try:
            yield handle
        except BaseException:
            self._end(stacklevel=4, failed=True)
            raise
        self._end(stacklevel=4)

    def _begin(self, batches: list) -> _Pending:
        """Open the step: decide whether it is audited; if so, save the random state and attach the forward hook."""
        if self._pending is not None:
            raise RuntimeError("audit.watch() blocks cannot be nested; finish the current step first")
        step = self._step_count
        due = not self._closed and self.due(step)
        self._pending = pending = _Pending(batches, StepWatch(), due)
        if due:
            if self._flat is not None:
                self._flat.reduced = False  # this step's shard sums are not all-reduced yet (see _globalize)
            try:
                self._refresh_index(pending)
                pending.entry = self.replay.open(self._devices)
                self._forward_handle = self.model.register_forward_hook(self._forward_end)
                if self._world_size > 1 and self._wrapper is not None:  # DDP: g_r before its all-reduce
                    pending.captures[CAPTURE] = LocalGradNorms(self.params)
                if self.probes:
                    self._start_captures(pending, step)
            except BaseException:  # strict mode: leave no hook and no open step behind
                self._end(stacklevel=3, failed=True)
                raise
        return pending

    def _refresh_index(self, pending: _Pending) -> None:
        """Re-index after ``optimizer.add_param_group`` (progressive unfreezing) or a move to another device."""
        groups = self._reader.reads.param_groups
        if (len(groups), sum(len(g["params"]) for g in groups)) != self._indexed:
            try:
                self._index_parameters(stacklevel=5)
            except ValueError as error:  # e.g. a group holding a parameter that is not in the model
                if self.strict:
                    raise AuditError(f"auditing step {self._step_count}: {error}") from error
                pending.error = error  # audited with the old index; the record says why it is an error
        elif self.params[0].device != self._device:  # model.to("cuda") after the Audit was built
            self._devices, self._device = _cuda_devices(self.model), self.params[0].device

    def _start_captures(self, pending: _Pending, step: int) -> None:
        """Let due probes watch the training forward/backward (e.g. noise: layer inputs and output gradients)."""
        for name, every in self.probes.items():
            start = probe_registry.capture_for(name) if step % every == 0 else None
            if start is None:
                continue
            try:
                capture = start(self.model, self.names, self.params, self.options)
            except Exception as error:  # the probe replays the pass itself instead
                if self.strict:
                    raise AuditError(f"probe {name!r} could not watch step {step}: {error}") from error
                continue
            if capture is not None:
                pending.captures[name] = capture

    @staticmethod
    def _stop_captures(pending: _Pending) -> None:
        for capture in pending.captures.values():
            try:
                capture.stop()
            except Exception:  # removing hooks; nothing a training loop should hear about
                pass

    def _end(self, stacklevel: int, failed: bool = False) -> None:
        """Close the step: detach the forward hook, output hooks and captures; count a step that was due but
        never taken; release the flat buffers if the next step is not audited.

        ``failed``: the block raised; the exception says what happened, so no warning is added.
        """
        pending, self._pending = self._pending, None
        for handle in pending.handles:
            handle.remove()
        try:
            self._stop_captures(pending)
        finally:
            if self._forward_handle is not None:
                self._forward_handle.remove()
                self._forward_handle = None
        if pending.due and not self._closed:
            self.replay.check(pending.entry)  # a step that was not audited still tells
        if pending.due and self._flat is not None and not self.due():
            self._flat.release()  # sparse auditing holds no copy of the model between audited steps
        if pending.due and not pending.stepped and not failed:
            self.skipped_steps += 1  # e.g. GradScaler skipped a step with inf/NaN gradients
            warnings.warn(
                "no optimizer step happened inside audit.watch() (GradScaler skipped it, or "
                "step() was not called); nothing was audited",
                stacklevel=stacklevel,
            )

    @property
    def last(self) -> dict | None:
        """The newest record, or None before the first audited step."""
        return self.records[-1] if self.records else None

    @property
    def _steps_seen(self) -> int:
        """Optimizer steps this audit saw (a resumed run counts from ``first_step``)."""
        return self._step_count - self._first_step

    def summary(self) -> dict:
        """Per-run shares and medians (decrease/increase/flat, alpha, delta/first_order, hurt next/reference, …)."""
        return {
            **summarize(self.records, skipped_steps=self.skipped_steps, steps_seen=self._steps_seen),
            **probe_registry.summarize(self.records),
        }

    def diagnose(self) -> list[dict]:
        """The doctor's diagnoses for this run's records so far (most likely root cause first)."""
        from .doctor import diagnose

        return Diagnoses(diagnose(self.records, meta=self.store_meta()))

    def store_meta(self) -> dict:
        """The run metadata as written to the store."""
        from .store import read_meta

        return read_meta(self.run)

    def close(self) -> None:
        """Remove the hooks, write the summary, close the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()  # the optimizer hooks, and this audit's count as a host-RNG tracker
        if self._forward_handle is not None:
            self._forward_handle.remove()
        self._forward_handle = None
        try:
            self.store.update_meta(summary=self.summary(), steps_seen=self._steps_seen)
        finally:
            self.store.close()
            for sink in self._sinks:
                getattr(sink, "close", lambda: None)()

    def __enter__(self) -> Audit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hooks ----------------------------------------------------------------------------------------
    def _takes_closure(self) -> bool:
        return isinstance(self.optimizer, torch.optim.LBFGS) or getattr(self.optimizer, "requires_closure", False)

    def _on_forward_end(self, output: Any) -> None:
        pending = self._pending
        if pending is None or not pending.due or pending.stepped or pending.entry is None:
            return
        if pending.autocast is None:
            pending.autocast = AutocastState.capture()
        count = len(pending.batches)
        if count > 1 and torch.is_grad_enabled() and len(pending.events) < MAX_EVENTS_PER_BATCH * count:
            try:
                self.replay.record_forward(
                    output, pending.events, pending.handles, self._devices, host=pending.entry.host is not None
                )
            except Exception as error:  # inside the user's forward: never break training
                if self.strict:
                    raise AuditError(f"auditing step {self._step_count}: marking a forward failed: {error}") from error
                pending.error = error

    def _on_step_pre(self, args, kwargs):
        pending = self._pending
        if pending is None:
            if not self._warned_outside:
                self._warned_outside = True
                warnings.warn(
                    "optimizer.step() was called outside audit.step()/audit.watch(); such steps are "
                    "counted but not audited",
                    stacklevel=4,
                )
            return None
        if not pending.due or pending.stepped:
            return None
        try:
            with wrapper_state_kept(self._wrapper):
                return self._prepare(pending, args, kwargs)
        except Exception as error:  # never break training
            if self.strict:
                raise AuditError(f"auditing step {self._step_count} failed before the step: {error}") from error
            pending.error = error
            return None

    def _prepare(self, pending: _Pending, args, kwargs):
        """Snapshot weights and gradient; for closure optimizers, wrap the closure to catch its first call."""
        self._stop_captures(pending)  # the training backward is done: nothing later is theirs to see
        rngs = self.replay.states(pending.entry, pending.events, len(pending.batches))
        ctx = StepContext(
            step=self._step_count,
            model=self.model,
            optimizer=self._reader.reads,
            loss_fn=self.loss_fn,
            parts=[Part(b, r) for b, r in zip(pending.batches, rngs)],
            autocast=pending.autocast or AutocastState.capture(),
            names=self.names,
            params=self.params,
            before=[],
            grads=[],
            memory=self.memory,
            states=self.probe_states,
        )
        flat = self._flat_buffers()
        flat.take_before()
        ctx.flat_before, ctx.before = flat.before, flat.before_views
        ctx.options = self.options
        ctx.captures = pending.captures
        pending.ctx = ctx
        # The hook receives the step's own arguments: args[0] is the optimizer itself.
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            ctx.grads = self._grads()
            if self._fused_amp_skip(ctx):
                pending.skipped = True
                return None
            pending.loss_before = self.losses.before(ctx, pending.watch.loss)
            return None

        def first_call_recorded():
            loss = closure()
            if not ctx.grads and pending.error is None:
                try:
                    ctx.grads = self._grads()
                    ctx.parts = [
                        Part(b, r)
                        for b, r in zip(
                            pending.batches, self.replay.states(pending.entry, pending.events, len(pending.batches))
                        )
                    ]
                    pending.loss_before = self.losses.before(ctx, loss)
                except Exception as error:  # never break training: the record says what failed
                    if self.strict:
                        raise AuditError(f"auditing step {ctx.step} failed in the closure: {error}") from error
                    pending.error = error
            return loss

        if len(args) > 1:
            return (args[0], first_call_recorded, *args[2:]), kwargs
        return args, {**kwargs, "closure": first_call_recorded}

    def _flat_buffers(self) -> FlatBuffers:
        """The audit's reusable flat copies (made at the first audited step)."""
        if self._flat is None:
            self._flat = FlatBuffers(self.params, exact=self._exact_sums)
        return self._flat

    def _grads(self) -> list[torch.Tensor]:
        """Views into one flat copy of the gradient the optimizer sees (zeros where .grad is None)."""
        flat = self._flat_buffers()
        flat.take_grad()
        self._pending.ctx.flat_grad = flat.grad
        return flat.grad_views

    def _fused_amp_skip(self, ctx: StepContext) -> bool:
        """GradScaler with a fused optimizer (``_step_supports_amp_scaling``): it calls ``step()`` with the
        gradient still scaled, ``optimizer.grad_scale`` and ``optimizer.found_inf`` set, and the fused
        kernel unscales (or skips the update). Unscale our copy the same way; say whether it skips."""
        found_inf = getattr(self.optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and float(found_inf) > 0:
            return True
        scale = getattr(self.optimizer, "grad_scale", None)
        if isinstance(scale, torch.Tensor):
            ctx.flat_grad.div_(scale.to(ctx.flat_grad))  # the views in ctx.grads share this storage
        return False

    def _probes_due(self, step: int) -> bool:
        return any(step % every == 0 for every in self.probes.values())

    def _due_probes(self, step: int) -> list[str]:
        return [name for name, every in self.probes.items() if step % every == 0]

    def _on_step_post(self) -> None:
        pending, index = self._pending, self._step_count
        if pending is not None and pending.skipped:
            return  # counted in _end like a step GradScaler did not take (the weights did not move)
        self._step_count += 1
        if pending is None or not pending.due or pending.stepped:
            return
        pending.stepped = True
        try:
            if pending.error is not None:
                raise pending.error
            with wrapper_state_kept(self._wrapper):
                record = self._audit(pending, index)
        except Exception as error:
            if self.strict:
                raise AuditError(f"auditing step {index} failed: {error}") from error
            record = {"step": index, "verdict": "error", "error": f"{type(error).__name__}: {error}"}
        if self._world_size > 1:  # every rank, every audited step, whatever happened above: lockstep
            self._globalize(record, pending.captures)
            if self._collective_probes and record.get("verdict") != "error":  # the same on every rank now
                self._run_probes(pending.ctx, record, index, collective=True)
        pending.watch.record = record
        self._commit(record)

    def _audit(self, pending: _Pending, index: int) -> dict:
        ctx = pending.ctx
        self.replay.check(pending.entry, [part.rng for part in ctx.parts])
        flat = self._flat_buffers()
        keep = probe_registry.needing(self._due_probes(index), BUFFERS)  # a due probe reads w or Δw after the step
        first_order, sums = flat.finish(keep_before=keep)
        if keep:
            ctx.flat_delta_w, ctx.delta_w = flat.delta_w, flat.delta_w_views
        else:  # the buffers were reused for Δw; nothing after this point reads them
            ctx.flat_before = ctx.before = None
        record = {"step": index, "lr": ctx.lr(), "batch_size": batch_size(pending.batches)}
        for i, group in enumerate(ctx.optimizer.param_groups[1:6], start=1):  # the report charts up to six groups
            record[f"lr_group_{i}"] = group_lr(group)
        layers, totals = layer_rows(self.names, self.modules, self.groups, sums, first_order=first_order)
        record.update(totals)
        loss_after, noise, record["noise_method"] = self.losses.after(ctx, pending.loss_before)
        record.update(
            step_fields(pending.loss_before, loss_after, totals["first_order"], noise, moved=totals["update_norm"] > 0)
        )
        if not math.isfinite(totals["first_order"]) and record["verdict"] != "nonfinite":
            record["verdict"] = "nonfinite"  # finite losses but NaN/Inf in the gradient or the update
        record["layers"] = layers
        ctx.record = record
        ctx.core_fields = frozenset(record)  # what the audit wrote: no probe may overwrite it
        self._run_probes(ctx, record, index)
        return record

    def _globalize(self, record: dict, captures: dict) -> None:
        """Make the own-batch fields describe the global objective (mean of the ranks' losses); keep ours as local_*."""
        flat = self._flat_buffers() if self._sharded else None
        if flat is not None and not flat.reduced:
            flat.stand_in()  # this rank failed before its shards' sums were all-reduced: join that collective
        failed = record.get("verdict") == "error"
        local_sq, global_sq = rank_values(captures, record)
        step = global_objective(
            record.get("loss_before"),
            record.get("loss_after"),
            record.get("rounding_noise"),
            failed,
            collective_device(),
            record.get("batch_size"),
            local_sq,
            global_sq,
        )
        record.update({f"local_{k}": record.get(k) for k in ("loss_before", "loss_after", "delta", "verdict")})
        record.update(world_size=self._world_size, rank=self._rank, global_batch=step.global_batch)
        if CAPTURE in captures:
            record.update(
                local_grad_norm=math.sqrt(local_sq) if local_sq >= 0 else math.nan,
                **noise_fields(step, self._world_size),
            )
        if step.failures:
            if not failed:
                record.update(verdict="error", error=f"the audit failed on {step.failures} of {self._world_size} ranks")
            return
        moved = record.get("update_norm", 0) > 0
        record.update(step_fields(step.loss_before, step.loss_after, record["first_order"], step.noise, moved=moved))
        if not math.isfinite(record["first_order"]) and record["verdict"] != "nonfinite":
            record["verdict"] = "nonfinite"

    def _run_probes(self, ctx: StepContext, record: dict, index: int, collective: bool = False) -> None:
        """The due probes; ``collective``: only those with collectives of their own (after ``_globalize``)."""
        sharded = self._sharded
        for name, every in self.probes.items():
            if index % every or (name in self._collective_probes) != collective:
                continue
            if sharded:  # the same on every rank: no probe issues a collective that a peer would not
                record.setdefault("probe_errors", {})[name] = (
                    "not measured: probes need whole parameters and FSDP2 shards them"
                )
                continue
            if self._world_size > 1 and not collective:
                record["probe_scope"] = "rank"  # this rank's batch, on the module DDP wraps: no collective
            probe = probe_registry.get(name)
            ctx.amendments = {}
            try:
                fields = probe(ctx)
            except Exception as error:
                if self.strict:
                    raise AuditError(f"probe {name!r} failed at step {index}: {error}") from error
                record.setdefault("probe_errors", {})[name] = f"{type(error).__name__}: {error}"
                continue
            accepted, problems = probe.check_fields(fields, ctx.core_fields)
            amended, refused = probe.check_amendments(ctx.amendments)
            record.update(accepted)
            if problems or refused:  # the contract the probe declared: the step is stored without those fields
                message = "; ".join(problems + [f"previous record: {p}" for p in refused])
                if self.strict:
                    raise AuditError(f"probe {name!r} at step {index}: {message}")
                record.setdefault("probe_errors", {})[name] = message
            if amended and self.records and self.records[-1].get("step") == index - 1:
                self._amend_previous(amended)

    def _amend_previous(self, fields: dict) -> None:
        """Fields of the previous record known only one step later (``ctx.amend_previous``): written and re-stored."""
        self.records[-1].update(fields)
        self.store.append(self.records[-1])
        for sink in self._sinks:
            sink({"step": self.records[-1]["step"], **fields})

    def _commit(self, record: dict) -> None:
        self.records.append(record)
        try:
            self.store.append(record)
            for sink in self._sinks:
                sink(record)
        except Exception as error:
            if self.strict:
                raise AuditError(f"writing step {record['step']} failed: {error}") from error
            warnings.warn(f"stepaudit could not write step {record['step']}: {error}", stacklevel=2)


def _cleanup(handles: list, replay: Replay) -> None:
    """Remove an audit's optimizer hooks and stop its host-RNG tracking (at close() or when it is dropped)."""
    for handle in handles:
        handle.remove()
    replay.close()

"""Capture: the hooks that see one optimizer step — gradient, weights before, Δw, loss before and after.

``StepCapture`` is the step state machine mixed into ``Audit`` (the hook order is written at the top of
``audit.py``): ``_begin`` opens a step (the random state the re-evaluations replay, the forward hook, the due
probes' captures), ``_on_forward_end`` notes autocast and the micro-batch boundaries, ``_on_step_pre`` takes
the weights and the gradient the optimizer received and the loss before, ``_on_step_post`` hands the step
to the record assembly (``assemble.py``) and the writer (``writing.py``), ``_end`` closes it. Every failure
goes through the one fault policy (``faults.py``). The state of the open step is a ``PendingStep``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import probes as probe_registry
from .closure import wrap_first_call
from .context import Part, StepContext
from .distributed import wrapper_state_kept
from .faults import AuditError, contained, quietly, raises_at_once
from .flat import FlatBuffers
from .nesting import hook_caller, running_below
from .noise_ranks import CAPTURE, LocalGradNorms
from .replay import MAX_EVENTS_PER_BATCH, Replay
from .state import AutocastState, RngState, cuda_devices


@dataclass
class StepWatch:
    """Handle yielded by ``Audit.watch``: set ``loss`` before ``optimizer.step()`` to save a forward."""

    loss: Any = None
    record: dict | None = None


@dataclass(slots=True)
class PendingStep:
    """State of the step in progress, from ``begin`` to ``end``."""

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

    def keep(self, error: BaseException) -> None:
        """A failure of the step: its record says what failed (``verdict="error"``); the latest one is named."""
        self.error = error

    def keep_first(self, error: BaseException) -> None:
        """A failure that does not replace one already kept (reading the optimizer after a failed step)."""
        self.error = self.error or error


class StepCapture:
    """The hooks of one audited step, mixed into ``Audit`` (which sets up what they read)."""

    def _init_capture(self) -> None:
        """No step open; install the optimizer's step hooks (torch optimizers only)."""
        self._pending: PendingStep | None = None
        self._warned_outside = False
        # the frame of torch's step wrapper whose hooks are the step under way (a nested call is not a step)
        self._outer_step = None
        # Borrowing the gradient (FlatBuffers.borrow_grad) is trusted only for torch's own optimizers, which
        # never write .grad in step(): a custom step() can, even unseen by the version counter (``.data``).
        step = getattr(type(self.optimizer), "step", None)  # fastai's OptimWrapper forwards it: none on the type
        self._builtin_step = (getattr(step, "__module__", None) or "").startswith("torch.optim.")
        self._flat: FlatBuffers | None = None
        self.replay = Replay()  # which random state each re-evaluation replays
        me = weakref.ref(self)  # hooks must not keep the audit alive, nor be deep-copied with it

        def forward_end(module, args, output):
            audit = me()
            if audit is not None and module is audit.model:
                audit._on_forward_end(output)

        def step_pre(optimizer, args, kwargs):
            audit = me()
            return None if audit is None else audit._on_step_pre(args, kwargs, hook_caller(1))

        def step_post(optimizer, args, kwargs):
            audit = me()
            if audit is not None:
                audit._on_step_post(hook_caller(1))

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

    @property
    def _strict_at_once(self) -> bool:
        """``strict`` raises where the failure happens only in one process (``faults.raises_at_once``)."""
        return raises_at_once(self.strict, self._world_size)

    def _detach(self) -> None:
        """Remove every hook this audit installed (at ``close``)."""
        self._finalizer()  # the optimizer hooks, and this audit's count as a host-RNG tracker
        if self._forward_handle is not None:
            self._forward_handle.remove()
        self._forward_handle = None

    # -- 0 and 4: the step opens and closes ------------------------------------------------------------
    def _begin(self, batches: list) -> PendingStep:
        """Open the step: decide whether it is audited; if so, save the random state and attach the forward hook.

        The hook is needed in ``step()`` too: a ``loss_fn`` may enter autocast itself, around the model only.
        """
        if self._pending is not None:
            raise RuntimeError("audit.watch() blocks cannot be nested; finish the current step first")
        step = self._step_count
        due = not self._closed and self.due(step)
        self._pending = pending = PendingStep(batches, StepWatch(), due)
        if due:
            if self._flat is not None:
                self._flat.reduced = False  # this step's shard sums are not all-reduced yet (see globalize)
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

    def _refresh_index(self, pending: PendingStep) -> None:
        """Re-index after ``optimizer.add_param_group`` (progressive unfreezing) or a move to another device."""
        groups = self._reader.reads.param_groups
        if (len(groups), sum(len(g["params"]) for g in groups)) != self._indexed:
            # e.g. a group holding a parameter that is not in the model: audited with the old index, an error record
            with contained(self._strict_at_once, f"auditing step {self._step_count}", pending.keep, catch=ValueError):
                self._index_parameters(stacklevel=5)
        elif self.params[0].device != self._device:  # model.to("cuda") after the Audit was built
            self._devices, self._device = cuda_devices(self.model), self.params[0].device

    def _start_captures(self, pending: PendingStep, step: int) -> None:
        """Let due probes watch the training forward/backward (e.g. noise: layer inputs and output gradients)."""
        for name, every in self.probes.items():
            start = probe_registry.capture_for(name) if step % every == 0 else None
            if start is None:
                continue
            capture = None
            keep = pending.keep if self.strict else None  # strict under several processes: the step's error
            with contained(self._strict_at_once, f"probe {name!r} could not watch step {step}", keep):  # or it replays
                capture = start(self.model, self.names, self.params, self.options)
            if capture is not None:
                pending.captures[name] = capture

    @staticmethod
    def _stop_captures(pending: PendingStep) -> None:
        for capture in pending.captures.values():
            quietly(capture.stop)

    def _end(self, stacklevel: int, failed: bool = False) -> None:
        """Close the step: detach the forward hook, output hooks and captures; count a step that was due but
        never taken; release large flat buffers if the next step is not audited.

        ``failed``: the block raised; the exception says what happened, so no warning is added.
        """
        pending, self._pending = self._pending, None
        self._outer_step = None  # a step() that raised ran no post-hook: hold no frame past the block
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
            self._flat.idle()  # sparse auditing holds no copy of a large model between audited steps
        if pending.due and not pending.stepped and not failed:
            self.skipped_steps += 1  # e.g. GradScaler skipped a step with inf/NaN gradients
            warnings.warn(
                "no optimizer step happened inside audit.watch() (GradScaler skipped it, or "
                "step() was not called); nothing was audited",
                stacklevel=stacklevel,
            )

    # -- 1: the model's forward ------------------------------------------------------------------------
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
            # inside the user's forward: never break training
            with contained(
                self._strict_at_once, f"auditing step {self._step_count}: marking a forward failed", pending.keep
            ):
                self.replay.record_forward(
                    output, pending.events, pending.handles, self._devices, host=pending.entry.host is not None
                )

    # -- 2: before the optimizer's update --------------------------------------------------------------
    def _on_step_pre(self, args, kwargs, caller=None):
        """``caller``: the frame of torch's step wrapper running the hooks (None from ``before_update``)."""
        if running_below(self._outer_step, caller):
            return None  # the inner call of a nested step(): the outer one is the step
        self._outer_step = caller
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
        changed = None
        with contained(self._strict_at_once, f"auditing step {self._step_count} failed before the step", pending.keep):
            with wrapper_state_kept(self._wrapper):
                changed = self._prepare(pending, args, kwargs)
        return changed

    def _prepare(self, pending: PendingStep, args, kwargs):
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
            ctx.grads = self._grads(borrow=not pending.captures and not self._assembly.due(ctx.step))
            if self._fused_amp_skip(ctx):
                pending.skipped = True
                return None
            pending.loss_before = self.losses.before(ctx, pending.watch.loss)
            return None

        def first_call(loss):
            if pending.error is None:
                # never break training: the record says what failed
                with contained(self._strict_at_once, f"auditing step {ctx.step} failed in the closure", pending.keep):
                    ctx.grads = self._grads()
                    ctx.parts = [
                        Part(b, r)
                        for b, r in zip(
                            pending.batches, self.replay.states(pending.entry, pending.events, len(pending.batches))
                        )
                    ]
                    pending.loss_before = self.losses.before(ctx, loss)

        return wrap_first_call(args, kwargs, first_call)

    def _flat_buffers(self) -> FlatBuffers:
        """The audit's reusable flat copies (made at the first audited step)."""
        if self._flat is None:
            self._flat = FlatBuffers(self.params, exact=self._exact_sums)
        return self._flat

    def _grads(self, borrow: bool = False) -> list[torch.Tensor] | None:
        """Views into one flat copy of the gradient the optimizer sees (zeros where .grad is None).

        ``borrow`` (no probe reads the gradient on this step): None where ``FlatBuffers.borrow_grad`` can
        read the live ``.grad`` after the step instead of a copy; ``ctx.grads`` and ``ctx.flat_grad`` stay None.
        """
        flat = self._flat_buffers()
        if borrow and self._builtin_step and getattr(self.optimizer, "grad_scale", None) is None and flat.borrow_grad():
            return None  # a fused optimizer under GradScaler (grad_scale set) unscales a copy: never borrowed
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

    # -- 3: after the optimizer's update ---------------------------------------------------------------
    def _on_step_post(self, caller=None) -> None:
        if caller is not self._outer_step and running_below(self._outer_step, caller):
            return  # the inner call of a nested step() ended; the outer one has not
        self._outer_step = None
        pending, index = self._pending, self._step_count
        if pending is not None and pending.skipped:
            return  # counted in _end like a step GradScaler did not take (the weights did not move)
        self._step_count += 1
        if pending is None or not pending.due or pending.stepped:
            return
        pending.stepped = True
        record: dict = {}

        def error_record(error: Exception) -> None:
            record.update(step=index, verdict="error", error=f"{type(error).__name__}: {error}")

        with contained(self._strict_at_once, f"auditing step {index} failed", error_record):
            if self._writer.deferred is not None:  # strict, several processes: an earlier write failed on this rank
                pending.keep_first(self._writer.deferred)
                self._writer.deferred = None
            if pending.error is not None:
                raise pending.error
            with wrapper_state_kept(self._wrapper):
                record = self._assemble(pending)
        if self._world_size > 1:  # every rank, every audited step, whatever happened above: lockstep
            self._assembly.globalize(record, pending.captures, self._flat_buffers() if self._sharded else None)
            if self._assembly.collective and record.get("verdict") != "error":  # the same on every rank now
                self._assembly.run_probes(pending.ctx, record, index, collective=True)
        pending.watch.record = record
        self._writer.commit(record)
        if self.strict and self._world_size > 1 and record.get("verdict") == "error":
            raise AuditError(f"auditing step {index} failed: {record.get('error')}")  # on every rank, in lockstep

    def _assemble(self, pending: PendingStep) -> dict:
        """The step's record from what was captured (``assemble.py``)."""
        ctx = pending.ctx
        self.replay.check(pending.entry, [part.rng for part in ctx.parts])
        layout = (self.names, self.modules, self.groups)
        return self._assembly.core(ctx, self._flat_buffers(), self.losses, layout, pending.batches, pending.loss_before)


def _cleanup(handles: list, replay: Replay) -> None:
    """Remove an audit's optimizer hooks and stop its host-RNG tracking (at close() or when it is dropped)."""
    for handle in handles:
        handle.remove()
    replay.close()

"""Passive capture: watch an unchanged training script through global hooks, never changing what it does.

What is installed for one session (and removed, every patch restored, by ``close``):
  - the global optimizer step pre/post hooks: Δw, gradient, learning rate, loss of every step of every
    ``torch.optim`` optimizer (each tagged with its index);
  - a wrapper around ``torch.autograd.backward`` (``Tensor.backward`` calls it): the loss at backward,
    and whether ``.grad`` was cleared since the previous step;
  - wrappers around ``torch.relu``/``sigmoid``/``tanh`` and the loss functions of ``torch.nn.functional``
    (``nn.ReLU``, ``nn.CrossEntropyLoss`` … call these): dead/saturated units, what the loss received;
  - global module forward hooks (only on sampled steps): the model's root modules, the first layer's input,
    the input shapes of recurrent layers built with ``batch_first=False`` (``recurrent.py``).
Heavy statistics run on sampled steps only (``sampled``) to keep the cost within the 15% budget.
The hooks read tensors under ``no_grad`` and never touch RNG, weights, gradients or buffers; a failure
inside them is counted (``capture_errors``), never raised into the script. Forward and loss observations
live in ``observe.py``, names and run-level observations in ``results.py``.

Sampled steps are measured by ``Audit``'s own capture code, with the watcher's sampling policy (``sampled``)
on top: ``FlatBuffers`` (released between sparse sampled steps), ``layer_rows``, ``wrap_first_call`` for
closure optimizers, ``context.group_lr``.

Size (over 400 lines): one watcher whose hooks and wrappers share a session's state, plus the torch.compile
and TorchScript transparency they all need.
"""

from __future__ import annotations

import importlib.abc
import math
import sys as _sys
import time
import types
import warnings as _warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optim

from ..closure import wrap_first_call
from ..context import group_lr
from ..flat import FlatBuffers, is_sharded
from ..maths import dense
from ..nesting import hook_caller, running_below
from ..records import layer_rows
from .observe import ForwardObserver
from .results import RunResults

_ACTIVE: PassiveWatcher | None = None  # the session the patched functions report to
_LOSSES = (
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
)
_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_SOFTMAXES = ("softmax", "log_softmax")
GRAPH_WALKS = 3  # backward passes whose autograd graph is walked for leaves no optimizer holds
MAX_GRAPH_NODES = 200_000


class StopRun(BaseException):
    """Raised from a hook to end the script at --max-steps / --time-limit (a BaseException: ``except
    Exception`` in the script cannot swallow it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


SAMPLE_EVERY = 20


def sampled(step: int, every: int = SAMPLE_EVERY) -> bool:
    """Steps with full statistics: the first five, then pairs (k·every, k·every + 1) so consecutive gradients meet."""
    return step < 5 or step % every < 2


@dataclass
class WatchedOptimizer:
    """What the watcher keeps about one optimizer."""

    index: int
    optimizer: torch.optim.Optimizer
    params: list
    groups: list
    local_step: int = 0
    names: list | None = None
    modules: list | None = None
    ever_grad: list = field(default_factory=list)  # per parameter: nonzero gradient seen (False: never; None: unread)
    flat: FlatBuffers | None = None  # Audit's flat copies, held from a sampled step to the next consecutive one
    prev_grad: tuple | None = None  # (local step, flat gradient copy, ‖g‖²) for the consecutive-gradient cosine
    max_lr: list = field(default_factory=list)  # largest lr each parameter group had at a sampled step
    zero_watch: dict | None = None  # zeroing check between a sampled step and this optimizer's next step
    pending: dict = field(default_factory=dict)
    group_count: int = 0  # param_groups when params was read (add_param_group changes it: re-read)
    outer_step: Any = None  # the frame of torch's step wrapper of the step under way (``nesting.py``)


def _leaf(tensor: torch.Tensor, walk: int) -> dict:
    """What is kept of a leaf of a walked autograd graph, without keeping the tensor alive.

    ``tensor`` is a storage-free stand-in (a meta tensor of the same shape and dtype, a Parameter if the
    leaf is one): what the orphan check reads. ``ref`` reaches the leaf while the script holds it. A leaf
    seen again in a later graph is a weight the script keeps from step to step; only then is it held
    (``held``), so the check for hand-written updates can still read it after the script's namespace is
    gone. A tensor created inside ``forward`` is in one graph only and is freed with it.
    """
    try:
        stand_in = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if isinstance(tensor, torch.nn.Parameter):
            stand_in = torch.nn.Parameter(stand_in, requires_grad=tensor.requires_grad)
    except Exception:  # an odd tensor subclass: describe it by an empty tensor of its shape
        stand_in = torch.empty(tuple(tensor.shape), device="meta")
    return {"tensor": stand_in, "walk": walk, "ref": weakref.ref(tensor)}


class PassiveWatcher(ForwardObserver, RunResults):
    """One passive session: ``install()``, run the script, ``close()``; then ``records`` and ``observations``."""

    def __init__(
        self,
        max_steps: int | None = 300,
        time_limit: float | None = None,
        flush: Callable[[list[dict]], None] | None = None,
        sample_every: int = SAMPLE_EVERY,
    ) -> None:
        if sample_every < 2:
            raise ValueError(f"sample_every must be ≥ 2 (pairs of consecutive steps), got {sample_every}")
        self.max_steps, self.time_limit, self.flush, self.every = max_steps, time_limit, flush, sample_every
        self._init_observer()
        self.records: list[dict] = []
        self._flushed = 0
        self.optimizers: list[WatchedOptimizer] = []
        self._by_id: dict[int, WatchedOptimizer] = {}
        self.step_count = 0
        self.backward_count = 0
        self._since_step: list[torch.Tensor] = []  # scalar losses at backward since the last step
        self._backwards_since_step = 0
        self._backward_grads: Any = None  # the gradient passed to the backward being observed (set by its wrapper)
        self._last_window: tuple[int, list] | None = None  # (optimizer, losses) of the last step after a backward
        self._in_step = False
        self.zero_checks: list[dict] = []
        self.stopping: str | None = None
        self.grad_params: dict[int, torch.Tensor] = {}  # parameters of the roots that had a gradient
        self._handles: list = []
        self._window_handles: list = []
        self._hooks_frozen = False  # torch.compile in use: the module hooks stay as they are (no recompiles)
        self._compile_callback: tuple | None = None  # (TorchDynamo's callback handler, our start callback)
        self._import_watch: _DynamoImportWatch | None = None
        self._compiled_before = 0  # frames TorchDynamo had compiled when the session began
        self._patches: list[tuple[Any, str, Any]] = []
        self._started = time.monotonic()
        self.error: str | None = None
        self._scaled: tuple | None = None  # (weakref to the last GradScaler.scale output, its scale)
        self.capture_errors = 0
        self.first_capture_error: str | None = None
        self._on_backward = self.guarded(self.on_backward)
        self._on_activation = self.guarded(self.on_activation)
        self._on_loss = self.guarded(self.on_loss)
        self._on_softmax = self.guarded(self.on_softmax)
        self._on_load_state = self.guarded(self.on_load_state)
        self.graph_leaves: dict = {}  # leaves of walked autograd graphs: id (or a freed key) -> ``_leaf``
        self._graph_walks = 0
        self._schedulers: weakref.WeakSet = weakref.WeakSet()  # the optimizers' lr schedulers, once found
        self.schedulers: dict[str, int] = {}  # scheduler class -> step() calls, as last counted
        self._weights_at_start: list | None = None  # fingerprints of the weights at the first backward
        self.custom_update: bool | None = None  # weights moved without any torch.optim step (set at close)

    # -- install / remove ------------------------------------------------------------------------------
    def install(self) -> PassiveWatcher:
        """Register the global hooks and patches; only one session at a time."""
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a stepaudit doctor session is already running in this process")
        _ACTIVE = self
        self._started = time.monotonic()
        self._handles = [
            _optim.register_optimizer_step_pre_hook(self.guarded(self._step_pre)),
            _optim.register_optimizer_step_post_hook(self.guarded(self._step_post)),
        ]
        self._open_window()
        self._patch(torch.autograd, "backward", _backward_wrapper)
        for name in _ACTIVATIONS:
            self._patch(torch, name, _activation_wrapper)
        for name in _LOSSES:
            self._patch(F, name, _loss_wrapper)
        for name in _SOFTMAXES:
            self._patch(F, name, _softmax_wrapper)
            self._patch(torch, name, _softmax_wrapper)
        self._patch(torch.nn.Module, "load_state_dict", _load_state_wrapper)
        if hasattr(torch.amp, "GradScaler"):  # torch ≥ 2.3; torch.cuda.amp.GradScaler subclasses it
            self._patch(torch.amp.GradScaler, "scale", _scale_wrapper)
        self._compiled_before = _dynamo_compiled()
        if not self._watch_compilation():  # torch._dynamo not imported yet: register when it is
            self._import_watch = _DynamoImportWatch(self._watch_compilation)
            _sys.meta_path.insert(0, self._import_watch)
        _dynamo_skips((self._on_backward, _active, _compiling, _dynamo_compiled), recursive=True)
        _dynamo_skips(tuple(getattr(owner, name) for owner, name, _ in self._patches), recursive=False)
        return self

    def guarded(self, fn: Callable) -> Callable:
        """``fn`` for use in a hook: a failure of the watcher is counted, never raised into the script.

        ``StopRun`` (a ``BaseException``) still passes: it is how the session ends the script.
        """

        def call(*args, **kwargs):
            if _compiling():  # inside torch.compile's tracing: observe nothing, add no graph break
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # auditing never breaks training
                self.capture_errors += 1
                if self.capture_errors == 1:
                    self.first_capture_error = f"{getattr(fn, '__name__', fn)}: {type(error).__name__}: {error}"
                return None

        return call

    def _patch(self, owner: Any, name: str, make: Callable) -> None:
        original = getattr(owner, name)
        self._patches.append((owner, name, original))
        setattr(owner, name, make(name, original))

    def close(self) -> None:
        """Remove every hook, restore every patch, settle the records (idempotent)."""
        global _ACTIVE
        self._close_window(force=True)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches = []
        self._unwatch_compilation()
        _forget_script_aliases()
        if _ACTIVE is self:
            _ACTIVE = None
        self._custom_update_records()
        self._settle_leaves()
        self._settle_losses()

    def _custom_update_records(self) -> None:
        """No ``torch.optim`` step ran but the weights moved (a hand-written update, fastai's optimizer…):
        each backward pass stands for one step, with its loss, so the loss curve can still be judged."""
        if self.step_count or not self.backward_count or self.records or self.custom_update is not None:
            return
        self.custom_update = bool(self.weights_changed())
        if not self.custom_update:
            return
        for i, loss in enumerate(self._since_step):
            self.records.append(
                {
                    "step": i,
                    "optimizer": None,
                    "local_step": i,
                    "backward_passes": 1,
                    "_losses": [loss],
                    "custom_update": True,
                }
            )
        self._since_step = []

    def _open_window(self) -> None:
        """Global module forward hooks, only while a sampled step's forward may run (they cost per call)."""
        if not self._window_handles and not self._hooks_frozen:
            self._window_handles = [
                _module.register_module_forward_pre_hook(self.guarded(self._forward_pre)),
                _module.register_module_forward_hook(self.guarded(self._forward_post)),
            ]
        self.window = True

    def _close_window(self, force: bool = False) -> None:
        if force or not self._hooks_frozen:
            for handle in self._window_handles:
                handle.remove()
            self._window_handles = []
        self.window = False
        self._depth = 0

    def _freeze_module_hooks(self, remove: bool) -> None:
        """From now on the global module hooks stay as they are; with ``remove``, they go first.

        TorchDynamo traces global module hooks into what it compiles and guards on them: with them a
        graph break inside a model's ``forward`` is handled differently (the forward can run uncompiled),
        and adding or removing them later recompiles (tracing again, graph breaks included). So they go
        before torch.compile's first compilation in the session, and the forward statistics of sampled
        steps are given up for a compiled script (its compiled code is never observed anyway).
        """
        if self._hooks_frozen:
            return
        if remove:
            for handle in self._window_handles:
                handle.remove()
            self._window_handles = []
            self._depth = 0
        self._hooks_frozen = True

    def _on_compile_start(self, args: Any = None) -> None:
        """TorchDynamo starts compiling a frame (a start callback, run before it traces anything)."""
        self._freeze_module_hooks(remove=True)

    def _watch_compilation(self) -> bool:
        """Register ``_on_compile_start`` with TorchDynamo once it is imported (True when registered)."""
        if self._compile_callback is not None:
            return True
        handler = getattr(_sys.modules.get("torch._dynamo.callback"), "callback_handler", None)
        if handler is None or not hasattr(handler, "register_start_callback"):
            return False

        def callback(args: Any = None) -> None:  # not ``guarded``: is_compiling() already holds here
            try:
                self._on_compile_start(args)
            except Exception:
                self.capture_errors += 1

        handler.register_start_callback(callback)
        self._compile_callback = (handler, callback)
        return True

    def _unwatch_compilation(self) -> None:
        if self._import_watch is not None:
            try:
                _sys.meta_path.remove(self._import_watch)
            except ValueError:
                pass
            self._import_watch = None
        if self._compile_callback is not None:
            handler, callback = self._compile_callback
            self._compile_callback = None
            try:
                handler.remove_start_callback(callback)
            except Exception:
                pass

    # -- stopping --------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the session was installed."""
        return time.monotonic() - self._started

    def _check_stop(self) -> None:
        if self.stopping is None and self.time_limit is not None and self.elapsed() >= self.time_limit:
            self.stopping = "time_limit"
        if self.stopping is not None:
            raise StopRun(self.stopping)

    # -- backward ----------------------------------------------------------------------------------------
    def on_backward(self, tensors: Any) -> None:
        """Called before every ``torch.autograd.backward``: the loss, and the zeroing check."""
        self._check_stop()
        if self._in_step:  # a closure optimizer's own evaluations
            return
        self._close_activations()
        self._depth = 0
        grads, self._backward_grads = self._backward_grads, None
        loss = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) == 1 else tensors
        scaled = self._scaled
        if isinstance(loss, torch.Tensor) and scaled is not None and scaled[0]() is loss and grads is None:
            self._since_step.append(loss.detach() / scaled[1])  # GradScaler.scale(loss).backward(): unscale
        else:
            value = _backward_loss(tensors, grads)
            if value is not None:
                self._since_step.append(value)
        roots = [
            t for t in (tensors if isinstance(tensors, (tuple, list)) else [tensors]) if isinstance(t, torch.Tensor)
        ]
        if self._graph_walks < GRAPH_WALKS and any(t.grad_fn is not None for t in roots):
            self._graph_walks += 1
            if len(roots) == 1 and grads is None:
                self._note_loss_sign(roots[0])
            try:
                self._walk_graph(roots)
            except Exception:  # an odd graph: fewer leaves known, nothing else lost
                pass
        self.backward_count += 1
        self._backwards_since_step += 1
        if self.backward_count == 1:
            try:
                self._weights_at_start = self._fingerprint()
            except Exception:  # odd parameters: "did the weights move" stays unknown, the rest goes on
                self._weights_at_start = None
        for state in self.optimizers:
            if state.zero_watch is not None and any(state.zero_watch["kept"]):
                self._zero_check(state)
        if self.step_count == 0 and self.max_steps is not None and self.backward_count > self.max_steps:
            self.stopping = "max_steps"  # backward passes but never an optimizer step: enough seen
            raise StopRun(self.stopping)

    def _walk_graph(self, roots: list[torch.Tensor]) -> None:
        """The leaves the backward will write ``.grad`` to (AccumulateGrad nodes), found before it runs.

        Parameters kept in a plain list or dict, or created inside ``forward``, are leaves of the graph
        but not parameters of any registered module; comparing the leaves with what the optimizers hold
        finds them whatever the model's structure.
        """
        self._settle_leaves()
        stack, seen = [t.grad_fn for t in roots], set()
        while stack and len(seen) < MAX_GRAPH_NODES:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if isinstance(variable, torch.Tensor):
                leaf = self.graph_leaves.get(id(variable))
                if leaf is None:
                    self.graph_leaves[id(variable)] = _leaf(variable, self._graph_walks)
                elif leaf["walk"] != self._graph_walks and leaf["ref"]() is variable:
                    leaf["held"] = variable  # in two graphs: a weight the script keeps (see ``_leaf``)
                continue
            stack.extend(child for child, _ in node.next_functions)

    def _settle_leaves(self) -> None:
        """Leaves freed since they were seen keep their description under a key no live tensor can have
        (an ``id`` is reused once its tensor is gone)."""
        for key, leaf in list(self.graph_leaves.items()):
            if isinstance(key, int) and leaf["ref"]() is None:
                del self.graph_leaves[key]
                self.graph_leaves[("freed", key, leaf["walk"])] = leaf

    @torch.no_grad()
    def _fingerprint(self) -> list[tuple[int, float, float]]:
        """(id, Σw, ‖w‖) of every parameter of the model's roots and every leaf of the first walked graph
        (hand-written models have no module): enough to tell whether any weight moved."""
        out, seen = [], set()
        leaves = [leaf["ref"]() for leaf in list(self.graph_leaves.values()) if leaf["walk"] == 1]
        leaves = [t for t in leaves if t is not None]  # a tensor created in forward and freed: not a weight
        for p in [*(p for root in list(self.roots.values()) for p in root.parameters()), *leaves]:
            if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
                continue
            if id(p) not in seen and p.is_floating_point() and p.numel():
                seen.add(id(p))
                w = p.detach()
                out.append(
                    (id(p), float(w.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(w, dtype=torch.float64)))
                )
        return out

    def weights_changed(self) -> bool | None:
        """Whether any weight of the model differs from the first backward (None: nothing to compare)."""
        if not self._weights_at_start:
            return None
        try:
            now = dict((k, (a, b)) for k, a, b in self._fingerprint())
        except Exception:
            return None
        return any(now.get(k) not in (None, (a, b)) for k, a, b in self._weights_at_start)

    def _find_schedulers(self, optimizer: torch.optim.Optimizer) -> None:
        """The learning-rate schedulers that hold ``optimizer``, without a heap scan where possible.

        First the script's frames (their locals and globals, and the attributes of the objects there): a
        scheduler is nearly always one of those. Torch's ``LRScheduler`` family marks the optimizer's
        ``step`` when it is built (``_wrapped_by_lr_sched``); only when that mark is there and the frames
        gave nothing are the optimizer's referrers scanned (``gc.get_referrers``: 0.1 s, twice when the
        optimizer sits in a dict, with torch loaded; 10-20% of a short run). Without the mark only a
        ``ReduceLROnPlateau`` could hold it, and it is looked for in the frames alone.

        Nothing is patched: wrapping ``LRScheduler.step`` would put a stepaudit frame under torch's own
        warnings there (they would point at stepaudit instead of the script's line).
        """
        kinds = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        found = _schedulers_in_frames(optimizer, kinds)
        if not found and hasattr(getattr(optimizer, "step", None), "_wrapped_by_lr_sched"):
            found = _schedulers_in_heap(optimizer, kinds)
        for scheduler in found:
            self._schedulers.add(scheduler)

    def _count_schedulers(self) -> None:
        """Scheduler class -> ``step()`` calls so far (``last_epoch``: the constructor's own step excluded),
        read at every optimizer step while the schedulers are alive (the script's namespace goes at its end)."""
        if not self._schedulers:
            return
        out: dict[str, int] = {}
        for scheduler in list(self._schedulers):
            steps = getattr(scheduler, "last_epoch", None)
            if isinstance(steps, int):
                name = type(scheduler).__name__
                out[name] = out.get(name, 0) + max(steps, 0)
        self.schedulers = out

    @torch.no_grad()
    def _zero_check(self, state: WatchedOptimizer) -> None:
        """At a backward's start: which of last step's nonzero gradients are still in ``.grad``?

        A gradient cleared (None or zero) at any backward before the optimizer's next step was zeroed;
        one still there at every backward of the interval is added to, step after step.
        """
        watch = state.zero_watch
        watch["backwards"] += 1
        kept = watch["kept"]
        present = [i for i, k in enumerate(kept) if k and state.params[i].grad is not None]
        for i, k in enumerate(kept):
            if k and state.params[i].grad is None:
                kept[i] = False  # set to None since the step: cleared
        if present:  # one device: only a step FlatBuffers measured starts a watch
            norms = torch._foreach_norm([dense(state.params[i].grad).detach() for i in present])
            for i, flag in zip(present, torch.stack(norms).ne(0).tolist()):
                kept[i] = flag

    def _finish_zero_check(self, state: WatchedOptimizer) -> None:
        """At the optimizer's next step: record the share of gradients never cleared since its last step."""
        watch, state.zero_watch = state.zero_watch, None
        if watch is None or watch["backwards"] == 0 or watch["had"] == 0:
            return  # no backward in between (closure optimizers evaluate inside step): nothing to judge
        self.zero_checks.append(
            {
                "step": watch["step"],
                "optimizer": state.index,
                "kept": sum(watch["kept"]) / watch["had"],
                "backwards": watch["backwards"],
            }
        )

    # -- optimizer steps -------------------------------------------------------------------------------
    def _register(self, optimizer: torch.optim.Optimizer) -> WatchedOptimizer:
        state = WatchedOptimizer(len(self.optimizers), optimizer, [], [])
        self._index(state)
        for other in self.optimizers:  # a new optimizer (a new trial, fold, model): the others may never step again
            if other.flat is not None:
                other.flat.release()
            other.prev_grad = None
        self.optimizers.append(state)
        self._by_id[id(optimizer)] = state
        return state

    @staticmethod
    def _index(state: WatchedOptimizer) -> None:
        """Read the parameters the optimizer holds (again after ``add_param_group``: progressive unfreezing)."""
        groups = state.optimizer.param_groups
        pairs = [(p, g) for g, group in enumerate(groups) for p in group["params"]]
        seen = {id(p): flag for p, flag in zip(state.params, state.ever_grad)}
        state.params, state.groups = [p for p, _ in pairs], [g for _, g in pairs]
        state.ever_grad = [seen.get(id(p)) for p in state.params]
        state.group_count, state.names, state.modules = len(groups), None, None
        if state.flat is not None:
            state.flat.release()
        state.flat = state.prev_grad = state.zero_watch = None

    def _step_pre(self, optimizer, args, kwargs):
        self._check_stop()
        state = self._by_id.get(id(optimizer)) or self._register(optimizer)
        caller = hook_caller(2)  # above ``guarded``'s call: torch's step wrapper
        if running_below(state.outer_step, caller):
            return None  # a subclass's step() calling super().step(): the outer call is the step
        state.outer_step = caller
        self._finish_zero_check(state)
        groups = optimizer.param_groups
        if len(groups) != state.group_count or sum(len(g["params"]) for g in groups) != len(state.params):
            self._index(state)
        self._close_activations()
        self._depth = 0
        self._in_step = True
        losses, backwards = self._since_step, self._backwards_since_step
        if backwards:
            self._last_window = (state.index, losses)
        elif self._last_window is not None and self._last_window[0] != state.index:
            losses = self._last_window[1]  # a second optimizer stepped after the same backward: the same loss
        state.pending = {"losses": losses, "backwards": backwards}
        self._since_step, self._backwards_since_step = [], 0
        taken = sampled(state.local_step, self.every) and bool(state.params) and self._take(state, "before")
        if taken and (state.local_step < 5 or state.local_step % (5 * self.every) < 2):
            self._note_gradients()

        def first_call(loss: Any) -> None:  # closure optimizers (LBFGS): the first evaluation's loss and gradient
            state.pending["closure_loss"] = loss.detach() if isinstance(loss, torch.Tensor) else loss
            if taken:
                self._take(state, "grad")

        if (args[1] if len(args) > 1 else kwargs.get("closure")) is not None:
            args, kwargs = wrap_first_call(args, kwargs, self.guarded(first_call))
            _dynamo_skips((args[1] if len(args) > 1 else kwargs["closure"],), recursive=False)  # the wrapper
            return args, kwargs
        if taken:
            self._take(state, "grad")
        return None

    def _take(self, state: WatchedOptimizer, what: str) -> bool:
        """Copy the weights (``before``) or gradient (``grad``) into ``FlatBuffers``; odd parameters are recorded."""
        try:
            if state.flat is None:
                if any(is_sharded(p) for p in state.params):  # FlatBuffers would all-reduce from inside a hook
                    raise ValueError("not measured: parameters sharded by FSDP2")
                state.flat = FlatBuffers(state.params)
            (state.flat.take_before if what == "before" else state.flat.take_grad)()
        except Exception as error:
            state.pending["error"] = f"{type(error).__name__}: {error}"
            return False
        state.pending[what] = True
        return True

    def _note_gradients(self) -> None:
        """Which of the model's parameters carry a gradient (for parameters no optimizer holds)."""
        for root in list(self.roots.values()):
            for p in root.parameters():
                if p.requires_grad and p.grad is not None:
                    self.grad_params[id(p)] = p

    def _step_post(self, optimizer, args, kwargs):
        state = self._by_id[id(optimizer)]
        caller = hook_caller(2)
        if caller is not state.outer_step and running_below(state.outer_step, caller):
            return  # the nested call ended; the step has not
        state.outer_step = None
        self._in_step = False
        local, index = state.local_step, self.step_count
        state.local_step += 1
        self.step_count += 1
        pending = state.pending
        losses = pending.get("losses") or []
        if not losses and pending.get("closure_loss") is not None:
            losses = [pending["closure_loss"]]
        record = {
            "step": index,
            "optimizer": state.index,
            "local_step": local,
            "lr": group_lr(optimizer.param_groups[0]) if optimizer.param_groups else math.nan,
            "backward_passes": pending.get("backwards", 0),
            "_losses": losses,
        }
        if (
            self.zero_checks
            and self.zero_checks[-1]["optimizer"] == state.index
            and self.zero_checks[-1].get("next") is None
        ):
            self.zero_checks[-1]["next"] = index
            record["grads_kept"] = self.zero_checks[-1]["kept"]
        if sampled(local, self.every):
            self._note_lrs(state)
        if local == 1:
            self._find_schedulers(optimizer)
        self._count_schedulers()
        if "error" in pending:
            record["capture_error"] = pending["error"]
            if sampled(local, self.every):
                self._read_gradients(state)
        elif "before" in pending and "grad" in pending:
            try:
                self._measure(state, record)
            except Exception as error:  # never break training
                record["capture_error"] = f"{type(error).__name__}: {error}"
        if sampled(local, self.every) and not sampled(local + 1, self.every) and state.flat is not None:
            state.flat.release()  # as Audit's sparse auditing: no copy of the model between sampled steps
            state.prev_grad = None
        if self._activations:
            self._summarize_activations(record)
        if self._inputs is not None:
            record.update({f"input_{k}": v for k, v in self._inputs.items() if k != "step"})
            self._inputs = None
        state.pending = {"record_step": index}
        self.records.append(record)
        if self.flush is not None and len(self.records) - self._flushed >= 25:
            self._flush()
        if not self._hooks_frozen and self._compile_callback is None and _dynamo_compiled() > self._compiled_before:
            self._freeze_module_hooks(remove=False)  # compiled without our callback: at least stop toggling
        if any(sampled(s.local_step, self.every) for s in self.optimizers):
            self._open_window()
        else:
            self._close_window()
        if self.max_steps is not None and self.step_count >= self.max_steps:
            self.stopping = "max_steps"
        self._check_stop()

    @torch.no_grad()
    def _read_gradients(self, state: WatchedOptimizer) -> None:
        """The statistics could not be taken (a complex parameter…): still read which parameters carry a nonzero
        gradient, one at a time; one that cannot be read stays unknown (None), never "no gradient"."""
        for i, p in enumerate(state.params):
            if state.ever_grad[i] or is_sharded(p):  # a sharded gradient would need the other ranks
                continue
            try:
                state.ever_grad[i] = p.grad is not None and bool(dense(p.grad).ne(0).any())
            except Exception:  # an odd tensor: its gradient stays unknown
                continue

    def _note_lrs(self, state: WatchedOptimizer) -> None:
        """Track each group's largest learning rate (a schedule may end at 0; a zero lr throughout is a fault)."""
        lrs = [group_lr(group) for group in state.optimizer.param_groups]
        if len(state.max_lr) != len(lrs):
            state.max_lr = lrs
        else:
            state.max_lr = [max(a, b) if b == b else a for a, b in zip(state.max_lr, lrs)]

    @torch.no_grad()
    def _measure(self, state: WatchedOptimizer, record: dict) -> None:
        """Norms, ratios, g·Δw and per-layer rows of a sampled step, computed as ``Audit`` does (``FlatBuffers``)."""
        flat = state.flat
        first_order, sums = flat.finish(keep_before=False)  # nothing reads the weights before after this
        if state.names is None or len(state.names) != len(state.params) or self._names_stale(state):
            self._name(state)
        rows, totals = layer_rows(state.names, state.modules, state.groups, sums, first_order=first_order)
        record["measured"] = True  # this step has gradient/update statistics (stored NaN then means NaN)
        record.update(totals)
        record["layers"] = rows
        g2 = [row[1] for row in sums]
        nonzero = [v != 0 for v in g2]  # NaN counts: a NaN gradient was received (and is reported as nonfinite)
        state.ever_grad = [a or b for a, b in zip(state.ever_grad, nonzero)]
        state.zero_watch = {"step": record["step"], "kept": list(nonzero), "had": sum(nonzero), "backwards": 0}
        if not all(math.isfinite(v) for v in g2):
            record["grad_nonfinite"] = True
        if not math.isfinite(sum(row[3] for row in sums)):  # Σ‖w‖² is finite iff every weight is
            record["weights_nonfinite"] = True
        previous, local = state.prev_grad, record["local_step"]
        if previous is not None and previous[0] == local - 1:
            grad, prev = flat.grad, previous[1].to(flat.grad)
            if grad.dtype in (torch.float16, torch.bfloat16):  # accumulate in float32, as FlatBuffers' norms
                grad, prev = grad.float(), prev.float()
            denominator = math.sqrt(previous[2] * sum(g2))
            record["grad_cos_prev"] = float(torch.dot(prev, grad)) / denominator if denominator > 0 else math.nan
        state.prev_grad = (local, flat.grad.clone(), sum(g2)) if sampled(local + 1, self.every) else None
        if self.batch_size is not None:
            record["batch_size"] = self.batch_size


def _schedulers_in_frames(optimizer: torch.optim.Optimizer, kinds: tuple) -> list:
    """Schedulers of ``optimizer`` among the values of the calling frames' locals and globals, and one
    attribute level below them (``trainer.scheduler``)."""
    found, seen = [], set()

    def consider(value: Any, depth: int) -> None:
        if id(value) in seen or isinstance(value, (types.ModuleType, type, types.FunctionType, torch.Tensor)):
            return
        seen.add(id(value))
        if isinstance(value, kinds):
            if getattr(value, "optimizer", None) is optimizer:
                found.append(value)
        elif depth == 0:
            attributes = getattr(value, "__dict__", None)
            if isinstance(attributes, dict):
                for item in list(attributes.values()):
                    consider(item, 1)

    frame, spaces = _sys._getframe(1), set()
    while frame is not None:
        for space in (frame.f_locals, frame.f_globals):
            if id(space) not in spaces:
                spaces.add(id(space))
                for value in list(space.values()):
                    consider(value, 0)
        frame = frame.f_back
    return found


def _schedulers_in_heap(optimizer: torch.optim.Optimizer, kinds: tuple) -> list:
    """Schedulers of ``optimizer`` among its referrers (a scan of every object the collector tracks)."""
    import gc

    found = []
    for holder in gc.get_referrers(optimizer):
        if isinstance(holder, kinds):
            found.append(holder)
        elif isinstance(holder, dict) and holder.get("optimizer") is optimizer:  # a materialised __dict__
            for owner in gc.get_referrers(holder):
                if isinstance(owner, kinds) and getattr(owner, "__dict__", None) is holder:
                    found.append(owner)
    return found


# -- module-level wrappers (they look up the active session at call time) -----------------------------------
def _backward_loss(tensors: Any, grads: Any) -> torch.Tensor | None:
    """The scalar a backward pass differentiates: a scalar, the sum of a list of them, Σ loss·gradient for
    a tensor given its gradient (``per_example.backward(gradient=w)``); None when it cannot be told."""
    tensors = list(tensors) if isinstance(tensors, (tuple, list)) else [tensors]
    grads = list(grads) if isinstance(grads, (tuple, list)) else [] if grads is None else [grads]
    grads += [None] * (len(tensors) - len(grads))
    if not tensors or len(grads) != len(tensors):
        return None
    total = None
    with torch.no_grad():
        for loss, grad in zip(tensors, grads):
            if not isinstance(loss, torch.Tensor) or loss.is_complex():
                return None
            if isinstance(grad, torch.Tensor) and grad.shape == loss.shape:
                dtype = torch.float32 if loss.dtype in (torch.float16, torch.bfloat16) else loss.dtype
                part = (loss.detach().to(dtype) * grad.detach().to(dtype)).sum()  # 16-bit: no overflow to inf
            elif grad is None and loss.numel() == 1:
                part = loss.detach().reshape(())
            else:
                return None
            total = part if total is None else total + part.to(total.device)
    return total


def _active() -> PassiveWatcher | None:
    """The session the wrappers report to; None while torch.compile traces (nothing of ours is traced)."""
    return None if _compiling() else _ACTIVE


_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # looked up once: ~1 µs a call


def _compiling() -> bool:
    return _IS_COMPILING is not None and bool(_IS_COMPILING())


def _dynamo_skips(functions: tuple, recursive: bool) -> None:
    """torch.compile never compiles a frame of these functions: it runs them as plain Python.

    Once a compiled function breaks its graph, TorchDynamo compiles every Python frame the rest of it
    calls: our wrapper of ``torch.autograd.backward`` (reached from ``Tensor.backward``), the optimizer
    hooks, the loss wrappers. Compiled, they would see ``is_compiling()`` and observe nothing, and calling
    the original from a compiled frame is a graph break of their own ("user code at passive.py"). Skipped,
    they run and observe as in eager mode; ``recursive`` skips everything they call too (the watcher's own
    code), otherwise the original they call is treated exactly as without the doctor. When TorchDynamo
    traces through them instead (inlined in a compiled model), nothing changes: ``_compiling()`` holds.
    The strategy is set through torch's C extension, so ``torch._dynamo`` (2 s to import) is not imported.
    """
    try:
        from torch._C._dynamo import eval_frame

        action = eval_frame._FrameAction
        strategy = eval_frame._FrameExecStrategy(action.SKIP, action.SKIP if recursive else action.DEFAULT)
        for fn in functions:
            eval_frame.set_code_exec_strategy(fn.__code__, strategy)
    except Exception:  # an internal of torch moved: compiled scripts may be observed less, nothing breaks
        pass


def _dynamo_compiled() -> int:
    """Frames TorchDynamo has been asked to compile in this process so far (without importing it)."""
    counters = getattr(_sys.modules.get("torch._dynamo.utils"), "counters", None)
    try:
        return int(counters.get("frames", {}).get("total", 0)) if counters is not None else 0
    except Exception:
        return 0


class _DynamoImportWatch(importlib.abc.MetaPathFinder):
    """Finds nothing: notices the import of ``torch._dynamo`` (torch.compile imports it) and registers the
    session's compile-start callback as soon as TorchDynamo's callback module exists, before anything is
    compiled. Removed from ``sys.meta_path`` once registered, or by ``close``."""

    def __init__(self, register: Callable[[], bool]) -> None:
        self.register = register

    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch._dynamo") and "torch._dynamo.callback" in _sys.modules:
            try:
                done = self.register()
            except Exception:
                done = True
            if done:
                try:
                    _sys.meta_path.remove(self)
                except ValueError:
                    pass
        return None


def _as_original(wrapper: Callable, original: Callable, rebuild: bool = True) -> Callable:
    """``wrapper`` made transparent to TorchScript and introspection.

    TorchScript resolves a called function by identity: a builtin (``torch.sigmoid``) through its builtin
    table, a Python function (``F.mse_loss``) by compiling its source (``inspect`` follows ``__wrapped__``
    to the original's) with the names of the wrapper's globals. So a builtin's wrapper is registered as
    that builtin, and a Python function's wrapper is rebuilt over the original's globals (its body reads
    only its closure). Scripted code then runs the original, unobserved, exactly as without the doctor.
    """
    if rebuild and isinstance(getattr(original, "__globals__", None), dict):
        wrapper = types.FunctionType(
            wrapper.__code__, original.__globals__, original.__name__, wrapper.__defaults__, wrapper.__closure__
        )
    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        try:
            setattr(wrapper, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    wrapper.__wrapped__ = original
    try:
        from torch.jit import _builtins

        op = _builtins._find_builtin(original)
        if op is not None:
            _builtins._register_builtin(wrapper, op)
            _SCRIPT_ALIASES.append(wrapper)
    except Exception:  # an internal of TorchScript moved: observation still works, scripting may not
        pass
    return wrapper


_SCRIPT_ALIASES: list = []  # wrappers registered as TorchScript builtins (removed again by ``close``)


def _forget_script_aliases() -> None:
    try:
        from torch.jit import _builtins

        table = _builtins._get_builtin_table()
        for wrapper in _SCRIPT_ALIASES:
            table.pop(id(wrapper), None)
    except Exception:
        pass
    _SCRIPT_ALIASES.clear()


def _scale_wrapper(name: str, original: Callable) -> Callable:
    active = _active

    def scale(scaler, outputs, *args, **kwargs):
        scaled = original(scaler, outputs, *args, **kwargs)
        watcher = active()
        if watcher is not None and isinstance(scaled, torch.Tensor) and scaled.numel() == 1:
            factor = getattr(scaler, "_scale", None)
            if isinstance(factor, torch.Tensor):
                watcher._scaled = (weakref.ref(scaled), factor.detach().clone().to(scaled.device))
        return scaled

    return _as_original(scale, original, rebuild=False)  # its body reads this module's globals


def _backward_wrapper(name: str, original: Callable) -> Callable:
    active = _active

    def backward(tensors, *args, **kwargs):
        watcher = active()
        if watcher is not None:
            watcher._backward_grads = args[0] if args else kwargs.get("grad_tensors")
            watcher._on_backward(tensors)
        return original(tensors, *args, **kwargs)

    return _as_original(backward, original)


def _activation_wrapper(name: str, original: Callable) -> Callable:
    kind, active = _ACTIVATIONS[name], _active

    def activation(*args, **kwargs):
        output = original(*args, **kwargs)
        watcher = active()
        if watcher is not None and watcher.window:
            watcher._on_activation(kind, output)
        return output

    return _as_original(activation, original)


def _call_as_script(original: Callable, args: tuple, kwargs: dict, caller: types.FrameType) -> Any:
    """``original(*args, **kwargs)``, the warnings it raises re-issued at ``caller`` (the script's line).

    torch points its own warnings (a loss's broadcasting warning, softmax's implicit dim) one frame up,
    which inside a wrapper is this module; re-issued at the script's frame, through its module's warning
    registry, they read and are deduplicated exactly as in a plain run.
    """
    caught: list = []
    try:
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            return original(*args, **kwargs)
    finally:
        for w in caught:
            _reissue(w.message, w.category, caller)


_REISSUED: set = set()  # what "default", "module" and "once" already showed (see _reissue)


def _reissue(message: Warning | str, category: type, caller: types.FrameType) -> None:
    """Issue a warning at ``caller`` under the script's filters, shown as often as a plain run would show it.

    Python's per-module registry cannot deduplicate here (every ``catch_warnings`` resets it), so the
    filter's action is looked up as ``warnings`` does and the "default"/"module"/"once" dedup kept here.
    """
    filename, lineno, scope = caller.f_code.co_filename, caller.f_lineno, caller.f_globals
    module, text = scope.get("__name__", "__main__"), str(message)
    action = _warnings.defaultaction
    for act, msg, cat, mod, ln in _warnings.filters:
        if (
            (msg is None or msg.match(text))
            and issubclass(category, cat)
            and (mod is None or mod.match(module))
            and (ln == 0 or ln == lineno)
        ):
            action = act
            break
    key = {
        "default": (text, category, filename, lineno),
        "module": (text, category, filename),
        "once": (text, category),
    }.get(action)
    if key is not None:
        if key in _REISSUED:
            return
        _REISSUED.add(key)
    _warnings.warn_explicit(message, category, filename, lineno, module=module, registry=None, module_globals=scope)


def _softmax_wrapper(name: str, original: Callable) -> Callable:
    active, call, frame = _active, _call_as_script, _sys._getframe

    def softmax(*args, **kwargs):
        watcher = active()
        if watcher is None:  # no session, or torch.compile tracing: the original alone
            return original(*args, **kwargs)
        if watcher.window:
            watcher._on_softmax(name, args, kwargs)
        return call(original, args, kwargs, frame(1))

    return _as_original(softmax, original)


def _weights_fingerprint(module: Any) -> list | None:
    """Per-parameter (name, id, float64 sum): enough to tell whether a load changed any value (None if unreadable)."""
    try:
        with torch.no_grad():
            named = list(module.named_parameters())
            if not named:
                return []
            sums = torch.stack([p.detach().sum(dtype=torch.float64).to("cpu") for _, p in named]).tolist()
        return [(n, id(p), v) for (n, p), v in zip(named, sums)]
    except Exception:  # meta, lazy or sharded parameters: unknown, counted as changed
        return None


def _load_state_wrapper(name: str, original: Callable) -> Callable:
    active = _active

    def load_state_dict(module, *args, **kwargs):
        watcher = active()
        # Only a load before the first loss matters (the weights it fills are not an initialisation), and only one
        # that changed a value: a per-fold reset to the initial weights (load_state_dict(init_state)) leaves the
        # initialisation as it is. A fingerprint before and after, outside the script's view; NaN reads as changed.
        before = None
        if watcher is not None and watcher.initial_loss is None and not watcher.step_count:
            before = _weights_fingerprint(module)
        result = original(module, *args, **kwargs)
        watcher = active()
        if watcher is not None:
            after = _weights_fingerprint(module) if before is not None else None
            if before is None or after is None or before != after:
                watcher._on_load_state(module)
        return result

    return _as_original(load_state_dict, original, rebuild=False)


def _loss_wrapper(name: str, original: Callable) -> Callable:
    active, call, frame = _active, _call_as_script, _sys._getframe

    def loss(*args, **kwargs):
        watcher = active()
        if watcher is None:  # no session, or torch.compile tracing: the original alone
            return original(*args, **kwargs)
        output = call(original, args, kwargs, frame(1))
        watcher._on_loss(name, args, kwargs, output)
        return output

    return _as_original(loss, original)

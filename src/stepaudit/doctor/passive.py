"""Passive capture: watch an unchanged training script through global hooks, never changing what it does.

What is installed for one session (and removed, every patch restored, by ``close``):
  - the global optimizer step pre/post hooks: Δw, gradient, learning rate, loss of every step of every
    ``torch.optim`` optimizer (each tagged with its index);
  - a wrapper around ``torch.autograd.backward`` (``Tensor.backward`` calls it): the loss at backward,
    and whether ``.grad`` was cleared since the previous step;
  - wrappers around ``torch.relu``/``sigmoid``/``tanh`` and the loss functions of ``torch.nn.functional``
    (``nn.ReLU``, ``nn.CrossEntropyLoss`` … call these): dead/saturated units, what the loss received;
  - global module forward hooks (only on sampled steps): the model's root modules, the first layer's input.
Heavy statistics run on sampled steps only (``sampled``) to keep the cost near the 15% budget.
The hooks read tensors under ``no_grad`` and never touch RNG, weights, gradients or buffers.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optim

from ..meta import optimizer_groups
from ..records import layer_rows

_ACTIVE: "PassiveWatcher | None" = None  # the session the patched functions report to
_NORMALIZING = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
_LOSSES = ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "binary_cross_entropy",
           "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
MAX_ACTIVATION_ROWS = 64  # per sampled step
# A unit "never fires on the batch": a healthy unit active on half the examples is silent on all 16 with
# probability 2⁻¹⁶, so smaller batches cannot tell dead units from unlucky ones.
MIN_DEAD_BATCH = 16


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
class _Optimizer:
    """What the watcher keeps about one optimizer."""

    index: int
    optimizer: torch.optim.Optimizer
    params: list
    groups: list
    local_step: int = 0
    names: list | None = None
    modules: list | None = None
    ever_grad: list = field(default_factory=list)  # per parameter: a nonzero gradient was seen at a sampled step
    prev_grad: tuple | None = None  # (local step, gradient copies) for the consecutive-gradient cosine
    max_lr: list = field(default_factory=list)  # largest lr each parameter group had at a sampled step
    zero_watch: dict | None = None  # zeroing check between a sampled step and this optimizer's next step
    pending: dict = field(default_factory=dict)


def _tensor_arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class PassiveWatcher:
    """One passive session: ``install()``, run the script, ``close()``; then ``records`` and ``observations``."""

    def __init__(self, max_steps: int | None = 300, time_limit: float | None = None,
                 flush: Callable[[list[dict]], None] | None = None, sample_every: int = SAMPLE_EVERY) -> None:
        if sample_every < 2:
            raise ValueError(f"sample_every must be ≥ 2 (pairs of consecutive steps), got {sample_every}")
        self.max_steps, self.time_limit, self.flush, self.every = max_steps, time_limit, flush, sample_every
        self._input_windows = 0
        self.records: list[dict] = []
        self._flushed = 0
        self.optimizers: list[_Optimizer] = []
        self._by_id: dict[int, _Optimizer] = {}
        self.step_count = 0
        self.backward_count = 0
        self._since_step: list[torch.Tensor] = []  # scalar losses at backward since the last step
        self._backwards_since_step = 0
        self._in_step = False
        self.zero_checks: list[dict] = []
        self.stopping: str | None = None
        self.window = True  # statistics of forward passes are gathered (step 0 is sampled)
        self._depth = 0
        self._first_layer_pending = True
        self._param_calls = 0
        self.roots: dict[int, torch.nn.Module] = {}
        self._open_activations: list[dict] = []
        self._activations: list[dict] = []
        self._inputs: dict | None = None
        self.input_stats: list[dict] = []
        self._loss_checked: Counter = Counter()  # sampled calls inspected, per loss function
        self._loss_flags: dict[str, dict] = {}  # kind of miswiring -> first finding, count, last step
        self.loss_calls: Counter = Counter()
        self.label_counts: Counter = Counter()
        self.target_moments = [0.0, 0.0, 0.0]  # n, Σy, Σy² of regression targets
        self.initial_loss: dict | None = None
        self.batch_size: int | None = None
        self.grad_params: dict[int, torch.Tensor] = {}  # parameters of the roots that had a gradient
        self._handles: list = []
        self._window_handles: list = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._started = time.monotonic()
        self.error: str | None = None

    # -- install / remove ------------------------------------------------------------------------------
    def install(self) -> "PassiveWatcher":
        """Register the global hooks and patches; only one session at a time."""
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a stepaudit doctor session is already running in this process")
        _ACTIVE = self
        self._started = time.monotonic()
        self._handles = [_optim.register_optimizer_step_pre_hook(self._step_pre),
                         _optim.register_optimizer_step_post_hook(self._step_post)]
        self._open_window()
        self._patch(torch.autograd, "backward", _backward_wrapper)
        for name in _ACTIVATIONS:
            self._patch(torch, name, _activation_wrapper)
        for name in _LOSSES:
            self._patch(F, name, _loss_wrapper)
        return self

    def _patch(self, owner: Any, name: str, make: Callable) -> None:
        original = getattr(owner, name)
        self._patches.append((owner, name, original))
        setattr(owner, name, make(name, original))

    def close(self) -> None:
        """Remove every hook, restore every patch, settle the records (idempotent)."""
        global _ACTIVE
        self._close_window()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches = []
        if _ACTIVE is self:
            _ACTIVE = None
        self._settle_losses()

    def _open_window(self) -> None:
        """Global module forward hooks, only while a sampled step's forward may run (they cost per call)."""
        if not self._window_handles:
            self._window_handles = [_module.register_module_forward_pre_hook(self._forward_pre),
                                    _module.register_module_forward_hook(self._forward_post)]
        self.window = True

    def _close_window(self) -> None:
        for handle in self._window_handles:
            handle.remove()
        self._window_handles = []
        self.window = False
        self._depth = 0

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
        loss = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) == 1 else tensors
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._since_step.append(loss.detach())
        self.backward_count += 1
        self._backwards_since_step += 1
        for state in self.optimizers:
            if state.zero_watch is not None and any(state.zero_watch["kept"]):
                self._zero_check(state)
        if self.step_count == 0 and self.max_steps is not None and self.backward_count > self.max_steps:
            self.stopping = "max_steps"  # backward passes but never an optimizer step: enough seen
            raise StopRun(self.stopping)

    @torch.no_grad()
    def _zero_check(self, state: _Optimizer) -> None:
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
        if present:
            norms = torch._foreach_norm([_dense(state.params[i].grad).detach() for i in present])
            for i, nonzero in zip(present, _nonzero(norms)):
                kept[i] = nonzero

    def _finish_zero_check(self, state: _Optimizer) -> None:
        """At the optimizer's next step: record the share of gradients never cleared since its last step."""
        watch, state.zero_watch = state.zero_watch, None
        if watch is None or watch["backwards"] == 0 or watch["had"] == 0:
            return  # no backward in between (closure optimizers evaluate inside step): nothing to judge
        self.zero_checks.append({"step": watch["step"], "optimizer": state.index,
                                 "kept": sum(watch["kept"]) / watch["had"], "backwards": watch["backwards"]})

    # -- optimizer steps -------------------------------------------------------------------------------
    def _register(self, optimizer: torch.optim.Optimizer) -> _Optimizer:
        params, groups = [], []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                params.append(p)
                groups.append(g)
        state = _Optimizer(len(self.optimizers), optimizer, params, groups)
        state.ever_grad = [False] * len(params)
        self.optimizers.append(state)
        self._by_id[id(optimizer)] = state
        return state

    def _step_pre(self, optimizer, args, kwargs):
        self._check_stop()
        state = self._by_id.get(id(optimizer)) or self._register(optimizer)
        self._finish_zero_check(state)
        self._close_activations()
        self._depth = 0
        self._in_step = True
        state.pending = {"losses": self._since_step, "backwards": self._backwards_since_step}
        self._since_step, self._backwards_since_step = [], 0
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if not sampled(state.local_step, self.every) or not state.params:
            if closure is not None:
                return self._wrap_closure(state, args, kwargs, closure, snapshot=False)
            return None
        try:
            state.pending["before"] = _copies([p.detach() for p in state.params])
        except Exception as error:  # odd parameters (several devices…): record, never break training
            state.pending["error"] = f"{type(error).__name__}: {error}"
            return None
        if state.local_step < 5 or state.local_step % (5 * self.every) < 2:
            self._note_gradients()
        if closure is not None:
            return self._wrap_closure(state, args, kwargs, closure, snapshot=True)
        state.pending["grad"] = _grad_copies(state.params)
        return None

    def _wrap_closure(self, state: _Optimizer, args, kwargs, closure, snapshot: bool):
        """Closure optimizers (LBFGS): the first evaluation gives the loss and the gradient."""

        def first_call_recorded():
            loss = closure()
            if "closure_loss" not in state.pending:
                state.pending["closure_loss"] = loss.detach() if isinstance(loss, torch.Tensor) else loss
                if snapshot:
                    state.pending["grad"] = _grad_copies(state.params)
            return loss

        if len(args) > 1:
            return (args[0], first_call_recorded, *args[2:]), kwargs
        return args, {**kwargs, "closure": first_call_recorded}

    def _note_gradients(self) -> None:
        """Which of the model's parameters carry a gradient (for parameters no optimizer holds)."""
        for root in list(self.roots.values()):
            for p in root.parameters():
                if p.requires_grad and p.grad is not None:
                    self.grad_params[id(p)] = p

    def _step_post(self, optimizer, args, kwargs):
        state = self._by_id[id(optimizer)]
        self._in_step = False
        local, index = state.local_step, self.step_count
        state.local_step += 1
        self.step_count += 1
        pending = state.pending
        losses = pending.get("losses") or []
        if not losses and pending.get("closure_loss") is not None:
            losses = [pending["closure_loss"]]
        record = {"step": index, "optimizer": state.index, "local_step": local,
                  "lr": _group_lr(optimizer), "backward_passes": pending.get("backwards", 0),
                  "_losses": losses}
        if self.zero_checks and self.zero_checks[-1]["optimizer"] == state.index and self.zero_checks[-1].get("next") is None:
            self.zero_checks[-1]["next"] = index
            record["grads_kept"] = self.zero_checks[-1]["kept"]
        if sampled(local, self.every):
            self._note_lrs(state)
        if "error" in pending:
            record["capture_error"] = pending["error"]
        elif "before" in pending and "grad" in pending:
            try:
                self._measure(state, record, pending)
            except Exception as error:  # never break training
                record["capture_error"] = f"{type(error).__name__}: {error}"
        if self._activations:
            self._summarize_activations(record)
        if self._inputs is not None:
            record.update({f"input_{k}": v for k, v in self._inputs.items() if k != "step"})
            self._inputs = None
        state.pending = {"record_step": index}
        self.records.append(record)
        if self.flush is not None and len(self.records) - self._flushed >= 25:
            self._flush()
        if any(sampled(s.local_step, self.every) for s in self.optimizers):
            self._open_window()
        else:
            self._close_window()
        if self.max_steps is not None and self.step_count >= self.max_steps:
            self.stopping = "max_steps"
        self._check_stop()

    def _note_lrs(self, state: _Optimizer) -> None:
        """Track each group's largest learning rate (a schedule may end at 0; a zero lr throughout is a fault)."""
        lrs = []
        for group in state.optimizer.param_groups:
            try:
                lrs.append(float(group.get("lr", math.nan)))
            except (TypeError, ValueError):
                lrs.append(math.nan)
        if len(state.max_lr) != len(lrs):
            state.max_lr = lrs
        else:
            state.max_lr = [max(a, b) if b == b else a for a, b in zip(state.max_lr, lrs)]

    @torch.no_grad()
    def _measure(self, state: _Optimizer, record: dict, pending: dict) -> None:
        """Norms, ratios, g·Δw and per-layer rows of a sampled step (vocabulary of DESIGN.md)."""
        before, grad = pending["before"], pending["grad"]
        delta = torch._foreach_sub([p.detach() for p in state.params], before)
        sums = _parameter_sums(before, grad, delta)
        if state.names is None or len(state.names) != len(state.params) or self._names_stale(state):
            self._name(state)
        rows, totals = layer_rows(state.names, state.modules, state.groups, sums)
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
        previous = state.prev_grad
        if previous is not None and previous[0] == record["local_step"] - 1:
            dot = float(torch.stack([_dot(a, b) for a, b in zip(previous[1], grad)]).sum())
            denominator = math.sqrt(previous[2] * sum(g2))
            record["grad_cos_prev"] = dot / denominator if denominator > 0 else math.nan
        state.prev_grad = (record["local_step"], grad, sum(g2)) if sampled(record["local_step"] + 1, self.every) else None
        if self.batch_size is not None:
            record["batch_size"] = self.batch_size

    def _names_stale(self, state: _Optimizer) -> bool:
        return any(n.startswith("param") for n in state.names) and bool(self.roots)

    def _prefixed_roots(self) -> list[tuple[torch.nn.Module, str]]:
        """Root modules with parameters, largest first, each with the prefix its names get."""
        roots = sorted(self.roots.values(), key=lambda m: -sum(p.numel() for p in m.parameters()))
        with_params = [r for r in roots if any(True for _ in r.parameters())]
        return [(r, f"{type(r).__name__}." if len(with_params) > 1 else "") for r in with_params]

    def weight_layers(self) -> list[str]:
        """Names (as in the layer rows) of modules holding a weight matrix/kernel, embeddings excluded."""
        names: list[str] = []
        for root, prefix in self._prefixed_roots():
            for name, module in root.named_modules():
                weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
                if weight is not None and weight.dim() >= 2 and not isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                    full = prefix + name if name else prefix.rstrip(".") or "(root)"
                    if full not in names:
                        names.append(full)
        return names

    def _name(self, state: _Optimizer) -> None:
        """Parameter names from the model's root modules (the ones called at depth 0)."""
        known: dict[int, str] = {}
        for root, prefix in self._prefixed_roots():
            for name, p in root.named_parameters():
                known.setdefault(id(p), prefix + name)
        state.names = [known.get(id(p), f"param{i}") for i, p in enumerate(state.params)]
        state.modules = [n.rsplit(".", 1)[0] if "." in n else "(root)" for n in state.names]

    # -- forward statistics ------------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        if self._depth == 0:
            self._close_activations()
            self.roots.setdefault(id(module), module)
            self._first_layer_pending = True
        self._depth += 1
        if self._first_layer_pending and module._parameters and any(v is not None for v in module._parameters.values()):
            self._first_layer_pending = False
            if self._inputs is None and self._input_windows < 3 and args and isinstance(args[0], torch.Tensor):
                self._inputs = _input_stats(module, args[0])
                self._input_windows += self._inputs is not None
                if self._inputs is not None and self.batch_size is None and args[0].dim() >= 2:
                    self.batch_size = int(args[0].shape[0])

    def _forward_post(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        if module._parameters and any(v is not None for v in module._parameters.values()):
            self._param_calls += 1

    def on_activation(self, kind: str, output: Any) -> None:
        """Share of dead (ReLU) or saturated (sigmoid/tanh) units of one activation call."""
        if not (self.window and isinstance(output, torch.Tensor) and output.is_floating_point()):
            return
        if output.dim() < 2 or output.shape[0] < 2 or len(self._open_activations) >= MAX_ACTIVATION_ROWS:
            return
        with torch.no_grad():
            if kind == "relu":
                if output.shape[0] < MIN_DEAD_BATCH:
                    return
                alive = output.detach().flatten(1).amax(0) > 0
                units = alive.numel()
                share = 1.0 - int(torch.count_nonzero(alive)) / units
            elif kind == "sigmoid":
                share, units = float(((output < 0.01) | (output > 0.99)).float().mean()), output[0].numel()
            else:
                share, units = float((output.abs() > 0.99).float().mean()), output[0].numel()
        self._open_activations.append({"kind": kind, "share": share, "units": units, "after": self._param_calls,
                                       "batch": int(output.shape[0])})

    def _close_activations(self) -> None:
        """An activation is hidden when a parametrised layer ran after it (it feeds the network, not the loss)."""
        for row in self._open_activations:
            row["hidden"] = self._param_calls > row["after"]
            self._activations.append(row)
        self._open_activations = []

    def _summarize_activations(self, record: dict) -> None:
        self._close_activations()
        rows, self._activations = self._activations, []
        for kind, key in (("relu", "dead_relu"), ("saturating", "saturated")):
            chosen = [r for r in rows if r["hidden"] and (r["kind"] == "relu") == (kind == "relu")]
            if not chosen:
                continue
            units = sum(r["units"] for r in chosen)
            record[f"{key}_share"] = sum(r["share"] * r["units"] for r in chosen) / units
            record[f"{key}_max"] = max(r["share"] for r in chosen)
            record[f"{key}_layers"] = len(chosen)

    # -- losses --------------------------------------------------------------------------------------------
    def on_loss(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        """What a loss function received: probabilities where it expects logits, shapes that broadcast…"""
        self.loss_calls[name] += 1
        step = self.step_count
        if not self.window or not (step < 5 or step % (5 * self.every) < 2):  # a few windows suffice
            return
        x = _tensor_arg(args, kwargs, 0, "input")
        y = _tensor_arg(args, kwargs, 1, "target")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        grad_enabled = torch.is_grad_enabled()
        with torch.no_grad():
            check = _loss_check(name, x.detach(), y)
            self._loss_checked[name] += 1
            if check is not None:
                seen = self._loss_flags.setdefault(check["kind"], {**check, "step": self.step_count, "loss": name,
                                                                   "count": 0})
                seen["count"] += 1
                seen["last_step"] = self.step_count
            if isinstance(y, torch.Tensor):
                self._note_targets(name, x, y, kwargs)
            if (self.initial_loss is None and grad_enabled and x.requires_grad
                    and isinstance(output, torch.Tensor) and output.numel() == 1):
                classes = int(x.shape[1]) if name == "cross_entropy" and x.dim() >= 2 else (
                    int(x.shape[0]) if name == "cross_entropy" else None)
                self.initial_loss = {"loss": name, "value": float(output), "classes": classes,
                                     "step": self.step_count}
            if self.batch_size is None and x.dim() >= 1:
                self.batch_size = int(x.shape[0])

    def _note_targets(self, name: str, x: torch.Tensor, y: torch.Tensor, kwargs: dict) -> None:
        if name in ("cross_entropy", "nll_loss") and not y.is_floating_point():
            ignore = kwargs.get("ignore_index", -100)
            values = y.reshape(-1)
            values = values[values != ignore]
            if values.numel():
                counts = torch.bincount(values.clamp_min(0).cpu())
                self.label_counts.update({i: int(c) for i, c in enumerate(counts.tolist()) if c})
        elif name in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
            positives = float(y.detach().float().sum())
            self.label_counts.update({1: positives, 0: y.numel() - positives})
        elif name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss") and y.is_floating_point():
            t = y.detach().double()
            self.target_moments[0] += t.numel()
            self.target_moments[1] += float(t.sum())
            self.target_moments[2] += float((t * t).sum())

    # -- results ---------------------------------------------------------------------------------------------
    def _settle_losses(self) -> None:
        """Turn the kept loss tensors into floats (one sync per step, at the end or at a flush)."""
        for record in self.records:
            losses = record.pop("_losses", None)
            if losses is None:
                continue
            values = []
            for loss in losses:
                try:
                    values.append(float(loss))
                except (TypeError, ValueError, RuntimeError):
                    continue
            record["loss_before"] = sum(values) if values else math.nan

    def _flush(self) -> None:
        self._settle_losses()
        try:
            self.flush(self.records[self._flushed:])
            self._flushed = len(self.records)
        except Exception as error:  # a store problem never breaks the script
            self.error = f"writing the run store failed: {error}"
            self.flush = None

    def finish(self) -> None:
        """Write what is left to the store (call after ``close``)."""
        if self.flush is not None and len(self.records) > self._flushed:
            self._flush()

    def observations(self) -> dict:
        """Run-level facts the rules read (JSON-friendly), alongside the per-step records."""
        trainable, orphans = self._orphans()
        n, s1, s2 = self.target_moments
        return {
            "mode": "passive",
            "steps": self.step_count,
            "backward_passes": self.backward_count,
            "optimizers": [self._describe(state) for state in self.optimizers],
            "zero_checks": self.zero_checks,
            "loss_findings": self.loss_findings(),
            "loss_calls": dict(self.loss_calls),
            "initial_loss": self.initial_loss,
            "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())},
            "target_variance": (s2 / n - (s1 / n) ** 2) if n > 1 else None,
            "batch_size": self.batch_size,
            "trainable_numel": trainable,
            "orphan_params": orphans,
            "weight_layers": self.weight_layers(),
            "models": sorted({type(m).__name__ for m in self.roots.values() if any(True for _ in m.parameters())}),
            "elapsed_s": self.elapsed(),
        }

    def loss_findings(self) -> list[dict]:
        """Miswirings seen at (nearly) every inspected call of their loss function, not once by chance."""
        found = []
        for kind, seen in self._loss_flags.items():
            checked = self._loss_checked[seen["loss"]]
            if seen["count"] < 0.9 * checked:
                continue
            if kind == "probabilities_into_bce_with_logits" and (seen["count"] < 3 or seen["last_step"] < 10):
                continue  # logits of an untrained model can all fall in (0, 1); trained ones leave it
            found.append({**seen, "checked": checked})
        return found

    def _describe(self, state: _Optimizer) -> dict:
        names = state.names or [f"param{i}" for i in range(len(state.params))]
        no_grad = [i for i, p in enumerate(state.params) if not state.ever_grad[i]]
        return {
            "index": state.index, "optimizer": type(state.optimizer).__name__,
            "param_groups": optimizer_groups(state.optimizer), "steps": state.local_step, "max_lr": state.max_lr,
            "numel": sum(p.numel() for p in state.params),
            "sampled_steps": sum(sampled(s, self.every) for s in range(state.local_step)),
            "frozen": [{"name": names[i], "numel": state.params[i].numel()} for i, p in enumerate(state.params)
                       if not p.requires_grad][:50],
            "no_grad": [{"name": names[i], "numel": state.params[i].numel()} for i in no_grad
                        if state.params[i].requires_grad][:50],
            "no_grad_numel": sum(state.params[i].numel() for i in no_grad if state.params[i].requires_grad),
        }

    def _orphans(self) -> tuple[int, list[dict]]:
        """Trainable parameters of the model that had a gradient but belong to no optimizer."""
        held = {id(p) for state in self.optimizers for p in state.params}
        names: dict[int, str] = {}
        trainable = 0
        seen: set[int] = set()
        for root, prefix in self._prefixed_roots():
            for name, p in root.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                names[id(p)] = prefix + name
                trainable += p.numel() if p.requires_grad else 0
        orphans = [{"name": names.get(key, "?"), "numel": p.numel()} for key, p in self.grad_params.items()
                   if key not in held]
        return trainable, orphans


# -- module-level wrappers (they look up the active session at call time) -----------------------------------
def _backward_wrapper(name: str, original: Callable) -> Callable:
    def backward(tensors, *args, **kwargs):
        watcher = _ACTIVE
        if watcher is not None:
            watcher.on_backward(tensors)
        return original(tensors, *args, **kwargs)

    backward.__wrapped__ = original
    backward.__doc__ = original.__doc__
    return backward


def _activation_wrapper(name: str, original: Callable) -> Callable:
    kind = _ACTIVATIONS[name]

    def activation(*args, **kwargs):
        output = original(*args, **kwargs)
        watcher = _ACTIVE
        if watcher is not None and watcher.window:
            watcher.on_activation(kind, output)
        return output

    activation.__wrapped__ = original
    activation.__doc__ = original.__doc__
    return activation


def _loss_wrapper(name: str, original: Callable) -> Callable:
    def loss(*args, **kwargs):
        output = original(*args, **kwargs)
        watcher = _ACTIVE
        if watcher is not None:
            watcher.on_loss(name, args, kwargs, output)
        return output

    loss.__wrapped__ = original
    loss.__doc__ = original.__doc__
    return loss


# -- helpers ----------------------------------------------------------------------------------------------------
def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def _copies(tensors: list) -> list:
    """Copies of the tensors in one fused call (per device and dtype)."""
    return torch._foreach_mul(tensors, 1.0) if tensors else []


def _grad_copies(params: list) -> list:
    return _copies([_dense(p.grad).detach() if p.grad is not None else torch.zeros_like(p) for p in params])


def _nonzero(norms: list) -> list[bool]:
    """Which norms are nonzero, with one host sync when they share a device."""
    try:
        return torch.stack(norms).ne(0).tolist()
    except RuntimeError:  # several devices
        return [bool(n.ne(0)) for n in norms]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1)).double()


def _parameter_sums(before: list, grad: list, delta: list) -> list[list[float]]:
    """Rows [g·Δw, ‖g‖², ‖Δw‖², ‖w‖²] per parameter (fused norms; one host sync for the model)."""
    if not before:
        return []
    norms = [torch.stack(torch._foreach_norm(ts)).double().pow(2) for ts in (grad, delta, before)]
    dots = torch.stack([_dot(g, d) for g, d in zip(grad, delta)])
    return torch.stack([dots, *norms], dim=1).tolist()


def _group_lr(optimizer: torch.optim.Optimizer) -> float:
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


@torch.no_grad()
def _input_stats(module: torch.nn.Module, x: torch.Tensor) -> dict | None:
    """Scale of the first parametrised layer's input, per feature (LeCun et al. 1998, "Efficient BackProp" §4.3)."""
    layer = type(module).__name__
    if not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 2 or isinstance(module, torch.nn.Embedding):
        return None
    if isinstance(module, _NORMALIZING):
        return {"layer": layer, "normalized": True}
    flat = x.detach().flatten(1).double()
    finite = bool(torch.isfinite(flat).all())
    if not finite:
        return {"layer": layer, "nonfinite": True}
    feature_rms = flat.pow(2).mean(0).sqrt()
    std = flat.std(0)
    return {
        "layer": layer,
        "rms": float(flat.pow(2).mean().sqrt()),
        "feature_rms_median": float(feature_rms.median()),
        "feature_rms_max": float(feature_rms.max()),
        "feature_std_median": float(std.median()),
        "mean_abs": float(flat.mean(0).abs().mean()),
    }


def _loss_check(name: str, x: torch.Tensor, y: Any) -> dict | None:
    """A loss wired to the wrong kind of input, with the measured numbers."""
    if name in ("cross_entropy", "nll_loss") and x.dim() >= 2 and x.shape[1] >= 2:
        low, high = (float(v) for v in torch.aminmax(x))
        row_sum = x.sum(1) if low >= 0 and high <= 1 else None
        probabilities = row_sum is not None and float((row_sum - 1).abs().max()) < 1e-3
        lse = torch.logsumexp(x.float(), 1) if high <= 0 or name == "nll_loss" else None
        log_probabilities = high <= 0 and lse is not None and float(lse.abs().max()) < 1e-3
        if name == "cross_entropy" and probabilities:
            return {"kind": "probabilities_into_cross_entropy", "row_sum": float(row_sum.mean()),
                    "classes": int(x.shape[1])}
        if name == "cross_entropy" and log_probabilities:
            return {"kind": "log_probabilities_into_cross_entropy", "logsumexp": float(lse.abs().max())}
        if name == "nll_loss" and not log_probabilities:
            return {"kind": "scores_into_nll_loss", "logsumexp": float(lse.mean()), "max": high,
                    "probabilities": probabilities}
    if name == "binary_cross_entropy_with_logits" and x.numel() >= 8:
        if bool((x > 0).all() and (x < 1).all()):
            return {"kind": "probabilities_into_bce_with_logits", "min": float(x.min()), "max": float(x.max())}
    if name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss") and isinstance(y, torch.Tensor):
        if tuple(x.shape) != tuple(y.shape):
            return {"kind": "broadcast_shapes", "input_shape": list(x.shape), "target_shape": list(y.shape)}
    return None

"""``stepaudit lr-find script.py [args…]``: the range test on an unchanged script's own model, optimizer and batches.

The script runs in-process under the doctor's passive watcher (``doctor.runner.run_script``), subclassed to
also keep, for each training forward, what re-evaluates its loss: the root module's positional forward
inputs (copied), how the loss function's input comes from the module's output (itself, one of its items, or
a reshape of it) and the ``torch.nn.functional`` loss call (name, target, other arguments). At the script's
first ``optimizer.step()`` the optimizer and the model (the root module holding its parameters) are known
and everything ``lr_find`` restores is snapshotted (``lrfind.Snapshot``). The script then goes on training as
usual while its next batches are kept, up to ``num`` in all; the doctor's ``StopRun`` then stops it cleanly,
the model, optimizer and random streams go back to the snapshot (the first step's state), the first batch's
loss is re-evaluated and must equal the loss the script backpropagated (else the script's loss is not that
loss call on the model's output and nothing is guessed), and ``lr_find`` runs on those batches. A script that
ends, or hits ``time_limit``, sooner gives fewer batches: the sweep re-uses them cyclically and says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .doctor.passive import PassiveWatcher, StopRun
from .doctor.runner import Outcome, run_script
from .lrfind import Snapshot, lr_find, lr_grid
from .lrfind_result import LRFindResult
from .state import AutocastState, RngState, cuda_devices, preserved

MAX_BYTES = 1 << 30  # batches kept, all copies together, at most (then the sweep re-uses them)
MATCH_RTOL = 1e-4  # the re-evaluated first loss against the one the script backpropagated


class ScriptError(Exception):
    """The script cannot be range-tested; the message names the fix (``status``: the exit status)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Batch:
    """One training forward and loss call of the script, enough to evaluate its loss again."""

    args: tuple  # the root module's positional forward inputs (tensors copied)
    pick: tuple  # how the loss input comes from the output: () itself, ("item", i), ("key", k), ("reshape", shape)
    loss: str  # the torch.nn.functional loss
    target: Any
    loss_args: tuple = ()
    loss_kwargs: dict = field(default_factory=dict)
    value: float | None = None  # the loss the script backpropagated
    rng: RngState | None = None  # where its forward started (first step only: the check replays it)
    autocast: AutocastState = field(default_factory=AutocastState)  # the autocast regions of its forward


def replay_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The script's loss of ``batch`` at the model's current weights (a ``loss_fn`` for ``lr_find``)."""
    with batch.autocast.entered():
        x = model(*batch.args)
        for kind, key in batch.pick:
            x = x.reshape(key) if kind == "reshape" else x[key]
        return getattr(F, batch.loss)(x, batch.target, *batch.loss_args, **batch.loss_kwargs)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value) if type(value) in (tuple, list) else value
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _pick_of(output: Any, x: Any) -> tuple | None:
    """How ``x`` (the loss function's input) comes from the module's ``output``; None if it does not."""
    candidates: list[tuple[tuple, Any]] = [((), output)]
    if isinstance(output, (tuple, list)):
        candidates += [((("item", i),), v) for i, v in enumerate(output)]
    elif isinstance(output, dict):
        candidates += [((("key", k),), v) for k, v in output.items()]
    for path, value in candidates:
        if value is x:
            return path
    if not isinstance(x, torch.Tensor):
        return None
    for path, value in candidates:  # a reshaped view (logits.view(-1, V), out.squeeze(1))
        if (
            isinstance(value, torch.Tensor)
            and value.numel() == x.numel()
            and value.data_ptr() == x.data_ptr()
            and value.is_contiguous()
            and x.is_contiguous()
        ):
            return (*path, ("reshape", tuple(x.shape)))
    return None


class CaptureWatcher(PassiveWatcher):
    """The doctor's passive watcher, keeping each training forward's batch and stopping once it has ``num``."""

    def __init__(self, num: int, time_limit: float | None = None, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(max_steps=None, time_limit=time_limit)
        self.num, self.max_bytes = num, max_bytes
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.snapshot: Snapshot | None = None
        self.batches: list[tuple[torch.nn.Module, Batch]] = []
        self.bytes = 0
        self.steps = 0  # steps of the chosen optimizer
        self.full = ""  # why collecting stopped early ("" while it goes on)
        self.problem: str | None = None  # why the script cannot be range-tested (first reason found)
        self._call: list | None = None  # [module, args, rng, output, autocast] of the current root forward
        self._loss: tuple | None = None  # (name, pick, target, other args, kwargs) of the last loss call
        self._unmatched = ""  # a loss call whose input did not come from the module's output, as said

    # -- capture ---------------------------------------------------------------------------------------------
    def _forward_pre(self, module, args):
        if self._depth == 0 and not self.full and torch.is_grad_enabled() and self._candidate(module):
            rng = RngState.capture(cuda_devices(module), host=True) if self.optimizer is None else None
            self._call = [module, args, rng, None, AutocastState.capture()]
            self._loss = None  # a loss call belongs to the forward before it
        return super()._forward_pre(module, args)

    def _candidate(self, module: torch.nn.Module) -> bool:
        if self.model is not None:
            return module is self.model
        return next(module.parameters(), None) is not None and type(module).__name__ != "OptimizedModule"

    def _forward_post(self, module, args, output):
        super()._forward_post(module, args, output)
        if self._call is not None and module is self._call[0] and self._depth == 0:
            self._call[3] = output

    def on_loss(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        """The loss call, with how its input comes from the current root forward's output."""
        super().on_loss(name, args, kwargs, output)
        if self._call is None or self._call[3] is None or not torch.is_grad_enabled():
            return
        rest = dict(kwargs)
        x = args[0] if args else rest.pop("input", None)
        target = args[1] if len(args) > 1 else rest.pop("target", None)
        pick = _pick_of(self._call[3], x)
        self._loss = None if pick is None else (name, pick, target, tuple(args[2:]), rest)
        if pick is None and not self._unmatched:
            self._unmatched = (
                f" (the input of F.{name} was not {type(self._call[0]).__name__}'s output, an item or a reshape of it)"
            )

    def on_backward(self, tensors: Any) -> None:
        """Keep the batch of this backward (its forward and loss call) with the loss it backpropagates."""
        before = len(self._since_step)
        super().on_backward(tensors)
        call, loss, self._call, self._loss = self._call, self._loss, None, None
        if self.full or call is None or loss is None or call[3] is None:
            return
        value = float(self._since_step[-1]) if len(self._since_step) > before else None
        name, pick, target, rest_args, rest_kwargs = loss
        batch = Batch(_copy(call[1]), pick, name, _copy(target), rest_args, rest_kwargs, value, call[2], call[4])
        self.bytes += _nbytes(batch.args) + _nbytes(batch.target)
        self.batches.append((call[0], batch))
        if self.bytes > self.max_bytes:
            self.full = f"the kept batches reached {self.max_bytes / 2**30:.3g} GiB"

    def _close_window(self, force: bool = False) -> None:
        if force or self.full:  # while collecting, every step's forward is watched, not only sampled ones
            super()._close_window(force)

    # -- the first step, then enough batches ---------------------------------------------------------------------
    def _step_pre(self, optimizer, args, kwargs):
        try:
            self._on_step(optimizer, args, kwargs)
        except StopRun:
            raise
        except Exception as error:  # never swallowed as a capture error: it decides what lr-find can do
            self._stop(f"stepaudit could not capture the script's step: {type(error).__name__}: {error}")
        return super()._step_pre(optimizer, args, kwargs)

    def _stop(self, problem: str | None = None) -> None:
        if problem is not None and self.problem is None:
            self.problem = problem
        self.stopping = "lr_find"
        raise StopRun(self.stopping)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.optimizer is None:
            self._first_step(optimizer, args, kwargs)
        if optimizer is not self.optimizer:
            return
        self.steps += 1
        kept = sum(1 for module, _ in self.batches if module is self.model)
        if kept >= self.num:
            self.full = self.full or f"{self.num} batches kept"
        if self.full:
            self._stop()

    def _first_step(self, optimizer, args, kwargs) -> None:
        self.optimizer = optimizer
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        name = type(optimizer).__name__
        if closure is not None:
            self._stop(
                f"the script steps {name} with a closure; the range test takes one plain step per lr: "
                "use an optimizer stepped as optimizer.step() (SGD, Adam…)"
            )
        params = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
        owners = [m for m, _ in self.batches if params <= {id(p) for p in m.parameters()}]
        if not owners and self.batches:
            self._stop(
                f"{name} holds parameters outside {type(self.batches[-1][0]).__name__}, the module whose output "
                "goes into the loss; lr-find tests one model's optimizer: call "
                "stepaudit.lr_find(model, optimizer, loss_fn, batches) in the script with a loss_fn over all of them"
            )
        if not owners:
            self._stop(
                f"before the first {name}.step() stepaudit saw no model forward whose output goes into a "
                f"torch.nn.functional loss{self._unmatched}; lr-find needs loss = <loss>(model(inputs), target) "
                "(nn.CrossEntropyLoss, F.mse_loss…), or call stepaudit.lr_find(model, optimizer, loss_fn, batches) "
                "in the script"
            )
        self.model = owners[-1]
        self.batches = [(m, b) for m, b in self.batches if m is self.model]
        self.snapshot = Snapshot(self.model, optimizer)


@dataclass
class ScriptRun:
    """What ``find_in_script`` measured: the result, and where its model, optimizer and batches came from."""

    result: LRFindResult
    model: str
    optimizer: str
    batches: str  # how the batches were obtained, as printed
    loss: str  # the loss call re-evaluated, e.g. F.cross_entropy(model(inputs), target)
    outcome: Outcome


def _describe_failure(outcome: Outcome) -> str:
    failure = outcome.failure or {}
    where = f" ({os.path.basename(str(failure['file']))}:{failure['line']})" if failure.get("file") else ""
    message = " ".join(str(failure.get("message", "")).split())
    return f"{failure.get('type', 'error')}: {message}{where}" if failure else (outcome.error or "an error")


def _check_first(model: torch.nn.Module, batch: Batch, loss: str) -> None:
    """The first batch's loss, evaluated again at the first step's weights, must be the script's own."""
    if batch.value is None:
        return
    try:
        with preserved(model, batch.rng, None), torch.no_grad():
            value = float(replay_loss(model, batch))
    except Exception as error:
        raise ScriptError(
            f"evaluating the first batch's loss again failed ({type(error).__name__}: {error}); a model called "
            "with keyword inputs is not replayed (torch's global forward hooks do not see them): call "
            "stepaudit.lr_find(model, optimizer, loss_fn, batches) in the script"
        ) from None
    if not (abs(value - batch.value) <= MATCH_RTOL * max(1.0, abs(batch.value))):
        raise ScriptError(
            f"the loss the script backpropagated ({batch.value:.6g}) is not F.{loss} of the model's output "
            f"({value:.6g} evaluated again): another term or a transformed output; call "
            "stepaudit.lr_find(model, optimizer, loss_fn, batches) in the script with its real loss"
        )


def find_in_script(
    script: str | os.PathLike,
    args: list[str],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num: int = 100,
    seed: int = 0,
    time_limit: float | None = None,
) -> ScriptRun:
    """Run ``script`` to its first optimizer step, keep ``num`` of its batches, and range-test from that step."""
    try:
        lr_grid(float(start_lr), float(end_lr), num)
    except ValueError as error:
        raise ScriptError(str(error), status=2) from None
    watcher = CaptureWatcher(num, time_limit)
    try:
        outcome = run_script(script, list(args), watcher)
    except FileNotFoundError as error:
        raise ScriptError(str(error), status=2) from None
    if watcher.problem is not None:
        raise ScriptError(watcher.problem)
    if watcher.optimizer is None:
        if outcome.stopped == "error":
            raise ScriptError(
                f"the script failed before its first optimizer.step(): {_describe_failure(outcome)}; "
                f"fix the script (python {script} shows the traceback)"
            )
        raise ScriptError(
            f"the script {'ran out of time' if outcome.stopped == 'time_limit' else 'ended'} without calling "
            f"optimizer.step() ({watcher.backward_count} backward passes); lr-find needs a script that trains "
            "with a torch.optim optimizer"
        )
    model, optimizer, snapshot = watcher.model, watcher.optimizer, watcher.snapshot
    batches = [b for _, b in watcher.batches]
    snapshot.restore()
    _check_first(model, batches[0], batches[0].loss)
    for b in batches:
        b.rng, b.value = None, None
    try:
        result = lr_find(model, optimizer, replay_loss, batches, start_lr=start_lr, end_lr=end_lr, num=num, seed=seed)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ScriptError(f"the range test refused the script's model and optimizer: {error}") from None
    return ScriptRun(
        result,
        f"{type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)",
        f"{type(optimizer).__name__} (lr {optimizer.param_groups[0].get('lr', math.nan):.3g})",
        _label(len(batches), num, watcher, outcome),
        f"F.{batches[0].loss}",
        outcome,
    )


def _label(count: int, num: int, watcher: CaptureWatcher, outcome: Outcome) -> str:
    """How the batches were obtained, e.g. "the script's own first 100 training batches (…)"."""
    text = f"the script's own first {count} training batches"
    back = "then its model, optimizer and RNG went back to the first step"
    if count >= num:
        return text + f" (kept while it trained as usual; {back})"
    why = watcher.full or (
        f"the script failed after {watcher.steps} steps: {_describe_failure(outcome)}"
        if outcome.stopped == "error"
        else f"the time limit came after {watcher.steps} steps"
        if outcome.stopped == "time_limit"
        else f"the script ended after {watcher.steps} steps"
    )
    return text + f", re-used cyclically for {num} lrs ({why}; {back})"


def header(script: str, run: ScriptRun) -> str:
    """The lines printed above the summary: what was tested, from which step, on which batches."""
    return (
        f"{script}: {run.model}, {run.optimizer}, loss {run.loss}, from the script's first optimizer step\n"
        f"batches: {run.batches}"
    )

"""StepContext: everything one audited step's probes may need, each computed at most once.

It owns the "never change training" rule: every re-evaluation replays the RNG state of the
training forward (same dropout masks), runs under the same autocast, and restores the RNG streams,
buffers (BatchNorm running statistics) and train/eval flags afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from .state import AutocastState, RngState, preserved, without_grad


def group_lr(group: dict) -> float:
    """A parameter group's learning rate as a float; NaN when it is not one number (Adafactor's relative step: None)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.numel() == 1 else float("nan")
    if lr is None or isinstance(lr, (bool, str, bytes)):  # float("0.1") parses: not a number torch accepts
        return float("nan")
    try:
        return float(lr)  # int, float, NumPy scalars and 0-d arrays
    except (TypeError, ValueError):
        return float("nan")


class _Objective(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can substitute its weights."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def check_scalar_loss(loss: Any) -> torch.Tensor:
    """Refuse a ``loss_fn`` result that is not a scalar tensor, naming the fix."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn(model, batch) must return a scalar tensor, got {type(loss).__name__}; "
            "return the loss tensor itself (not loss.item())"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn(model, batch) must return a scalar, got shape {tuple(loss.shape)}; "
            "reduce it, e.g. F.cross_entropy(..., reduction='mean') or loss.mean()"
        )
    return loss


@dataclass
class Part:
    """One forward of the step's objective: a (micro-)batch and the RNG state its training forward saw."""

    batch: Any
    rng: RngState | None


@dataclass
class StepContext:
    """Shared, lazily computed quantities of one audited step. Probes read; they never write training state."""

    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    parts: list[Part]
    autocast: AutocastState
    names: list[str]  # audited parameters, optimizer order
    params: list[torch.Tensor]
    before: list[torch.Tensor]  # weights before the step
    # gradient the optimizer received (zeros where .grad was None); None on a step no probe reads it, where
    # the audit reads the live .grad after the step instead of a copy (``FlatBuffers.borrow_grad``)
    grads: list[torch.Tensor] | None
    delta_w: list[torch.Tensor] | None = None  # set after the step
    flat_before: torch.Tensor | None = None  # the same three as single flat vectors
    flat_grad: torch.Tensor | None = None
    flat_delta_w: torch.Tensor | None = None
    options: dict = field(default_factory=dict)  # Audit options probes may read (reference data, …)
    memory: dict = field(default_factory=dict)  # the context's own flags across steps (HVP method, grad mode)
    cache: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # fields computed so far (probes may read them)
    captures: dict = field(default_factory=dict)  # what probes' captures saw of the training pass
    states: dict = field(default_factory=dict)  # each probe's state object across steps, by its state key
    amendments: dict = field(default_factory=dict)  # what the running probe wrote for the previous record
    core_fields: frozenset = frozenset()  # the fields the audit itself wrote this step (no probe may write them)

    # -- probe state -------------------------------------------------------------------------------
    def state(self, key: str, factory: Callable[[], Any]) -> Any:
        """The state object kept across steps under ``key`` (made by ``factory`` the first time)."""
        if key not in self.states:
            self.states[key] = factory()
        return self.states[key]

    def state_of(self, probe: Any) -> Any:
        """The state object of ``probe`` (a ``probes.Probe``), or None for a probe without state."""
        if probe.state is None:
            return None
        return self.state(probe.state_key or probe.name, probe.state)

    def amend_previous(self, **fields: Any) -> None:
        """Add fields to the previous step's record (known only now, e.g. ``next_delta``); the probe declares them in ``amends``."""
        self.amendments.update(fields)

    # -- evaluation -------------------------------------------------------------------------
    def loss_now(self) -> float:
        """The step's objective at the live weights, replayed (same masks), nothing left changed."""

        def evaluate() -> float:
            total = 0.0
            for part in self.parts:
                with preserved(self.model, part.rng, self.autocast):
                    total += float(check_scalar_loss(self.loss_fn(self.model, part.batch)))
            return total / len(self.parts)

        return without_grad(evaluate, self.memory)

    def objective(self) -> _Objective:
        """The cached module wrapper used for functional evaluation."""
        if "objective" not in self.cache:
            self.cache["objective"] = _Objective(self.model, self.loss_fn)
        return self.cache["objective"]

    def loss_of_params(self, batch_parts: Sequence[Part] | None = None) -> Callable[[tuple], torch.Tensor]:
        """A pure function ``params -> loss`` on the step's batch (or given parts), for autodiff.

        Buffers are passed as fresh clones on every call, so BatchNorm's in-place running-statistic
        update lands on throwaway tensors; the RNG is replayed per part and restored afterwards.
        """
        objective, names, model = self.objective(), ["model." + n for n in self.names], self.model
        parts = list(batch_parts if batch_parts is not None else self.parts)
        autocast = self.autocast

        def loss(params: tuple) -> torch.Tensor:
            buffers = {"model." + n: b.detach().clone() for n, b in model.named_buffers()}
            total = None
            for part in parts:
                with preserved(model, part.rng, autocast):
                    value = functional_call(objective, {**dict(zip(names, params)), **buffers}, (part.batch,))
                total = value if total is None else total + value
            return total / len(parts)

        return loss

    def hvp(self):
        """Hessian-vector product at the old weights on the step's batch (cached; see ``linalg.make_hvp``)."""
        if "hvp" not in self.cache:
            from . import linalg

            method = self.memory.setdefault("_hvp_method", {}).get("method", "auto")
            hvp = linalg.make_hvp(self.loss_of_params(), tuple(self.before), method=method)
            self.memory["_hvp_method"]["method"] = hvp.method  # measure once per audit, then reuse
            self.cache["hvp"] = hvp
        return self.cache["hvp"]

    # -- small helpers probes share ------------------------------------------------------------
    def lr(self) -> float:
        """Learning rate of the first parameter group (what most users mean by "the" lr)."""
        return group_lr(self.optimizer.param_groups[0])

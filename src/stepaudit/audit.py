"""The ``Audit`` façade: construction and options, the public step API, the run's summary and ``close``.

Hook order for one audited step (nothing wraps or subclasses the optimizer):
  0. ``begin(batch)`` (``step()``/``watch()`` open) — the step is due: the random state here is the one the
                                     first (micro-)batch's re-evaluation replays; attach (1), start the due
                                     probes' captures (``probes.register_capture``: observe-only hooks);
  1. ``model`` forward hook       — autocast state of the training forward; with accumulation, the
                                     RNG state after each forward and, through a gradient hook on its
                                     output, when the backward reaches it (where the next micro-batch's
                                     loss_fn starts; ``replay.py``);
  2. optimizer step pre-hook       — stop the captures; weights before, the gradient the optimizer
                                     received (or, for closure optimizers such as LBFGS, a wrapped
                                     closure that captures the first evaluation), the loss before;
  3. optimizer step post-hook      — Δw, re-evaluation at the new weights, probes, record, store;
  4. ``end(failure)`` (the block closes) — detach (1), stop any capture still running.
Unaudited steps (``every``) pay only the two optimizer hook calls. The same points are public
(``stepapi.py``): ``begin``/``end`` are 0 and 4, ``before_update``/``after_update`` are 2 and 3 for
optimizers that are not ``torch.optim.Optimizer`` (fastai's; read through ``optimizers.py``, never hooked).

One job per module: this façade; ``capture.py`` the hooks 0–4 (``StepCapture``, mixed in here);
``assemble.py`` the record from the captured step, the global objective and the probes' fields;
``faults.py`` the one fault policy (recorded and training goes on, or ``AuditError`` under ``strict``);
``writing.py`` the records, the store and the sinks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import probes as probe_registry
from .arguments import check_replayable, index_parameters, validate
from .assemble import Assembly
from .capture import PendingStep, StepCapture, StepWatch
from .context import check_scalar_loss
from .distributed import rank_folder, shared_new_run, unwrap, unwrap_optimizer, world
from .faults import AuditError
from .flat import is_sharded
from .losses import LossEvaluator
from .meta import describe
from .notebook import Diagnoses, NotebookMixin
from .optimizers import reader_for
from .precision import refuse_float64_sharded
from .records import summarize
from .state import cuda_devices
from .stepapi import StepAPI
from .store import RunStore, new_run_dir
from .writing import RecordWriter

__all__ = ["Audit", "AuditError", "StepWatch"]

_Pending = PendingStep  # the old private name


class Audit(StepAPI, StepCapture, NotebookMixin):
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
        refuse_float64_sharded(model, precision)  # FSDP2: no float64 twin of a sharded model
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
        if run is None and self._world_size > 1:  # one run folder: rank 0 makes it, every rank joins the broadcast
            run = rank_folder(shared_new_run(name), self._rank, self._world_size)
        self.run = Path(run) if run is not None else new_run_dir(name=name)
        meta = describe(model, self._reader.reads, every=every, probes=self.probes, precision=precision)
        if not self._reader.hooked:
            meta.update(optimizer=self._reader.name, optimizer_mapping=self._reader.mapping)
        self.store = RunStore(self.run, meta, name=name)
        self._writer = RecordWriter(self.store, strict, self._world_size)
        self.records: list[dict] = self._writer.records  # the same list: every committed record, in order
        self._assembly = Assembly(
            self.probes, self._collective_probes, strict, self._sharded, self._rank, self._world_size, self._writer
        )
        self.skipped_steps = 0
        self._step_count = self._first_step = first_step  # index of the next optimizer step (resumed runs start later)
        self._closed = False
        if tensorboard is not None:
            from .export import TensorBoardSink

            self.add_sink(TensorBoardSink(tensorboard))
        self._init_capture()

    # -- construction ---------------------------------------------------------------------------
    def _configure_probes(self, probe_options: dict) -> None:
        """Per-probe settings ``{key: {...}}``, parsed into each probe's options type (refused with the fix)."""
        probe_registry.settle_options(self.options, probe_options)
        self._collective_probes: set[str] = set()  # probes with collectives of their own (after globalize)
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
        self._devices = cuda_devices(self.model)
        self._device = self.params[0].device  # where the model was when _devices was read
        # float64 sums for float64 models and precision="float64"; the working dtype's BLAS otherwise
        self._exact_sums = self.precision == "float64" or any(p.dtype == torch.float64 for p in self.params)
        self.losses = LossEvaluator(self.model, self.loss_fn, self.params, self.precision)
        self._flat = None

    # -- public API ---------------------------------------------------------------------------------
    def due(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one) is audited."""
        step = self._step_count if step is None else step
        return step % self.every == 0 or any(step % every == 0 for every in self.probes.values())

    def add_sink(self, sink: Callable[[dict], None]) -> None:
        """Call ``sink(record)`` with every record written from now on (and ``sink.close()``, if any, at ``close``)."""
        self._writer.sinks.append(sink)

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
        handle = self.begin(batch, accumulate=accumulate)
        try:
            yield handle
        except BaseException:
            self._end(stacklevel=4, failed=True)
            raise
        self._end(stacklevel=4)

    @property
    def last(self) -> dict | None:
        """The newest record, or None before the first audited step."""
        return self.records[-1] if self.records else None

    @property
    def steps_seen(self) -> int:
        """Optimizer steps this audit saw (a resumed run counts from ``first_step``)."""
        return self._step_count - self._first_step

    _steps_seen = steps_seen  # the old private name

    def summary(self) -> dict:
        """Per-run shares and medians (decrease/increase/flat, alpha, delta/first_order, hurt next/reference, …)."""
        return {
            **summarize(self.records, skipped_steps=self.skipped_steps, steps_seen=self.steps_seen),
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
        self._detach()
        self._writer.close(summary=self.summary(), steps_seen=self.steps_seen)

    def __enter__(self) -> Audit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

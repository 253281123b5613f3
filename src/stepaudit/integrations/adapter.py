"""What every integration does alike: build the ``Audit``, hold one step open across hooks, close it.

``Adapter`` is what the Lightning, Hugging Face and fastai integrations hold (composition: nothing is added to
the framework's own classes but the one attribute):
  ``start``   — build the ``Audit`` for one training run: its run folder (one per training run; the ranks'
                stores inside it are placed by ``Audit`` itself, ``distributed.rank_folder``), its step count
                continued after a resume (``first_step``, unless the user passed one);
  ``open``    — ``audit.begin(batch)`` in the hook before the step's first forward;
  ``close``   — ``audit.end()`` in a later hook (``failure``: training raised in the step);
  ``abandon`` — a step the framework never took (a skipped batch): neither counted nor warned about;
  ``finish``  — the held step closed (``failure``: what training raised) and the audit closed; committed steps stay.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..audit import Audit, StepWatch
from ..distributed import rank_folder, shared_new_run, world


def run_folder(run: str | os.PathLike | None, rank: int, world_size: int, name: str | None = None) -> Path | None:
    """The ``run`` to give ``Audit`` for this rank, so that a training run has one folder.

    Under a process group ``Audit`` places each rank's store itself (``distributed.rank_folder``): ``run`` is
    passed as it is, and with ``run=None`` rank 0 makes one new folder and tells the others (a broadcast every
    rank joins). When only the framework knows of several processes (no process group), this rank's folder.
    """
    if world()[1] > 1:
        return Path(run) if run is not None else shared_new_run(name)
    if run is None or world_size <= 1:
        return None if run is None else Path(run)
    return rank_folder(run, rank, world_size)


class Adapter:
    """One integration's audit: ``start`` builds it, ``open``/``close``/``abandon`` hold a step, ``finish`` ends it."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)  # the user's Audit(...) keywords
        self.audit: Audit | None = None  # the last audit built (after finish: closed, its records kept)
        self.audits: list[Audit] = []  # every audit built, in order (fastai: one per fit)
        self.current: Audit | None = None  # the audit step calls go to while training runs (None: none)
        self.handle: StepWatch | None = None  # the held step's watch (set ``handle.loss`` to save a forward)

    @property
    def holding(self) -> bool:
        """Whether a step is held open."""
        return self.handle is not None

    def start(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        *,
        first_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        suffix: str | None = None,
    ) -> Audit:
        """Close the audit still open, if any, and build this training run's (``suffix``: ``<run>-<suffix>``).

        ``first_step``: where the framework's own step count is (a resumed run); the user's ``first_step`` wins.
        ``rank``/``world_size``: the framework's, used only when no process group tells them.
        """
        self.finish()
        options = dict(self.options)
        if suffix is not None and options.get("run") is not None:
            options["run"] = f"{options['run']}-{suffix}"
        options["run"] = run_folder(options.get("run"), rank, world_size, options.get("name"))
        options.setdefault("first_step", first_step)
        self.audit = self.current = Audit(model, optimizer, loss_fn, **options)
        self.audits.append(self.audit)
        return self.audit

    def follow(self, audit: Audit | None) -> None:
        """Send the step calls to ``audit`` (e.g. fastai's in-memory sweep audit) until ``finish``."""
        self.finish()
        self.current = audit

    def open(self, batch: Any, accumulate: int = 1) -> StepWatch | None:
        """Open the step on ``batch`` (a list of ``accumulate`` micro-batches); None when no audit is running."""
        if self.current is None:
            return None
        self.handle = self.current.begin(batch, accumulate=accumulate)
        return self.handle

    def close(self, failure: BaseException | None = None) -> None:
        """Close the held step, if any; ``failure``: what training raised in it (no warning is added)."""
        self._end(failure=failure)

    def abandon(self) -> None:
        """Close the held step, if any, as one the framework never took: not counted as a skipped optimizer step."""
        self._end(skipped=True)

    def finish(self, failure: BaseException | None = None) -> None:
        """Close the held step (``failure``: what training raised in it) and the running audit; committed steps stay."""
        audit, self.current = self.current, None
        try:
            if audit is not None and self.handle is not None:
                self.handle = None
                audit.end(failure)
        finally:
            self.handle = None
            if audit is not None:
                audit.close()

    def _end(self, failure: BaseException | None = None, skipped: bool = False) -> None:
        if self.handle is None:
            return
        self.handle = None
        self.current.end(failure, skipped=skipped)

"""Which random state each re-evaluation of an audited step replays (so dropout masks and a loss_fn's own
noise match the training pass), and whether Python's and NumPy's generators are replayed too.

Per audited step: ``open()`` when the step opens — the state the first (micro-)batch's ``loss_fn``
starts from; with accumulation, ``mark_output()`` on each model output — the state when the backward
reaches it, after every draw of that micro-batch's ``loss_fn``, which is where the next one starts;
``states()`` pairs them with the micro-batches; ``check()`` after the step decides whether Python's
and NumPy's generators need tracking (reading NumPy's state costs ~60 µs, so only models seen drawing
from them pay it: checked on the first audited step and every 64th after).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .state import RngState, count_host_tracker, host_state, same_host_state

CHECK_EVERY = 64  # audited steps between two checks for Python/NumPy draws
MAX_MARKS_PER_BATCH = 64  # model outputs marked per micro-batch, at most


class Replay:
    """The random states one audit replays; holds no reference to the audit (its finalizer uses ``close``)."""

    def __init__(self) -> None:
        self.tracking_host = False  # Python's and NumPy's generators replayed and restored too
        self._check_next = True  # the next opened step checks whether the training pass draws from them
        self._opened = 0

    def open(self, devices: list[int]) -> RngState:
        """The state where an audited step opens (``step()``: where ``loss_fn`` is called)."""
        self._opened += 1
        if self._opened % CHECK_EVERY == 0:
            self._check_next = True  # look again now and then: a model may start drawing later
        return RngState.capture(devices, host=self.tracking_host or self._check_next)

    @staticmethod
    def mark_output(output: torch.Tensor, marks: list, limit: int, devices: list[int], host: bool) -> None:
        """With accumulation: append the state to ``marks`` when the backward reaches ``output``."""
        if not output.requires_grad or len(marks) >= limit:
            return

        def mark(grad):  # reached in micro-batch i's backward: after all of its loss_fn's draws
            marks.append(RngState.capture(devices, host=host))

        output.register_hook(mark)

    @staticmethod
    def states(entry: RngState | None, marks: list, count: int) -> list[RngState | None]:
        """The state each of ``count`` micro-batches' ``loss_fn`` started from (None: not known).

        The first: ``entry``. Micro-batch i > 0: the mark of micro-batch i − 1's last output (outputs are
        split evenly between micro-batches, so a ``loss_fn`` that calls the model twice is handled).
        """
        per_batch = max(1, len(marks) // count)
        later = [marks[i * per_batch - 1] if i * per_batch - 1 < len(marks) else None for i in range(1, count)]
        return [entry, *later]

    def check(self, entry: RngState | None, others: Sequence[RngState | None] = ()) -> None:
        """After a checking step: if Python's or NumPy's generator moved since ``entry``, track them from now
        on; if not, drop their snapshots from ``entry`` and ``others`` so re-evaluations skip them."""
        if self.tracking_host or entry is None or entry.host is None:
            return
        if same_host_state(entry.host, host_state()):
            self._check_next = False
            for rng in (entry, *others):
                if rng is not None:
                    rng.host = None
        else:
            self.tracking_host, self._check_next = True, False
            count_host_tracker(+1)

    def close(self) -> None:
        """Stop tracking (every re-evaluation restores Python/NumPy generators while any audit tracks them)."""
        if self.tracking_host:
            self.tracking_host = False
            count_host_tracker(-1)

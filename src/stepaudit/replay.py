"""Which random state each re-evaluation of an audited step replays (so dropout masks and a loss_fn's own
noise match the training pass), and whether Python's and NumPy's generators are replayed too.

Per audited step: ``open()`` when the step opens — the state the first (micro-)batch's ``loss_fn``
starts from; with accumulation, ``record_forward()`` after each model forward — that state, and again
when the backward reaches the output, after every draw of that micro-batch's ``loss_fn``, which is
where the next one starts; ``states()`` pairs them with the micro-batches; ``check()`` after the
step decides whether Python's and NumPy's generators need tracking (reading NumPy's state costs
~60 µs, so only models seen drawing from them pay it: checked on the first audited step and every
64th after).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .state import RngState, count_host_tracker, host_state, same_host_state, tensors_in

CHECK_EVERY = 64  # audited steps between two checks for Python/NumPy draws
MAX_EVENTS_PER_BATCH = 64  # forwards and backward marks noted per micro-batch, at most


class Replay:
    """The random states one audit replays; holds no reference to the audit (its finalizer uses ``close``)."""

    def __init__(self) -> None:
        self.tracking_host = False  # Python's and NumPy's generators replayed and restored too
        self.closed = False
        self._check_next = True  # the next opened step checks whether the training pass draws from them
        self._opened = 0

    def open(self, devices: list[int]) -> RngState:
        """The state where an audited step opens (``step()``: where ``loss_fn`` is called)."""
        self._opened += 1
        if self._opened % CHECK_EVERY == 0:
            self._check_next = True  # look again now and then: a model may start drawing later
        return RngState.capture(devices, host=self.tracking_host or self._check_next)

    @staticmethod
    def record_forward(output: Any, events: list, handles: list, devices: list[int], host: bool) -> None:
        """With accumulation: note the state after a model forward, and hook the first non-leaf output that
        requires grad so the state is noted again when the backward reaches it (``events``, in order)."""
        events.append(("forward", RngState.capture(devices, host=host)))
        tensor = next((t for t in tensors_in(output) if t.grad_fn is not None), None)
        if tensor is None:
            return

        def note() -> None:
            try:
                events.append(("mark", RngState.capture(devices, host=host)))
            except Exception:  # inside the user's backward: a missing mark only means the forward fallback
                pass

        def mark(grad):  # micro-batch i's backward: note the state once this whole backward has run
            try:  # (after any draw in it: checkpoint recomputation, noisy gradient hooks)
                torch.autograd.Variable._execution_engine.queue_callback(note)
            except Exception:  # an engine without callbacks: note it now
                note()

        handles.append(tensor.register_hook(mark))

    @staticmethod
    def states(entry: RngState | None, events: list, count: int) -> list[RngState | None]:
        """The state each of ``count`` micro-batches' ``loss_fn`` started from (None: not known).

        The first: ``entry``. The others, when the events fall into ``count`` groups that each end with a
        backward (a forward right after a mark opens a group): the last mark before the group — after
        every draw of the previous micro-batch, before or after its model calls; extra forwards that
        get no backward (detached targets, an accuracy check) stay inside a group. Otherwise (one
        backward for all micro-batches, outputs without grad) forwards are split evenly, which also
        handles a ``loss_fn`` calling the model twice, and micro-batch i starts at the last mark
        between its first forward and the previous one, else at the state after that previous forward.
        """
        starts = [p for p, (kind, _) in enumerate(events) if kind == "forward" and p and events[p - 1][0] == "mark"]
        if len(starts) == count - 1 and events and events[-1][0] == "mark":
            return [entry, *(events[p - 1][1] for p in starts)]
        forwards = [position for position, (kind, _) in enumerate(events) if kind == "forward"]
        per_batch = max(1, len(forwards) // count)
        states = [entry]
        for batch in range(1, count):
            first = batch * per_batch
            if first >= len(forwards):
                states.append(None)
                continue
            marks = [state for kind, state in events[forwards[first - 1] + 1 : forwards[first]] if kind == "mark"]
            states.append(marks[-1] if marks else events[forwards[first - 1]][1])
        return states

    def check(self, entry: RngState | None, others: Sequence[RngState | None] = ()) -> None:
        """After a checking step: if Python's or NumPy's generator moved since ``entry``, track them from now
        on; if not, drop their snapshots from ``entry`` and ``others`` so re-evaluations skip them."""
        if self.closed or self.tracking_host or entry is None or entry.host is None:
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
        self.closed = True
        if self.tracking_host:
            self.tracking_host = False
            count_host_tracker(-1)

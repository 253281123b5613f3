"""Writing an audit's records: the list kept in memory, the run's store and the live sinks (TensorBoard, notebook)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from .faults import contained, raises_at_once
from .store import RunStore


class RecordWriter:
    """Appends each step's record to ``records``, the store and every sink; a failed write never stops training."""

    def __init__(self, store: RunStore, strict: bool, world_size: int = 1) -> None:
        self.store, self.strict, self.world_size = store, strict, world_size
        self.deferred: Exception | None = None  # strict under several processes: raised with the next audited step
        self.records: list[dict] = []
        self.sinks: list[Callable[[dict], None]] = []

    def commit(self, record: dict) -> None:
        """Keep the step's record and write it (a failure is a warning, or an ``AuditError`` under ``strict``)."""
        self.records.append(record)
        step = record["step"]

        def warn(error: Exception) -> None:
            warnings.warn(f"stepaudit could not write step {step}: {error}", stacklevel=5)
            if self.strict:  # several processes: after the step's all-reduce, so every rank raises at the next
                self.deferred = RuntimeError(f"writing step {step} failed: {error}")

        with contained(raises_at_once(self.strict, self.world_size), f"writing step {step} failed", warn):
            self.store.append(record)
            for sink in self.sinks:
                sink(record)

    def amend_previous(self, step: int, fields: dict) -> bool:
        """Add fields known one step later to the record of ``step`` if it is the newest; re-store it."""
        if not self.records or self.records[-1].get("step") != step:
            return False
        self.records[-1].update(fields)
        self.store.append(self.records[-1])
        for sink in self.sinks:
            sink({"step": step, **fields})
        return True

    def close(self, **meta: object) -> None:
        """Write the run's closing metadata, close the store and the sinks."""
        try:
            self.store.update_meta(**meta)
        finally:
            self.store.close()
            for sink in self.sinks:
                getattr(sink, "close", lambda: None)()

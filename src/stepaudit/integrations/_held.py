"""One audited step held open across a framework's hooks: opened in one hook, closed in a later one."""

from __future__ import annotations

from typing import Any

from ..audit import Audit


class HeldWatch:
    """One open step (``audit.begin_step(batch, accumulate=...)``); ``handle`` is its ``StepWatch`` (set ``handle.loss``)."""

    def __init__(self, audit: Audit, batch: Any, accumulate: int = 1) -> None:
        self._audit = audit
        self.handle = audit.begin_step(batch, accumulate=accumulate)

    def close(self, failure: BaseException | None = None) -> None:
        """Close the step; with ``failure`` (training raised) it is closed as failed, and no warning is added."""
        self._audit.end_step(failed=failure is not None)

    def abandon(self) -> None:
        """Close a step the framework never took (a skipped batch): not counted as a skipped optimizer step."""
        self._audit.end_step(skipped=True)

"""``audit.watch(...)`` held open across a framework's hooks: entered in one hook, closed in a later one."""
from __future__ import annotations

from typing import Any

from ..audit import Audit


class _Abandoned(Exception):
    """Closes a watch whose step the framework skipped: not a step that failed, not one GradScaler skipped."""


class HeldWatch:
    """One open ``audit.watch(batch, accumulate=...)``; ``handle`` is its ``StepWatch`` (set ``handle.loss``)."""

    def __init__(self, audit: Audit, batch: Any, accumulate: int = 1) -> None:
        self._block = audit.watch(batch, accumulate=accumulate)
        self.handle = self._block.__enter__()

    def close(self, failure: BaseException | None = None) -> None:
        """Close the step; with ``failure`` (training raised) it is closed as failed, and no warning is added."""
        if failure is None:
            self._block.__exit__(None, None, None)
        else:
            self._block.__exit__(type(failure), failure, failure.__traceback__)

    def abandon(self) -> None:
        """Close a step the framework never took (a skipped batch): not counted as a skipped optimizer step."""
        self.close(_Abandoned())

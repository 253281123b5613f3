"""``Code``: one diagnosis code as data (its rule and how the doctor links, ranks and tempers its findings)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..diagnosis import Diagnosis
from ..facts import Facts

RESERVED = ("healthy",)  # reported when no rule fires; it has no rule of its own


@dataclass(frozen=True)
class Code:
    """A diagnosis code: declared once, in its own module under ``doctor/codes/``."""

    name: str
    """The code as it appears in ``Diagnosis.code`` and the JSON; the same as its module's file name."""
    rule: Callable[[Facts], Diagnosis | None]
    """Reads a run's ``Facts`` and returns a finding with this code (its evidence and fix), or None."""
    priority: int
    """Which of two findings that could each explain the other is the cause: the lower number."""
    causes: tuple[str, ...] = ()
    """Codes this one can produce ("code:kind" for one kind of it); such a finding is reported as its consequence."""
    quiet_after_divergence: bool = False
    """Dropped once the run went non-finite: a lack of progress on the way to NaN is not a cause."""
    note_when_learning: bool = False
    """Lowered to ``info`` when the loss at least halved, unless the finding is marked ``persistent``."""


def validate(codes: Sequence[Code]) -> None:
    """Raise ValueError unless names and priorities are unique and every cause names a known code."""
    names = [c.name for c in codes]
    problems = []
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"code {name!r} is declared twice")
    for code in codes:
        if code.name in RESERVED:
            problems.append(f"code {code.name!r} is reserved")
        if not callable(code.rule):
            problems.append(f"code {code.name!r} has no rule")
    priorities = [c.priority for c in codes]
    for priority in sorted({p for p in priorities if priorities.count(p) > 1}):
        sharing = ", ".join(c.name for c in codes if c.priority == priority)
        problems.append(f"priority {priority} is shared by {sharing}")
    for code in codes:
        for target in code.causes:
            effect = target.split(":", 1)[0]
            if effect not in names:
                problems.append(f"{code.name} causes {target!r}, which is not a code")
            elif effect == code.name:
                problems.append(f"{code.name} lists itself among its causes")
    if problems:
        raise ValueError("invalid diagnosis codes: " + "; ".join(problems))

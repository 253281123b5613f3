"""The audit's one fault policy: a failure inside the audit is recorded and training goes on, unless ``strict``.

Every place where the audit can fail inside the user's training (a hook, a probe, a write) goes through
``contained`` (an exception) or ``refused`` (a broken contract that raised nothing): with ``strict=False`` the
failure is handed to ``keep`` (the step's error, the record's ``probe_errors``, a warning) and the audit goes
on; with ``strict=True`` it is raised as an ``AuditError`` whose message starts with ``what``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class AuditError(RuntimeError):
    """Raised in ``strict=True`` mode when auditing a step fails (training would otherwise go on)."""


class Fault:
    """What ``contained`` caught (``error`` stays None when the block ran through)."""

    error: Exception | None = None


@contextlib.contextmanager
def contained(
    strict: bool,
    what: str,
    keep: Callable[[Exception], Any] | None = None,
    catch: type[Exception] | tuple[type[Exception], ...] = Exception,
    wrap: bool = True,
) -> Iterator[Fault]:
    """Run the block; a ``catch`` exception goes to ``keep`` and the yielded ``Fault``, or (``strict``) is raised as
    ``AuditError("what: error")`` (``wrap=False``: raised itself, as ``Audit.log`` raises the user's ``TypeError``)."""
    fault = Fault()
    try:
        yield fault
    except catch as error:
        if not strict:
            fault.error = error
            if keep is not None:
                keep(error)
        elif wrap:
            raise AuditError(f"{what}: {error}") from error
        else:
            raise


def raises_at_once(strict: bool, world_size: int) -> bool:
    """Whether ``strict`` raises where the failure happens: in one process only. Under several, a failure is the
    step's error record, shared by the step's all-reduce, and every rank raises after it (``capture.py``), so no
    rank is left waiting in a collective for a peer that has left."""
    return strict and world_size == 1


def refused(strict: bool, what: str, message: str, keep: Callable[[str], Any]) -> None:
    """A contract broken without an exception (a probe's undeclared field): ``keep(message)``, or raise (``strict``)."""
    if strict:
        raise AuditError(f"{what}: {message}")
    keep(message)


def quietly(action: Callable[[], Any]) -> None:
    """Run a clean-up (removing hooks) whose failure no training loop should hear about, even under ``strict``."""
    try:
        action()
    except Exception:
        pass

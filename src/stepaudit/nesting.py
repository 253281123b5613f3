"""A nested optimizer ``step()``: which hook calls belong to the step and which to a call inside it.

torch hooks each optimizer class's ``step`` once the class has an instance, so a subclass whose ``step()``
calls ``super().step()`` runs the step hooks twice, nested: pre (outer), pre (inner), post (inner),
post (outer). Only the outermost call is the step. It is told by the frame of torch's step wrapper that
ran its hooks: a later call is nested while that frame is still on the stack. A frame rather than a
counter: a ``step()`` that raised runs no post-hooks, and its frame is simply gone.
"""

from __future__ import annotations

import sys
from types import FrameType

MAX_DEPTH = 64  # frames searched: the outer wrapper is a few frames below a nested call's hooks


def hook_caller(depth: int) -> FrameType | None:
    """The frame ``depth`` levels above the caller of this function (the step wrapper running the hook)."""
    try:
        return sys._getframe(depth + 1)
    except ValueError:  # a shallower stack
        return None


def running_below(outer: FrameType | None, frame: FrameType | None) -> bool:
    """Whether ``outer`` (an earlier step wrapper's frame) is still on the stack below ``frame``."""
    if outer is None or frame is None:
        return False
    frame, depth = frame.f_back, MAX_DEPTH
    while frame is not None and depth:
        if frame is outer:
            return True
        frame, depth = frame.f_back, depth - 1
    return False

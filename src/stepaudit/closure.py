"""One closure wrapper for ``optimizer.step(closure)``: the loss and gradient of the first evaluation, observed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def wrap_first_call(args: tuple, kwargs: dict, on_first_call: Callable[[Any], None]) -> tuple[tuple, dict]:
    """The step's arguments with its closure calling ``on_first_call(loss)`` once, after its first evaluation (before any update)."""
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if closure is None:
        return args, kwargs
    called = False

    def first_call_recorded():
        nonlocal called
        loss = closure()
        if not called:
            called = True
            on_first_call(loss)
        return loss

    if len(args) > 1:
        return (args[0], first_call_recorded, *args[2:]), kwargs
    return args, {**kwargs, "closure": first_call_recorded}

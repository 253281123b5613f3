"""`stepaudit explain`: backprop on a small expression, simultaneous versus one-weight-at-a-time
updates, and the largest learning rate that still goes downhill.

    >>> from stepaudit.explain import explain
    >>> r = explain("(x + y) * z", at={"x": -2, "y": 5, "z": -4}, lr=0.1)
    >>> r["grads"]
    {'x': -4.0, 'y': -4.0, 'z': 3.0}
"""

from __future__ import annotations

from .cli import main
from .parse import ExplainError, parse
from .result import explain
from .svg import circuit_svg

__all__ = ["explain", "main", "circuit_svg", "parse", "ExplainError"]

"""A loss function's call read as torch reads it: arguments bound by its signature, the reduction it applies."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F


def argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """The argument at position ``index`` of a call, else the keyword ``name`` (None if neither was given)."""
    return args[index] if len(args) > index else kwargs.get(name)


_SIGNATURES: dict[str, inspect.Signature | None] = {}


def loss_arguments(name: str, args: tuple, kwargs: dict) -> dict:
    """A call of ``F.<name>`` with its arguments named by torch's own signature (positional ones included)."""
    if name not in _SIGNATURES:
        try:  # the installed torch's order: it has changed between versions (mse_loss gained ``weight``)
            _SIGNATURES[name] = inspect.signature(inspect.unwrap(getattr(F, name)))
        except (AttributeError, TypeError, ValueError):
            _SIGNATURES[name] = None
    signature = _SIGNATURES[name]
    if signature is not None:
        try:
            return dict(signature.bind_partial(*args, **kwargs).arguments)
        except TypeError:
            pass
    return {**kwargs, "input": argument(args, kwargs, 0, "input"), "target": argument(args, kwargs, 1, "target")}


def loss_reduction(bound: dict) -> str:
    """'mean', 'sum' or 'none': ``reduction``, or the deprecated ``size_average`` / ``reduce`` when either is given."""
    size_average, reduce = bound.get("size_average"), bound.get("reduce")
    if size_average is not None or reduce is not None:  # torch's _Reduction.legacy_get_string: both default True
        if reduce is False:
            return "none"
        return "sum" if size_average is False else "mean"
    return str(bound.get("reduction", "mean"))

"""The ``loss_wiring`` counterfactual: each miswired loss call rewired by wrappers of the kind that detect it.

The softmaxes (``F.softmax``, ``F.log_softmax``, ``torch.softmax``, ``torch.log_softmax`` and the tensor
methods) and ``torch.sigmoid`` are wrapped so that each output remembers its input (the logits); the losses
the passive doctor checks are wrapped so that, before the original runs:

- ``cross_entropy`` given a softmax output (or a log_softmax over another axis than the classes', dim 1)
  gets that softmax's logits (the softmax is dropped: the loss is exactly the logits loss); given other
  probabilities (rows in [0, 1] summing to 1) it gets their log, which is the logits up to a per-row
  constant (the loss is unchanged by it);
- ``nll_loss`` given a softmax output, or a log_softmax over another axis than dim 1, gets
  ``log_softmax(logits, dim=1)``; given scores that are not log-probabilities (rows' logsumexp ≠ 0) it gets
  ``log_softmax(scores, dim=1)``, i.e. the loss becomes ``cross_entropy``; a correct log_softmax is kept;
- ``binary_cross_entropy_with_logits`` given a sigmoid output gets the sigmoid's input;
- an output reshaped by a contiguous view (``.squeeze(1)``, ``.view(-1)``) counts as the output, and its
  logits get the same shape;
- a softmax or log_softmax of a training tensor shaped (batch, classes) taken over dim 0 — the batch, as
  the first module call's input tells it — is taken over dim 1 instead (``BATCH_AXIS``), so a hand-written
  loss (``log_softmax(out, 0).gather(1, y)``) trains on class probabilities. That run's loss is another
  objective than the original's, which no observe-only run can measure: ``verify`` labels it so;
- a regression loss (``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``) whose target has the
  input's number of elements in another shape gets the target reshaped to the input's shape.

``APPLIED`` counts each rewiring by name, so a run where none happened can say so. Installed with factor 0
(``rewire_losses(0.0)``), the hooks only observe: each miswired training call (grad enabled, input requiring
grad) runs as the script wrote it, and the rewired loss of its inputs is appended to ``SHADOW`` — the
original run measured with the loss the fix trains, so both runs are compared on one objective.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module

APPLIED: Counter = Counter()  # rewiring name -> calls rewired in this process
SHADOW: list[float] = []  # observe-only mode: the rewired loss of each miswired training call, in order
_REGRESSION = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")
BATCH_AXIS = "softmax over the classes, not the batch"  # the producer-side rewiring (its APPLIED name)
_BATCH: list[int] = []  # the leading size of the first module call's input: the batch
_SOURCES: dict[int, tuple[weakref.ref, str, torch.Tensor, int | None]] = {}  # id(output) -> (output, function,
# its input, the axis it normalised)


class _Patch:
    """One attribute replaced by a wrapper; ``remove()`` puts the original back."""

    def __init__(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        setattr(owner, name, make(self.original))

    def remove(self) -> None:
        """Restore the original attribute."""
        setattr(self.owner, self.name, self.original)
        _SOURCES.clear()


def _axis(source: torch.Tensor, dim: Any) -> int | None:
    """The axis a softmax normalised (torch's implicit choice when ``dim`` is None), non-negative."""
    if source.dim() == 0:
        return None
    if dim is None:
        dim = 0 if source.dim() in (1, 3) else 1
    return dim % source.dim() if isinstance(dim, int) else None


def _remember(output: Any, function: str, source: Any, dim: Any) -> None:
    """Note that ``output`` came from ``function(source)`` over ``dim``, for as long as ``output`` lives."""
    if isinstance(output, torch.Tensor) and isinstance(source, torch.Tensor):
        key = id(output)
        _SOURCES[key] = (
            weakref.ref(output, lambda _: _SOURCES.pop(key, None)),
            function,
            source,
            _axis(source, dim) if function != "sigmoid" else None,
        )


def _source(tensor: Any, name: str) -> torch.Tensor | None:
    """The logits behind a sigmoid output, a softmax output or a log_softmax off the class axis; else None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    output, found = tensor, _SOURCES.get(id(tensor))
    base = tensor._base
    if (
        found is None
        and base is not None
        and base.numel() == tensor.numel()
        and base.is_contiguous()
        and tensor.is_contiguous()
    ):  # a reshaping view of the output (``.squeeze(1)``, ``.view(-1)``)
        output, found = base, _SOURCES.get(id(base))
    if found is None or found[0]() is not output:
        return None
    _, function, source, axis = found
    wrong = {"sigmoid": name == "sigmoid", "softmax": name == "softmax", "log_softmax": name == "softmax" and axis != 1}
    if not wrong.get(function):
        return None
    return source if output is tensor else source.reshape(tensor.shape)


def _over_batch(source: Any, dim: Any) -> bool:
    """A training (batch, classes) tensor normalised over dim 0, the batch (the doctor's own check)."""
    return (
        isinstance(source, torch.Tensor)
        and source.dim() == 2
        and isinstance(dim, int)
        and dim % 2 == 0
        and bool(_BATCH)
        and source.shape[0] == _BATCH[0] >= 2
        and source.shape[1] >= 2
        and torch.is_grad_enabled()
        and source.requires_grad
    )


def _producer(function: str, rewiring: bool) -> Callable[[Callable], Callable]:
    """A wrapper of a softmax or sigmoid that remembers each output's input (``rewiring``: fixes the axis)."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            source = args[0] if args else kwargs.get("input")
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if rewiring and function != "sigmoid" and _over_batch(source, dim):
                APPLIED[BATCH_AXIS] += 1
                if len(args) > 1:
                    args = (args[0], 1, *args[2:])
                else:
                    kwargs = {**kwargs, "dim": 1}
                dim = 1
            output = original(*args, **kwargs)
            _remember(output, function, source, dim)
            return output

        return wrapper

    return make


def _split(args: tuple, kwargs: dict) -> tuple[Any, Any, tuple, dict]:
    """(input, target, other positional args, other keyword args) of a loss call."""
    rest = dict(kwargs)
    values = list(args)
    x = values.pop(0) if values else rest.pop("input", None)
    y = values.pop(0) if values else rest.pop("target", None)
    return x, y, tuple(values), rest


def _probabilities(x: torch.Tensor) -> bool:
    """Rows (dim 1) in [0, 1] that sum to 1 (within 1e-3), as the doctor's check reads them."""
    if x.dim() < 2 or x.shape[1] < 2 or not x.is_floating_point():
        return False
    with torch.no_grad():
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        return low >= 0 and high <= 1 and float((x.detach().sum(1) - 1).abs().max()) < 1e-3


def rewire(name: str, x: Any, y: Any) -> tuple[Any, Any, str | None]:
    """The (input, target) a miswired ``name`` loss call should have received, and the rewiring's name."""
    if not isinstance(x, torch.Tensor):
        return x, y, None
    if name == "cross_entropy":
        logits = _source(x, "softmax")
        if logits is not None:
            return logits, y, "softmax dropped before cross_entropy"
        if _probabilities(x):
            return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)), y, "probabilities' log into cross_entropy"
    if name == "nll_loss" and x.dim() >= 2 and x.shape[1] >= 2:
        logits = _source(x, "softmax")
        if logits is not None:
            return F.log_softmax(logits, dim=1), y, "log_softmax over the classes into nll_loss"
        with torch.no_grad():
            log_probabilities = float(torch.logsumexp(x.detach().float(), 1).abs().max()) < 1e-3
        if not log_probabilities:
            return F.log_softmax(x, dim=1), y, "log_softmax over the classes into nll_loss"
    if name == "binary_cross_entropy_with_logits":
        logits = _source(x, "sigmoid")
        if logits is not None:
            return logits, y, "sigmoid dropped before binary_cross_entropy_with_logits"
    if name in _REGRESSION and isinstance(y, torch.Tensor) and y.shape != x.shape and y.numel() == x.numel():
        return x, y.reshape(x.shape), "target reshaped to the input's shape"
    return x, y, None


def _consumer(name: str, observe: bool) -> Callable[[Callable], Callable]:
    """A wrapper of a loss function that rewires a miswired call (``observe``: only measures the rewired loss)."""

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            x, y, rest, options = _split(args, kwargs)
            new_x, new_y, done = rewire(name, x, y)
            if done is None:
                return original(*args, **kwargs)
            if not observe:
                APPLIED[done] += 1
                return original(new_x, new_y, *rest, **options)
            if torch.is_grad_enabled() and x.requires_grad:
                APPLIED[done] += 1
                with torch.no_grad():
                    value = original(new_x.detach(), new_y, *rest, **options)
                SHADOW.append(float(value.double().mean()))
            return original(*args, **kwargs)

        return wrapper

    return make


def _note_batch(module: torch.nn.Module, args: tuple) -> None:
    """Remember the leading size of the first module call's tensor input (the outermost call: the batch)."""
    if not _BATCH and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        _BATCH.append(int(args[0].shape[0]))


def rewire_losses(mode: float = 1.0) -> list:
    """Wrap the softmaxes, ``torch.sigmoid`` and the losses so each miswired loss call is rewired (mode 0: measured)."""
    SHADOW.clear()
    _BATCH.clear()
    rewiring = mode != 0.0
    patches: list = [_module.register_module_forward_pre_hook(_note_batch)]
    for owner in (F, torch, torch.Tensor):
        for function in ("softmax", "log_softmax"):
            if hasattr(owner, function):
                patches.append(_Patch(owner, function, _producer(function, rewiring)))
    for owner in (torch, torch.Tensor):
        patches.append(_Patch(owner, "sigmoid", _producer("sigmoid", rewiring)))
    for name in ("cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", *_REGRESSION):
        patches.append(_Patch(F, name, _consumer(name, observe=mode == 0.0)))
    return patches

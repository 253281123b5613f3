"""What ``Audit`` checks before it trusts its arguments, and the index of the parameters it audits.

Every refusal names the fix. Nothing here touches training state.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .state import tensors_in


def validate(
    model: Any, optimizer: Any, loss_fn: Any, every: Any, precision: Any, reference_mode: Any, first_step: Any = 0
) -> None:
    """Refuse arguments ``Audit`` cannot work with, each with a message that says what to pass instead."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be callable as loss_fn(model, batch) -> scalar tensor, e.g. "
            "lambda m, b: F.cross_entropy(m(b[0]), b[1])"
        )
    check_loss_signature(loss_fn)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (1 audits every step), got {every!r}")
    if isinstance(first_step, bool) or not isinstance(first_step, int) or first_step < 0:
        raise ValueError(
            f"first_step must be a non-negative int (the index of the first step, e.g. the "
            f"global step a resumed run starts from), got {first_step!r}"
        )
    if precision not in (None, "float64"):
        raise ValueError(f"precision must be None or 'float64', got {precision!r}")
    if reference_mode not in ("eval", "train"):
        raise ValueError(f"reference_mode must be 'eval' or 'train', got {reference_mode!r}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "stepaudit hooks the model's forward, which TorchScript modules do not support; "
            "audit the eager model (before torch.jit.script) and script it for deployment"
        )
    complex_params = [n for n, p in model.named_parameters() if p.requires_grad and p.is_complex()]
    if complex_params:
        raise TypeError(
            f"stepaudit audits real-valued parameters; {', '.join(complex_params[:5])} is complex. "
            "Store it as a real tensor with a trailing dimension of 2 and use "
            "torch.view_as_complex(param) in forward"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameters (requires_grad=True); unfreeze some, "
            "e.g. for p in model.parameters(): p.requires_grad_(True)"
        )


def check_loss_signature(loss_fn: Any) -> None:
    """Refuse a ``loss_fn`` that cannot be called as ``loss_fn(model, batch)`` (e.g. ``lambda batch: ...``).

    Callables without a readable signature (some builtins and C extensions) are let through.
    """
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(
            f"loss_fn is called as loss_fn(model, batch) -> scalar tensor, but {name}{signature} "
            "does not take those two arguments; write it as e.g. "
            "lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])"
        ) from None


@dataclass
class ParameterIndex:
    """The optimizer's parameters in its order, with their model names, owning modules and groups."""

    names: list[str]
    params: list[torch.Tensor]
    modules: list[str]  # module path of each parameter ("(root)" for the model's own)
    groups: list[int]  # param-group index of each parameter


def index_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stacklevel: int = 2) -> ParameterIndex:
    """Index the optimizer's parameters by model name; refuse strangers, warn on trainable orphans."""
    names = {id(p): n for n, p in model.named_parameters()}
    index = ParameterIndex([], [], [], [])
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model; "
                    "build the optimizer from model.parameters() of the model you pass to Audit"
                )
            name = names[id(p)]
            index.names.append(name)
            index.params.append(p)
            index.modules.append(name.rsplit(".", 1)[0] if "." in name else "(root)")
            index.groups.append(g)
    in_optimizer = {id(p) for p in index.params}
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if orphans:
        warnings.warn(
            f"trainable parameters not in the optimizer (they will never change): {', '.join(orphans[:10])}"
            + (" …" if len(orphans) > 10 else ""),
            stacklevel=stacklevel + 1,
        )
    return index


def check_replayable(batch: Any) -> None:
    """Refuse a one-shot iterator: the audit must evaluate the same batch again at the new weights."""
    if type(batch) in (tuple, list, dict) or isinstance(batch, torch.Tensor):
        return  # the common cases, without the slower ABC check below (this runs every step)
    if isinstance(batch, Iterator) or (hasattr(batch, "__next__") and not isinstance(batch, torch.Tensor)):
        raise TypeError(
            "the batch is a one-shot iterator/generator and cannot be replayed at the new weights; "
            "pass the batch itself (a tensor, tuple, list or dict), e.g. list(batch)"
        )


def batch_size(batches: list) -> int | None:
    """Examples per optimizer step: the leading dimension of the first tensor of each (micro-)batch."""
    total = 0
    for batch in batches:
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            return None
        total += tensor.shape[0]
    return total


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor inside nested tuples, lists and dicts (depth first), or None."""
    return next(tensors_in(obj), None)

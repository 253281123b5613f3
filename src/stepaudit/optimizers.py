"""Optimizers that are not ``torch.optim.Optimizer``: what the audit reads from them, under torch's names.

The audit reads an optimizer's parameter groups (params, lr); its probes read hyperparameters and state
under torch's names (``safe_lr``: SGD's momentum, dampening, weight_decay; ``precond_sharpness``: Adam's
betas, eps, step, exp_avg_sq, or RMSprop's square_avg). For any other optimizer the audit reads a *mirror*:
a torch optimizer object holding the same parameter tensors and, refreshed at each audited step, the same
hyperparameters and state tensors (shared, never copied, never written) under torch's names. The mirror is
never stepped and fires no hooks; such an optimizer is driven through ``audit.before_update()`` and
``audit.after_update()`` (``stepapi.py``).

- fastai ``OptimWrapper``: the torch optimizer it wraps, read as it is.
- fastai ``Optimizer``, recognised by its step functions (``cbs``):
  ``SGD``: torch SGD, ``mom`` → ``momentum`` (no dampening); fastai's default decoupled decay
  (w ← (1 − η·wd)·w, outside the momentum) with momentum β is stable on the quadratic model while
  η(λ + (1+β)·wd) < 2 + 2β, so the mirror's ``weight_decay`` is (1+β)·wd and ``safe_lr`` stays exact;
  ``RMSProp``: torch RMSprop, ``sqr_mom`` → ``alpha``, ``sqr_avg`` → ``square_avg``;
  ``Adam``: torch Adam, (``mom``, ``sqr_mom``) → ``betas``, ``grad_avg``/``sqr_avg`` → ``exp_avg``/``exp_avg_sq``
  (the same update as torch's: m̂/(√v̂ + ε)), decoupled decay → ``decoupled_weight_decay``.
  Others (``RAdam``, ``Lamb``, ``QHAdam``, ``Larc``, ``Lookahead``/``ranger``, your own ``cbs``): parameter
  groups and lr only; ``safe_lr`` and ``precond_sharpness`` are NaN with a note naming the optimizer.
  fastai's per-parameter ``do_wd=False`` (biases and BatchNorm with ``wd_bn_bias=False``) is not mirrored:
  the group's ``wd`` stands for all of the group.
- anything else with ``param_groups`` (a list of dicts with "params" and "lr"): groups and lr only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

REFUSED = (
    "optimizer must be a torch.optim.Optimizer, a fastai Optimizer/OptimWrapper, or an object with "
    "param_groups (a list of dicts with 'params' and 'lr'); got {}"
)
_UNMAPPED_NAMES = {"radam_step": "RAdam", "lamb_step": "Lamb", "qhadam_step": "QHAdam", "larc_step": "Larc"}


class _Unmapped(torch.optim.Optimizer):
    """A mirror with parameter groups and lr only (no torch optimizer has this one's update rule)."""

    def __init__(self, groups: list[dict]) -> None:
        super().__init__(groups, {"lr": math.nan})

    def step(self, closure: Any = None) -> None:
        raise RuntimeError("a stepaudit mirror is read, never stepped")


@dataclass
class OptimizerReader:
    """What the audit reads (``reads``: torch names) for the optimizer it was given, and how to refresh it."""

    reads: torch.optim.Optimizer
    name: str  # for the run's metadata, e.g. "fastai Adam"
    mapping: str = ""  # how its names were mapped ("" for a torch optimizer)
    hooked: bool = True  # a torch optimizer: its own step hooks drive the audit
    sync: Callable[[], None] = field(default=lambda: None)  # refresh hyperparameters and state from the original


def reader_for(optimizer: Any) -> OptimizerReader:
    """The reader for ``optimizer``; a ``TypeError`` naming what is accepted if there is none."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return OptimizerReader(optimizer, type(optimizer).__name__)
    inner = getattr(optimizer, "opt", None)
    if isinstance(inner, torch.optim.Optimizer) and hasattr(optimizer, "param_lists"):  # fastai OptimWrapper
        return OptimizerReader(
            inner, f"OptimWrapper({type(inner).__name__})", "the wrapped torch optimizer", hooked=False
        )
    if hasattr(optimizer, "param_lists") and hasattr(optimizer, "hypers"):
        return _fastai_reader(optimizer)
    groups = getattr(optimizer, "param_groups", None)
    if isinstance(groups, list) and groups and all(isinstance(g, dict) and "params" in g for g in groups):
        mirror = type(type(optimizer).__name__, (_Unmapped,), {})([{"params": list(g["params"])} for g in groups])

        def sync() -> None:
            for copy, group in zip(mirror.param_groups, groups):
                copy.update({k: v for k, v in group.items() if k != "params"})

        sync()
        return OptimizerReader(mirror, type(optimizer).__name__, "param_groups only", hooked=False, sync=sync)
    raise TypeError(REFUSED.format(type(optimizer).__name__))


def _cb_name(cb: Any) -> str:
    return getattr(getattr(cb, "func", cb), "__name__", type(cb).__name__)


def _recipe(optimizer: Any) -> tuple[str, bool, bool]:
    """(fastai recipe name, decoupled weight decay, has momentum) from the optimizer's step functions."""
    if type(optimizer).__name__ == "Lookahead":
        return f"Lookahead({_recipe(optimizer.opt)[0]})", True, False
    cbs = list(getattr(optimizer, "cbs", []))
    names = tuple(_cb_name(cb) for cb in cbs)
    if not names or names[0] not in ("weight_decay", "l2_reg"):
        return "Optimizer(" + ", ".join(names) + ")", True, False
    decoupled, rest = names[0] == "weight_decay", names[1:]
    damped = [getattr(cb, "keywords", {}).get("dampening", False) for cb in cbs[1:] if _cb_name(cb) == "average_grad"]
    if rest in (("sgd_step",), ("average_grad", "momentum_step")) and not any(damped):
        return "SGD", decoupled, bool(damped)
    if rest in (
        ("average_sqr_grad", "rms_prop_step"),
        ("average_grad", "average_sqr_grad", "rms_prop_step"),
    ) and not any(damped):
        return "RMSProp", decoupled, bool(damped)
    if rest == ("average_grad", "average_sqr_grad", "step_stat", "adam_step") and all(damped):
        return "Adam", decoupled, True
    return _UNMAPPED_NAMES.get(names[-1], "Optimizer(" + ", ".join(names) + ")"), decoupled, False


def _fastai_reader(optimizer: Any) -> OptimizerReader:
    """A mirror of a fastai ``Optimizer`` (``param_lists``, ``hypers``, ``state``) under torch's names."""
    recipe, decoupled, momentum = _recipe(optimizer)
    groups = [{"params": list(params)} for params in optimizer.param_lists]
    if recipe == "SGD":
        mirror: torch.optim.Optimizer = torch.optim.SGD(groups, lr=0.0)
        mapping = "mom → momentum; decoupled wd with momentum β → weight_decay (1+β)·wd; grad_avg → momentum_buffer"
    elif recipe == "RMSProp":
        mirror = torch.optim.RMSprop(groups, lr=0.0)
        mapping = "sqr_mom → alpha, mom → momentum; sqr_avg → square_avg"
    elif recipe == "Adam":
        mirror = torch.optim.Adam(groups, lr=0.0)
        mapping = "(mom, sqr_mom) → betas; grad_avg, sqr_avg → exp_avg, exp_avg_sq"
    else:
        mirror = type(f"fastai {recipe}", (_Unmapped,), {})(groups)  # its name is in the probes' notes
        mapping = f"parameter groups and lr only: {recipe} has no torch counterpart (safe_lr, precond_sharpness NaN)"
    torch_state = {
        "SGD": {"grad_avg": "momentum_buffer"},
        "RMSProp": {"sqr_avg": "square_avg"},
        "Adam": {"grad_avg": "exp_avg", "sqr_avg": "exp_avg_sq", "step": "step"},
    }.get(recipe, {})

    def hyperparameters(hyper: dict) -> dict:
        lr, wd = float(hyper.get("lr", math.nan)), float(hyper.get("wd", 0.0))
        mom = float(hyper.get("mom", 0.0)) if momentum else 0.0
        if recipe == "SGD":
            return {
                "lr": lr,
                "momentum": mom,
                "dampening": 0.0,
                "nesterov": False,
                "weight_decay": (1 + mom) * wd if decoupled else wd,
            }
        if recipe == "RMSProp":
            return {
                "lr": lr,
                "alpha": float(hyper["sqr_mom"]),
                "eps": float(hyper["eps"]),
                "momentum": mom,
                "centered": False,
                "weight_decay": wd,
                "decoupled_weight_decay": decoupled,
            }
        if recipe == "Adam":
            return {
                "lr": lr,
                "betas": (mom, float(hyper["sqr_mom"])),
                "eps": float(hyper["eps"]),
                "weight_decay": wd,
                "decoupled_weight_decay": decoupled,
                "amsgrad": False,
            }
        return {"lr": lr}

    def sync() -> None:
        for copy, hyper in zip(mirror.param_groups, optimizer.hypers):
            copy.update(hyperparameters(hyper))
        state: dict = defaultdict(dict)
        for params in optimizer.param_lists:
            for p in params:
                theirs = optimizer.state.get(p) or {}
                ours = {torch_state[k]: v for k, v in theirs.items() if k in torch_state}
                if recipe == "RMSProp" and "square_avg" in ours:
                    ours["step"] = 1  # fastai's RMSProp keeps no step count; the preconditioner needs none
                if ours:
                    state[p] = ours
        mirror.state = state

    sync()
    return OptimizerReader(mirror, f"fastai {recipe}", mapping, hooked=False, sync=sync)

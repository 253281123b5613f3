"""Automatic counterfactuals for ``stepaudit doctor --verify``: each one applies a diagnosis's fix by hooks.

A counterfactual is installed in a fresh process before the unchanged script runs; it changes training on
purpose (that is the experiment) through torch's global hook points only, never by editing the script:

- ``lr_too_high`` / ``lr_too_low``: every param group's learning rate (and its scheduler's base rates)
  scaled once, at the optimizer's first step (an optimizer step pre-hook).
- ``missing_zero_grad``: the gradients of an optimizer set to None at the first module forward after each
  of its steps, so several backward passes between two steps (accumulation) still add up.
- ``exploding_gradients``: the gradient norm clipped before each step at the median of the first five
  finite norms (the lower median of the norms seen so far during those five steps).
- ``unnormalized_inputs``: the input of the first Linear/Conv/RNN layer called standardised per feature
  (channel for a convolution) with the pooled statistics of its first five batches.
- ``params_not_updating``: the trainable parameters of the modules that ran, held by no optimizer, added
  to the first optimizer that steps (``add_param_group``) before its first step.
- ``loss_wiring``: a miswired loss call rewired (``counterfactual_wiring.py``): the softmax or sigmoid
  before a logits loss dropped, raw scores into NLL given their log_softmax, a target reshaped to the input.
- ``lr_schedule_collapse`` (``lr_too_low`` of kind "schedule"): a scheduler's steps ignored from the first
  one that would take an lr below 1/100 (then 1/10) of its group's highest (``counterfactual_init.py``).
- ``dead_relu`` / ``saturated_activations`` / ``vanishing_gradients``: the layers re-initialised at their
  first forward, He before a ReLU, Xavier before tanh/sigmoid; for the two squashing codes, when that is
  not confirmed, hidden tanh/sigmoid modules compute ReLU instead (``counterfactual_init.py``).

``COUNTERFACTUALS`` maps a diagnosis code to its ``Counterfactual``; ``install(code, factor)`` returns
the hook handles (each with ``remove()``).
"""

from __future__ import annotations

import gc
import math
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.modules import module as _module
from torch.optim import optimizer as _optim

from . import counterfactual_init, counterfactual_wiring

STAT_BATCHES = 5  # batches whose input statistics standardise the first layer
CLIP_STEPS = 5  # steps whose gradient norms give the clipping threshold
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # per-group rates a scheduler reads (OneCycleLR keeps three)
_SCHEDULER_LISTS = ("base_lrs", "max_lrs", "_last_lr")  # per-group rates a scheduler keeps itself
_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


@dataclass(frozen=True)
class Counterfactual:
    """A fix applied by hooks: how to install it, the factors to try in turn, how to name it."""

    install: Callable[[float], list]
    factors: tuple[float, ...] = (1.0,)
    label: Callable[[float], str] = str


def _schedulers_of(optimizer: torch.optim.Optimizer) -> list:
    """The learning-rate schedulers holding ``optimizer`` (found among its referrers)."""
    found = []
    for holder in gc.get_referrers(optimizer):
        owners = (
            [holder]
            if isinstance(holder, _SCHEDULERS)
            else (
                [o for o in gc.get_referrers(holder) if getattr(o, "__dict__", None) is holder]
                if isinstance(holder, dict)
                else []
            )
        )
        found += [o for o in owners if isinstance(o, _SCHEDULERS) and o not in found]
    return found


def _scaled(value, factor: float):
    """``value × factor`` for a float; a tensor learning rate is scaled in place (it may be captured)."""
    if isinstance(value, torch.Tensor):
        return value.mul_(factor)
    return value * factor


def scale_lr(factor: float) -> list:
    """Scale every param group's rates and its schedulers' base rates by ``factor``, once per optimizer."""
    done: weakref.WeakSet = weakref.WeakSet()

    def pre(optimizer, args, kwargs):
        if optimizer in done:
            return
        done.add(optimizer)
        for group in optimizer.param_groups:
            for key in _LR_KEYS:
                if isinstance(group.get(key), (int, float, torch.Tensor)) and not isinstance(group[key], bool):
                    group[key] = _scaled(group[key], factor)
        for scheduler in _schedulers_of(optimizer):
            for name in _SCHEDULER_LISTS:
                rates = getattr(scheduler, name, None)
                if isinstance(rates, list):
                    setattr(scheduler, name, [_scaled(r, factor) if isinstance(r, (int, float)) else r for r in rates])
        return

    return [_optim.register_optimizer_step_pre_hook(pre)]


def zero_after_step(_: float = 1.0) -> list:
    """Set an optimizer's gradients to None at the first module forward after each of its steps."""
    due: dict[int, weakref.ref] = {}

    def post(optimizer, args, kwargs):
        due[id(optimizer)] = weakref.ref(optimizer)

    def forward_pre(module, args):
        while due:
            optimizer = due.popitem()[1]()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)

    return [_optim.register_optimizer_step_post_hook(post), _module.register_module_forward_pre_hook(forward_pre)]


def _with_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters of ``optimizer`` that hold a gradient."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def clip_gradients(_: float = 1.0) -> list:
    """Clip each step's gradient norm at the median of the first ``CLIP_STEPS`` finite norms."""
    norms: dict[int, list[float]] = {}

    def pre(optimizer, args, kwargs):
        params = _with_grads(optimizer)
        if not params:
            return
        seen = norms.setdefault(id(optimizer), [])
        if len(seen) < CLIP_STEPS:
            norm = float(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad.detach().double()) for p in params])
                )
            )
            if math.isfinite(norm):
                seen.append(norm)
        if seen:
            torch.nn.utils.clip_grad_norm_(params, statistics.median_low(seen))  # the lower middle while even
        return

    return [_optim.register_optimizer_step_pre_hook(pre)]


_FIRST_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.RNNBase)  # an RNN's features: last dim


class _Standardiser:
    """Per-feature moments of the first layer's input over its first batches, and the standardisation."""

    def __init__(self) -> None:
        self.layer: weakref.ref | None = None
        self.batches = 0
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    @staticmethod
    def _layout(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
        """The feature dimension (channels for a convolution, last for a linear layer) and the others."""
        dim = 1 if isinstance(module, torch.nn.modules.conv._ConvNd) and x.dim() > 1 else x.dim() - 1
        return dim, [d for d in range(x.dim()) if d != dim]

    def __call__(self, module: torch.nn.Module, args):
        if self.layer is None:
            if not isinstance(module, _FIRST_LAYERS):
                return None
            self.layer = weakref.ref(module)
        if (
            self.layer() is not module
            or not args
            or not isinstance(args[0], torch.Tensor)
            or not args[0].is_floating_point()
        ):
            return None
        x = args[0]
        dim, others = self._layout(module, x)
        if self.batches < STAT_BATCHES:
            values = x.detach().to(torch.float64)
            s1, s2 = values.sum(others), (values * values).sum(others)
            self.s1 = s1 if self.s1 is None else self.s1 + s1
            self.s2 = s2 if self.s2 is None else self.s2 + s2
            self.n += x.numel() // x.shape[dim]
            self.batches += 1
        mean = self.s1 / self.n
        std = (self.s2 / self.n - mean * mean).clamp_min(0).sqrt()
        floor = 1e-2 * float(std.mean()) + 1e-12  # a feature constant on the first batches is not blown up later
        shape = [1] * x.dim()
        shape[dim] = -1
        mean = mean.to(x.dtype).view(shape)
        std = std.clamp_min(floor).to(x.dtype).view(shape)
        return ((x - mean) / std, *args[1:])


def standardize_inputs(_: float = 1.0) -> list:
    """Standardise the input of the first Linear/Conv/RNN layer called with its first batches' statistics."""
    return [_module.register_module_forward_pre_hook(_Standardiser())]


def add_missing_params(_: float = 1.0) -> list:
    """Add the trainable parameters of the modules that ran, held by no optimizer, to the first one that steps."""
    ran: weakref.WeakSet = weakref.WeakSet()
    state = {"done": False}

    def forward_pre(module, args):
        if not state["done"]:
            ran.add(module)

    def pre(optimizer, args, kwargs):
        if state["done"]:
            return
        state["done"] = True
        held = {
            id(p)
            for o in gc.get_objects()
            if issubclass(type(o), torch.optim.Optimizer)  # no __class__ proxies
            for group in o.param_groups
            for p in group["params"]
        }
        missing, seen = [], set()
        for module in list(ran):
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in held and id(p) not in seen:
                    seen.add(id(p))
                    missing.append(p)
        if missing:
            optimizer.add_param_group({"params": missing})
        return

    return [_module.register_module_forward_pre_hook(forward_pre), _optim.register_optimizer_step_pre_hook(pre)]


def _lr_label(factor: float) -> str:
    return f"lr ×{factor:g}"


# re-initialise, then hidden tanh/sigmoid → ReLU with He weights, then with the script's own weights
_SQUASH_TRIES = (1.0, counterfactual_init.RELU_INSTEAD, counterfactual_init.RELU_OWN_INIT)


def _squash_label(factor: float) -> str:
    if factor == counterfactual_init.RELU_INSTEAD:
        return "hidden tanh/sigmoid → ReLU, He weights"
    if factor == counterfactual_init.RELU_OWN_INIT:
        return "hidden tanh/sigmoid → ReLU, the script's weights"
    return "layers re-initialised"


COUNTERFACTUALS: dict[str, Counterfactual] = {
    "lr_too_high": Counterfactual(scale_lr, (0.1, 0.01), _lr_label),
    "lr_too_low": Counterfactual(scale_lr, (10.0, 100.0), _lr_label),
    "missing_zero_grad": Counterfactual(zero_after_step, label=lambda _: "zero_grad after each step"),
    "exploding_gradients": Counterfactual(clip_gradients, label=lambda _: "gradient norm clipped at the early median"),
    "unnormalized_inputs": Counterfactual(standardize_inputs, label=lambda _: "first layer's input standardised"),
    "params_not_updating": Counterfactual(
        add_missing_params, label=lambda _: "missing parameters added to the optimizer"
    ),
    "loss_wiring": Counterfactual(counterfactual_wiring.rewire_losses, label=lambda _: "the loss call rewired"),
    "lr_schedule_collapse": Counterfactual(
        counterfactual_init.hold_schedule,
        counterfactual_init.FLOORS,
        lambda floor: f"scheduler steps ignored once the lr fell below {floor:g} × its peak",
    ),
    "dead_relu": Counterfactual(counterfactual_init.reinitialise("relu"), label=lambda _: "layers re-initialised"),
    "saturated_activations": Counterfactual(counterfactual_init.reinitialise("squash"), _SQUASH_TRIES, _squash_label),
    "vanishing_gradients": Counterfactual(counterfactual_init.reinitialise("squash"), _SQUASH_TRIES, _squash_label),
}
REPORTING = ("loss_wiring", "lr_schedule_collapse", "dead_relu", "saturated_activations", "vanishing_gradients")
"""Counterfactuals that count what they changed (``applied``): a run where they changed nothing says so."""


def applied() -> dict[str, int]:
    """What the reporting counterfactuals changed in this process, by name (e.g. rewired loss calls)."""
    return {**counterfactual_wiring.APPLIED, **counterfactual_init.APPLIED}


def install(code: str, factor: float | None = None) -> list:
    """Install the counterfactual of ``code`` (with ``factor``, else its first); returns the hook handles."""
    if code not in COUNTERFACTUALS:
        raise KeyError(f"no automatic counterfactual for {code!r}; known: {', '.join(sorted(COUNTERFACTUALS))}")
    fix = COUNTERFACTUALS[code]
    counterfactual_wiring.APPLIED.clear()
    counterfactual_init.APPLIED.clear()
    return fix.install(fix.factors[0] if factor is None else factor)


def remove(handles: list) -> None:
    """Remove installed hooks."""
    for handle in handles:
        handle.remove()

"""Counterfactuals for a collapsing learning-rate schedule and for badly initialised layers.

- ``hold_schedule(floor)``: every scheduler's ``step()`` is wrapped; from the first step that would take a
  param group's lr below ``floor`` × the highest lr that group had (its ``initial_lr`` or any lr seen
  since) on, that scheduler's steps are undone (the groups keep the lrs they had before it): the schedule
  runs as written until the collapse point and is ignored afterwards. The floors tried are 1/100 (the
  doctor's advice: keep the lr within ~100× of its peak while the loss still falls), then 1/10.
- ``reinitialise``: at the first forward of each module (a global forward pre-hook, before it computes
  anything), each ``Linear`` / convolution inside it gets the standard initialisation for the activation
  that follows it: He (Kaiming normal, std √(2/fan_in)) before a ReLU, Xavier (Glorot normal, std
  √(2/(fan_in + fan_out))) before a tanh or sigmoid, and a zero bias. The activation is the first
  activation module after the layer in module order (before the next layer); a layer followed by none is
  left alone unless it is not the last layer, when the diagnosis's family decides (``dead_relu``: He,
  the others: Xavier). The draws come from a private generator seeded with ``SEED``, so the script's
  own random stream (batches, dropout) is the original's.
- ``relu_instead(family)``: the second try for ``saturated_activations`` / ``vanishing_gradients`` when
  re-initialisation does not settle it. A sigmoid's slope is at most 1/4 and a tanh's at most 1, so no
  initialisation keeps the backward signal of a deep squashing stack from shrinking layer by layer
  (Glorot & Bengio 2010, section 4.2); the standard fix is the activation itself. Every hidden tanh /
  sigmoid module (one with a layer after it, so an output squashing before a probability loss stays) returns
  ``relu(input)`` instead (a forward hook), and the layers before them get He initialisation as above
  (factor ``RELU_INSTEAD``) or, when that is not confirmed either (He weights can make the script's lr
  diverge), keep the script's own weights (factor ``RELU_OWN_INIT``).

``APPLIED`` counts what each changed (undone scheduler steps, re-initialised layers).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable

import torch
from torch.nn.modules import module as _module
from torch.optim import lr_scheduler as _schedulers

APPLIED: Counter = Counter()
FLOORS = (1e-2, 1e-1)  # a step may not take an lr below this share of the group's highest lr (tried in turn)
SEED = 0  # the private generator of the re-initialisation
_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
_RELU = (
    torch.nn.ReLU,
    torch.nn.ReLU6,
    torch.nn.LeakyReLU,
    torch.nn.PReLU,
    torch.nn.ELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Mish,
)
_SQUASH = (torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Hardtanh, torch.nn.Softsign)


class _Restore:
    """A replaced class attribute; ``remove()`` puts the original back."""

    def __init__(self, owner: type, name: str, original: Callable) -> None:
        self.owner, self.name, self.original = owner, name, original

    def remove(self) -> None:
        """Restore the original attribute."""
        setattr(self.owner, self.name, self.original)


def _scheduler_classes() -> list[type]:
    """Every scheduler class in ``torch.optim.lr_scheduler`` that defines its own ``step``."""
    bases = tuple(c for c in (getattr(_schedulers, "LRScheduler", None), _schedulers.ReduceLROnPlateau) if c)
    found = [
        c for c in vars(_schedulers).values() if isinstance(c, type) and issubclass(c, bases) and "step" in vars(c)
    ]
    return list(dict.fromkeys(found))  # an alias (two names, one class) is wrapped once


def _held_step(original: Callable, peaks: dict[int, float], held: set[int], floor: float) -> Callable:
    """``step`` that is undone from the first one taking a group's lr below ``floor`` × its highest lr on."""

    @functools.wraps(original)
    def step(scheduler, *args, **kwargs):
        optimizer = getattr(scheduler, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) or []
        before = [group.get("lr") for group in groups]
        for group, lr in zip(groups, before):
            if isinstance(lr, (int, float)):
                top = max(lr, float(group.get("initial_lr") or 0.0))
                peaks[id(group)] = max(peaks.get(id(group), 0.0), top)
        result = original(scheduler, *args, **kwargs)
        collapsed = id(scheduler) in held or any(
            isinstance(g.get("lr"), (int, float))
            and isinstance(lr, (int, float))
            and g["lr"] < floor * peaks.get(id(g), 0.0)
            for g, lr in zip(groups, before)
        )
        if collapsed:
            held.add(id(scheduler))
            for group, lr in zip(groups, before):
                group["lr"] = lr
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in groups]
            APPLIED["scheduler steps undone"] += 1
        return result

    return step


def hold_schedule(floor: float = FLOORS[0]) -> list:
    """Wrap every scheduler's ``step`` so that it is ignored once it would take an lr below ``floor`` × its peak."""
    peaks: dict[int, float] = {}
    held: set[int] = set()
    handles = []
    for cls in _scheduler_classes():
        original = vars(cls)["step"]
        cls.step = _held_step(original, peaks, held, floor)
        handles.append(_Restore(cls, "step", original))
    return handles


def _activation_after(modules: list[torch.nn.Module], i: int) -> str | None:
    """'relu' or 'squash' for the first activation module after ``modules[i]`` before the next layer."""
    for module in modules[i + 1 :]:
        if isinstance(module, _LAYERS):
            return None
        if isinstance(module, _RELU):
            return "relu"
        if isinstance(module, _SQUASH):
            return "squash"
    return None


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear or convolution weight."""
    field = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * field, weight.shape[0] * field


@torch.no_grad()
def init_layer(layer: torch.nn.Module, scheme: str, generator: torch.Generator) -> None:
    """He (``scheme`` 'relu') or Xavier ('squash') normal weights from ``generator``, and a zero bias."""
    weight = layer.weight
    fan_in, fan_out = _fans(weight)
    std = math.sqrt(2.0 / fan_in) if scheme == "relu" else math.sqrt(2.0 / (fan_in + fan_out))
    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, …)
        fan_in, fan_out = fan_out, fan_in
        std = math.sqrt(2.0 / fan_in) if scheme == "relu" else math.sqrt(2.0 / (fan_in + fan_out))
    drawn = torch.randn(weight.shape, generator=generator, dtype=torch.float64) * std
    weight.copy_(drawn.to(weight.dtype))
    if getattr(layer, "bias", None) is not None:
        layer.bias.zero_()


RELU_INSTEAD = 2.0  # the factor that selects ``relu_instead`` (He init) after re-initialisation (1.0)
RELU_OWN_INIT = 3.0  # ``relu_instead`` keeping the script's own weights


def _hidden_squashes(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The tanh/sigmoid modules of ``modules`` (module order) that have a layer after them."""
    last_layer = max((i for i, m in enumerate(modules) if isinstance(m, _LAYERS)), default=-1)
    return [m for i, m in enumerate(modules[:last_layer]) if isinstance(m, _SQUASH)]


def relu_instead(he: bool = True) -> list:
    """Hidden tanh/sigmoid modules compute ReLU, and (``he``) the layers before them get He initialisation."""
    swapped: set[int] = set()
    seen: set[int] = set()
    generator = torch.Generator().manual_seed(SEED)

    def forward_pre(module, args):
        if id(module) in seen:
            return
        modules = list(module.modules())
        hidden = {id(m) for m in _hidden_squashes(modules)}
        for i, layer in enumerate(modules):
            if id(layer) in hidden and id(layer) not in swapped:
                swapped.add(id(layer))
                APPLIED["tanh/sigmoid → ReLU"] += 1
            after = next((m for m in modules[i + 1 :] if isinstance(m, (*_LAYERS, *_RELU, *_SQUASH))), None)
            if he and isinstance(layer, _LAYERS) and id(layer) not in seen and id(after) in hidden:
                init_layer(layer, "relu", generator)  # a layer feeding a swapped activation
                APPLIED["He"] += 1
        seen.update(id(m) for m in modules)

    def forward(module, args, output):
        if id(module) in swapped and args and isinstance(args[0], torch.Tensor):
            return torch.relu(args[0])
        return None

    return [_module.register_module_forward_pre_hook(forward_pre), _module.register_module_forward_hook(forward)]


def reinitialise(family: str) -> Callable[[float], list]:
    """The re-initialisation counterfactual for a diagnosis family ('relu' or 'squash'); factor 2: ReLU instead."""

    def install(factor: float = 1.0) -> list:
        if factor in (RELU_INSTEAD, RELU_OWN_INIT):
            return relu_instead(he=factor == RELU_INSTEAD)
        done: set[int] = set()
        generator = torch.Generator().manual_seed(SEED)

        def forward_pre(module, args):
            if id(module) in done:
                return
            modules = list(module.modules())
            layers = [i for i, m in enumerate(modules) if isinstance(m, _LAYERS)]
            for i in layers:
                layer = modules[i]
                if id(layer) in done:
                    continue
                scheme = _activation_after(modules, i) or (family if i != layers[-1] else None)
                if scheme is not None:
                    init_layer(layer, scheme, generator)
                    APPLIED["He" if scheme == "relu" else "Xavier"] += 1
            done.update(id(m) for m in modules)

        return [_module.register_module_forward_pre_hook(forward_pre)]

    return install

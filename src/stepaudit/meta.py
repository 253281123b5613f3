"""Run metadata: what was trained with what, so a run folder explains itself later."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from . import __version__
from .maths import numel


def _plain(value: Any) -> Any:
    """Hyperparameter values as JSON-friendly scalars/lists (tensors and tuples included)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Hyperparameters of every parameter group (without the parameters themselves)."""
    return [
        {
            **{k: _plain(v) for k, v in group.items() if k != "params"},
            "n_params": sum(numel(p) for p in group["params"]),
        }
        for group in optimizer.param_groups
    ]


def describe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **extra: Any) -> dict:
    """Model summary, parameter counts, optimizer and groups, versions and seed."""
    params = list(model.parameters())
    return {
        "model": type(model).__name__,
        "model_summary": repr(model)[:20000],
        "modules": module_descriptions(model),
        "n_params": sum(numel(p) for p in params),
        "n_trainable": sum(numel(p) for p in params if p.requires_grad),
        "optimizer": type(optimizer).__name__,
        "param_groups": optimizer_groups(optimizer),
        "versions": {
            "stepaudit": __version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "seed": torch.initial_seed(),
        "device": str(params[0].device) if params else "cpu",
        **extra,
    }


def module_descriptions(model: torch.nn.Module, limit: int = 2000) -> dict[str, str]:
    """Type and parameter shapes of every module holding parameters, keyed by module path ("(root)" for the model's own).

    The report names its per-layer rows with these, e.g. ``"0": "Linear 256×64"`` (the weight's shape).
    """
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        shapes = dict(own)
        shown = [shapes["weight"]] if "weight" in shapes else [p for _, p in own]
        text = ", ".join(
            "uninitialised"
            if isinstance(p, torch.nn.parameter.UninitializedTensorMixin)
            else "×".join(map(str, p.shape)) or "scalar"
            for p in shown[:3]
        )
        found[path or "(root)"] = f"{type(module).__name__} {text}"
        if len(found) >= limit:
            break
    return found

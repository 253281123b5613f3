"""The diagonal preconditioner P of an adaptive optimizer, read from its own state, and its stability bound.

Cohen et al. (2022, "Adaptive Gradient Methods at the Edge of Stability") write an adaptive step as
preconditioned momentum Δw = −η P⁻¹ m with m the raw momentum buffer. For PyTorch's Adam/AdamW
(m an EMA of gradients, step −η m̂/(√v̂+ε) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)) that is
P = (1−β₁ᵗ)(√v̂ + ε), stable on the local quadratic while λ_max(P⁻¹H) < (2+2β₁)/(η(1−β₁)) = 38/η at
β₁ = 0.9. RMSprop: P = √v + ε (centered: √(v − ḡ²) + ε), heavy-ball momentum μ, bound (2+2μ)/η.
The state read is the optimizer's state after this step, i.e. the v that produced this step's Δw.
Groups with another learning rate η_g are folded into P (×η/η_g) so one η (the first group's) holds.
With η = 0 (a warm-up start) nothing moves: the bound is ∞ and P is left unfolded, so λ_max(P⁻¹H) is
still reported. L2 weight decay (Adam without decoupling, RMSprop) preconditions g + wd·w, so the
linearised step is −η P⁻¹(H + wd) Δw: ``weight_decay`` carries that per-element wd (AdamW's decoupled
decay shrinks w outside the preconditioner and adds nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Preconditioner:
    """P^{-1/2} as a flat vector (optimizer order; 0 where a parameter has no state), bound and rule,
    and the per-element L2 weight decay the optimizer preconditions with the gradient (None: none)."""

    inverse_sqrt: torch.Tensor | None
    bound: float
    rule: str
    weight_decay: torch.Tensor | None = None


def _adam_p(group: dict, state: dict) -> torch.Tensor:
    beta1, beta2 = (float(b) for b in group["betas"])
    step = float(state["step"])
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (1 - beta1**step) * ((second.double() / (1 - beta2**step)).sqrt() + float(group["eps"]))


def _rmsprop_p(group: dict, state: dict) -> torch.Tensor:
    second = state["square_avg"].double()
    if group.get("centered"):
        second = second - state["grad_avg"].double() ** 2
    return second.clamp_min(0).sqrt() + float(group["eps"])


def _coupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """The L2 weight decay added to g before preconditioning; 0 for decoupled decay (AdamW)."""
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return 0.0
    return float(group.get("weight_decay", 0.0))


def _bound(kind: str, first: dict) -> tuple[float, str]:
    """The stability bound on λ_max(P⁻¹H) at the first group's η, and its rule; ∞ when η = 0."""
    lr = float(first["lr"])
    if kind == "adam":
        beta1 = float(first["betas"][0])
        times, rule = (2 + 2 * beta1) / (1 - beta1), "(2+2β₁)/(η(1−β₁))"
    else:
        momentum = float(first.get("momentum", 0.0))
        times, rule = 2 + 2 * momentum, "(2+2μ)/η" if momentum else "2/η"
    if lr == 0:
        return math.inf, f"{rule} with η = 0: no step, no bound (P unfolded)"
    return times / lr, rule


def preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Preconditioner:
    """P⁻¹ᐟ² and the stability bound for Adam, AdamW and RMSprop; ``inverse_sqrt=None`` (with why) otherwise."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        read, kind = _adam_p, "adam"
    elif isinstance(optimizer, torch.optim.RMSprop):
        read, kind = _rmsprop_p, "rmsprop"
    else:
        return Preconditioner(
            None, float("nan"), f"precond_sharpness supports Adam, AdamW and RMSprop, not {type(optimizer).__name__}"
        )
    first = optimizer.param_groups[0]
    lr = float(first["lr"])
    bound, rule = _bound(kind, first)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    coupled = any(_coupled_decay(optimizer, g) for g in optimizer.param_groups)
    pieces, decays = [], []
    for p in params:
        group, state = group_of[id(p)], optimizer.state.get(p, {})
        if coupled:
            wd = _coupled_decay(optimizer, group)
            decays.append(torch.full((p.numel(),), wd, dtype=torch.float64, device=p.device))
        if "step" not in state or (lr and not group["lr"]):
            pieces.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))  # never updated
            continue
        fold = lr / float(group["lr"]) if lr else 1.0
        scaled = read(group, state).reshape(-1) * fold
        pieces.append(torch.where(scaled > 0, scaled.rsqrt(), torch.zeros_like(scaled)))  # P=0: v=0, no move
    if not pieces:
        return Preconditioner(None, bound, "the optimizer holds no parameters")
    if coupled:
        rule = f"{rule}; L2 weight decay: λ_max(P⁻¹(H + wd))"
        return Preconditioner(torch.cat(pieces), bound, rule, torch.cat(decays))
    return Preconditioner(torch.cat(pieces), bound, rule)

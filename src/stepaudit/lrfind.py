"""``stepaudit.lr_find``: the exponential learning-rate range test, audited, that leaves training untouched.

One optimizer step per learning rate on successive batches, lr growing geometrically from ``start_lr``
to ``end_lr`` (Smith 2017; fastai's ``lr_find``): the training loss of each batch, its smoothed curve
(bias-corrected exponential average, β = 0.98) and a stop once the smoothed loss exceeds 4× its minimum.
Beside that curve it measures what only a re-evaluation can: after each step the same batch is evaluated
again at the new weights (same dropout masks, buffers put back), giving the own-batch loss change against
the first-order promise g·Δw, α (``probes.step.parabola``) and the verdict; and once, at the start weights
on the first batch, λ_max of the Hessian (Lanczos over Hessian-vector products, ``linalg``), with the safe
learning rate of the optimizer (``probes.curvature.safe_lr``: 2/λ_max for plain SGD) or, for Adam, AdamW and
RMSprop, the preconditioned sharpness λ_max(P⁻¹H) and the lr at which it meets its stability bound.

Afterwards weights, ``.grad``, buffers, train/eval flags, optimizer state and hyperparameters, and the CPU,
CUDA, Python and NumPy random streams are exactly as they were (the original tensor objects, their values
copied back). The batches consumed from ``batches`` are not given back: pass a fresh iterator or a list.

Size (over 400 lines): the sweep, its exact snapshot and restore, and the curvature at the start weights share
one set of invariants (nothing the sweep touches survives it); the result, suggestion and plot are separate modules.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.optim.optimizer as _optim

from . import linalg
from .context import Part, StepContext, check_scalar_loss
from .lrfind_result import Curvature, LRFindResult
from .lrfind_suggest import smooth_step, steady_gain
from .precision import working_roundoff
from .probes.curvature import safe_lr
from .probes.preconditioner import preconditioner
from .probes.step import rounding_noise, step_fields
from .state import AutocastState, RngState, cuda_devices, preserved, without_grad


class Snapshot:
    """Everything ``lr_find`` may change, kept so that ``restore`` puts back the same objects with the same bits."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.modules = [(m, m.training) for m in model.modules()]
        self.params = [
            (p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.detach().clone())
            for p in _unique(list(model.parameters()) + _optimizer_params(optimizer))
        ]
        self.buffers = [
            (m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None
        ]
        self.state = {p: (s, {k: _saved(v) for k, v in s.items()}) for p, s in optimizer.state.items()}
        self.groups = [
            (g, {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
        ]
        self.rng = RngState.capture(cuda_devices(model), host=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every captured object back in place and copy its saved values into it."""
        for p, value, grad, grad_value in self.params:
            p.copy_(value)
            if grad is not None:
                grad.copy_(grad_value)
            p.grad = grad
        for module, name, buffer, value in self.buffers:
            module._buffers[name] = buffer
            buffer.copy_(value)
        self.optimizer.state.clear()
        for p, (state, saved) in self.state.items():
            originals = dict(state)
            state.clear()
            for key, (kind, value) in saved.items():
                original = originals.get(key)
                if kind == "tensor" and isinstance(original, torch.Tensor) and original.shape == value.shape:
                    original.copy_(value)
                    state[key] = original
                else:
                    state[key] = value.clone() if kind == "tensor" else copy.deepcopy(value)
            self.optimizer.state[p] = state
        for group, saved in self.groups:
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update({k: copy.deepcopy(v) for k, v in saved.items()})
        for module, mode in self.modules:
            module.training = mode
        self.rng.apply()


@contextlib.contextmanager
def step_hooks_held_back(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Hold back the optimizer step hooks (this optimizer's and the global ones) while the block runs.

    The sweep's steps are not training steps: an open ``Audit`` or the doctor's passive capture must not count
    them. The same hook dicts are emptied and refilled in place, so the hooks' handles keep working.
    """
    tables = [
        getattr(optimizer, "_optimizer_step_pre_hooks", {}),
        getattr(optimizer, "_optimizer_step_post_hooks", {}),
        _optim._global_optimizer_pre_hooks,
        _optim._global_optimizer_post_hooks,
    ]
    saved = [dict(table) for table in tables]
    for table in tables:
        table.clear()
    try:
        yield
    finally:
        for table, hooks in zip(tables, saved):
            table.clear()
            table.update(hooks)


def _saved(value: Any) -> tuple[str, Any]:
    return ("tensor", value.detach().clone()) if isinstance(value, torch.Tensor) else ("value", copy.deepcopy(value))


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def lr_grid(start_lr: float, end_lr: float, num: int) -> np.ndarray:
    """``num`` learning rates in exact geometric progression from ``start_lr`` to ``end_lr`` (both included)."""
    if not (start_lr > 0 and end_lr > start_lr and math.isfinite(end_lr)):
        raise ValueError(f"need 0 < start_lr < end_lr < inf, got start_lr={start_lr!r}, end_lr={end_lr!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an int ≥ 2, got {num!r}")
    grid = start_lr * (end_lr / start_lr) ** (np.arange(num, dtype=np.float64) / (num - 1))
    grid[-1] = end_lr
    return grid


def _batches(batches: Iterable) -> Iterator[Any]:
    """The batches, started again from the beginning when a re-iterable source (a list, a DataLoader) runs out."""
    while True:
        source = iter(batches)
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty or source is batches:
            return


def _named(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the optimizer's trainable parameters, which must belong to ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in _unique(_optimizer_params(optimizer)) if p.requires_grad]
    missing = [p for p in params if id(p) not in names]
    if missing:
        raise ValueError(
            f"{len(missing)} optimizer parameter(s) are not parameters of the model; "
            "pass the model the optimizer trains"
        )
    if not params:
        raise ValueError("the optimizer holds no trainable parameter")
    return [names[id(p)] for p in params], params


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _context(model, optimizer, loss_fn, names, params, batch, rng, autocast) -> StepContext:
    """A StepContext at the live weights on ``batch``, for its pure ``params -> loss`` function."""
    zeros = [torch.zeros_like(p) for p in params]
    return StepContext(
        step=0,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        parts=[Part(batch, rng)],
        autocast=autocast,
        names=names,
        params=params,
        before=[p.detach().clone() for p in params],
        grads=zeros,
    )


def _top(
    operator: Callable, dim: int, dtype: torch.dtype, device: torch.device, tol: float, max_hvps: int, seed: int
) -> linalg.LanczosResult:
    """λ_max by Lanczos from a random start drawn on a private generator (never the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(
        dtype=linalg.working_dtype(dtype), device=device
    )
    return linalg.lanczos(operator, dim, iterations=max_hvps, start=start, tol=tol, verify=True)


def sharpness_at(
    ctx: StepContext, optimizer: torch.optim.Optimizer, tol: float, max_hvps: int, seed: int
) -> tuple[float, float, float, str]:
    """(λ_max, its residual, the safe lr, the rule) of the Hessian at the context's weights on its batch."""
    before = tuple(ctx.before)
    hvp = linalg.make_hvp(ctx.loss_of_params(), before)
    result = _top(hvp, hvp.dim, before[0].dtype, before[0].device, tol, max_hvps, seed)
    safe, rule = safe_lr(optimizer, result.eigenvalue)
    return result.eigenvalue, result.residual, safe, rule


def precond_at(
    ctx: StepContext, optimizer: torch.optim.Optimizer, tol: float, max_hvps: int, seed: int
) -> tuple[float, float, str] | None:
    """(λ_max(P⁻¹(H + wd)), the lr at which it meets its stability bound, the rule); None without optimizer state."""
    found = preconditioner(optimizer, ctx.params)
    if found.inverse_sqrt is None or not bool((found.inverse_sqrt > 0).all()):
        return None
    before = tuple(ctx.before)
    hvp = linalg.make_hvp(ctx.loss_of_params(), before)
    dtype = linalg.working_dtype(before[0].dtype)
    d = found.inverse_sqrt.to(device=before[0].device, dtype=dtype)
    decay = None if found.weight_decay is None else (d**2 * found.weight_decay.to(d)).to(dtype)

    def operator(v: torch.Tensor) -> torch.Tensor:
        out = d * hvp((d * v.to(dtype)).to(before[0].dtype)).to(dtype)
        return out if decay is None else out + decay * v.to(dtype)

    result = _top(operator, hvp.dim, dtype, d.device, tol, max_hvps, seed)
    lr = float(optimizer.param_groups[0]["lr"])
    return result.eigenvalue, found.bound * lr / result.eigenvalue, found.rule


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios):
        group["lr"] = lr * ratio


def lr_find(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num: int = 100,
    *,
    stop_div: bool = True,
    div_factor: float = 4.0,
    beta: float = 0.98,
    curvature: bool = True,
    tol: float = 1e-4,
    max_hvps: int = 40,
    seed: int = 0,
) -> LRFindResult:
    """Run the audited range test and restore everything it touched; returns an ``LRFindResult``.

    ``loss_fn(model, batch)`` returns the scalar training loss (as for ``Audit``). Every parameter group's lr
    follows the grid, keeping its ratio to the first group's lr. The sweep stops early when the smoothed loss
    exceeds ``div_factor`` × its minimum (``stop_div``), when a loss is not finite, or when a one-pass
    iterator of batches runs out. ``curvature=False`` skips λ_max and the preconditioned sharpness. Optimizer
    step hooks (an open ``Audit``'s, the doctor's) are held back during the sweep: its steps are not training.
    ``result.suggestion`` is stepaudit's: half the first lr from which steps raised their own batch's loss (on
    3 of 5 steps; where a plain step lands near its batch's valley floor, α ≈ 0, instead of past it), times
    G_sweep/G_train for heavy-ball momentum (the gain over a plain step the sweep's steps had, over the
    steady-state (1−d)/(1−β) of training); for Adam, AdamW, RMSprop 1/(G_train·κ_P), the floor of the own-batch
    parabola along the step in the optimizer's metric (``lrfind_suggest`` derives both), capped by the stability bound at the
    start weights (2/λ_max for plain SGD, the preconditioned bound for Adam); fastai's valley when no step
    raised it. fastai's minimum/10, steep, valley and slide are in ``result.suggestions``.
    """
    lrs = lr_grid(float(start_lr), float(end_lr), num)
    names, params = _named(model, optimizer)
    base = float(optimizer.param_groups[0].get("lr", 0.0) or 0.0)
    ratios = [float(g["lr"]) / base if base > 0 else 1.0 for g in optimizer.param_groups]
    snapshot = Snapshot(model, optimizer)
    try:
        with step_hooks_held_back(optimizer):
            settings = SweepSettings(stop_div, div_factor, beta, curvature, tol, max_hvps, seed)
            return _sweep(model, optimizer, loss_fn, batches, lrs, (names, params, ratios), settings)
    finally:
        snapshot.restore()


@dataclass(frozen=True)
class SweepSettings:
    """``lr_find``'s keyword settings, as the sweep reads them."""

    stop_div: bool
    div_factor: float
    beta: float
    curvature: bool
    tol: float
    max_hvps: int
    seed: int


def _sweep(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    batches: Iterable,
    lrs: list[float],
    layout: tuple[list, list, list[float]],
    settings: SweepSettings,
) -> LRFindResult:
    """The range test proper (the caller restores the state afterwards); ``layout``: (names, params, lr ratios)."""
    names, params, ratios = layout
    stop_div, div_factor, beta, curvature = settings.stop_div, settings.div_factor, settings.beta, settings.curvature
    tol, max_hvps, seed = settings.tol, settings.max_hvps, settings.seed
    devices = cuda_devices(model)
    source = _batches(batches)
    rows: list[dict] = []
    info = Curvature()
    first = next(source, None)
    if first is None:
        raise ValueError("batches is empty")
    autocast = AutocastState.capture()
    roundoff = 64 * working_roundoff(params, autocast)
    first_rng = RngState.capture(devices)
    if curvature:
        ctx = _context(model, optimizer, loss_fn, names, params, first, first_rng, autocast)
        info.sharpness, info.residual, info.safe_lr, info.safe_rule = sharpness_at(ctx, optimizer, tol, max_hvps, seed)
        info.precond = precond_at(ctx, optimizer, tol, max_hvps, seed)
        info.precond_where = "start weights, the optimizer's own state" if info.precond else ""
    precond_step = max(1, len(lrs) // 10)
    start_flat = _flat(params)
    average, best, batch, stopped = 0.0, math.inf, first, "end of the grid"
    flags: dict = {}
    for i, lr in enumerate(lrs):
        if i:
            batch = next(source, None)
            if batch is None:
                stopped = "the batches ran out"
                break
        _set_lr(optimizer, float(lr), ratios)
        rng = first_rng if i == 0 else RngState.capture(devices)
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = check_scalar_loss(loss_fn(model, batch))
            loss.backward()
        loss_before = float(loss.detach())
        weights = _flat(params)
        grad = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        optimizer.step()
        delta_w = _flat(params) - weights
        first_order = float(torch.dot(grad.double(), delta_w.double()))

        def evaluate(rng: RngState = rng, batch: Any = batch) -> float:
            with preserved(model, rng, autocast):
                return float(check_scalar_loss(loss_fn(model, batch)))

        loss_after = without_grad(evaluate, flags)
        noise = rounding_noise(loss_before, loss_after, roundoff)
        row = {
            "lr": float(lr),
            "loss": loss_before,
            "grad_sq": float(torch.dot(grad.double(), grad.double())),
            **dict(zip(("grad_metric", "step_metric"), metrics(optimizer, params, grad, delta_w))),
            **step_fields(loss_before, loss_after, first_order, noise, bool(delta_w.any())),
        }
        average, row["smooth_loss"] = smooth_step(average, loss_before, beta, i)
        rows.append(row)
        if curvature and info.precond is None and i + 1 == precond_step and adaptive(optimizer):
            ctx = _context(model, optimizer, loss_fn, names, params, first, first_rng, autocast)
            info.precond = precond_at(ctx, optimizer, tol, max_hvps, seed)
            moved = float(torch.linalg.vector_norm(_flat(params) - start_flat) / torch.linalg.vector_norm(start_flat))
            info.precond_where = (
                f"after the sweep's first {precond_step} steps (lr ≤ {lr:.3g}; weights moved "
                f"{moved:.2g} of their norm), first batch"
            )
        if not math.isfinite(loss_before) or not math.isfinite(row["smooth_loss"]):
            stopped = "the loss was not finite"
            break
        best = min(best, row["smooth_loss"])
        if stop_div and row["smooth_loss"] > div_factor * best:
            stopped = f"the smoothed loss exceeded {div_factor:g}× its minimum"
            break
    if curvature and info.precond is None:
        info.precond_where = (
            f"not applicable: {preconditioner(optimizer, params).rule}"
            if not adaptive(optimizer)
            else "not measured: the optimizer held no second-moment state"
        )
    return LRFindResult.build(
        rows,
        lrs,
        stopped,
        info,
        optimizer_name=type(optimizer).__name__,
        momentum=steady_gain(optimizer),
        preconditioned=adaptive(optimizer),
    )


def metrics(
    optimizer: Any, params: list[torch.Tensor], grad: torch.Tensor, delta_w: torch.Tensor
) -> tuple[float, float]:
    """(gᵀP⁻¹g, ΔwᵀPΔw) in the metric the optimizer steps in (Δw = −lr·P⁻¹m; P after the step; I for SGD; NaN else)."""
    g, dw = grad.double(), delta_w.double()
    if adaptive(optimizer):
        found = preconditioner(optimizer, params)
        if found.inverse_sqrt is None:
            return math.nan, math.nan
        d = found.inverse_sqrt.to(device=g.device)  # P^{-1/2}; 0 where a parameter has no state (and no step)
        root_p = torch.where(d > 0, 1 / d, torch.zeros_like(d))  # P^{1/2}
        return float(torch.dot(d * g, d * g)), float(torch.dot(root_p * dw, root_p * dw))
    if isinstance(optimizer, torch.optim.SGD):
        return float(torch.dot(g, g)), float(torch.dot(dw, dw))
    return math.nan, math.nan


def adaptive(optimizer: Any) -> bool:
    """Adam, AdamW or RMSprop: a diagonal preconditioner P read from the second moment (``probes.preconditioner``)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop))

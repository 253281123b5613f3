"""Evaluate an expression tree with PyTorch autograd in float64: node values, gradients, local rules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .parse import SYMBOL, ExplainError, Expr, snippet, variables

DTYPE = torch.float64
CLASSIC_POINT = {"x": -2.0, "y": 5.0, "z": -4.0}

# abs is x*sign(x): the same values and derivatives as torch.abs, whose double backward
# (for the Hessian) triggers a one-off import costing about two seconds.
_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "abs": lambda t: t * torch.sign(t),
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
}
_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
}

# What each gate does to the gradient flowing back through it.
RULES: dict[str, tuple[str, str]] = {  # op -> (short tag, sentence)
    "add": ("distributes", "hands its gradient unchanged to every input"),
    "sub": ("± distributes", "hands its gradient to the left input and its negative to the right"),
    "mul": ("swaps", "each input gets the gradient times the other input"),
    "div": ("1/b, −a/b²", "a gets grad/b, b gets −grad·a/b²"),
    "pow": ("b·aᵇ⁻¹", "the base gets grad·b·aᵇ⁻¹; a varying exponent gets grad·aᵇ·ln a"),
    "neg": ("flips sign", "hands back the gradient with its sign flipped"),
    "exp": ("× output", "multiplies the gradient by its own output"),
    "log": ("÷ input", "divides the gradient by its input"),
    "sqrt": ("÷ 2·output", "divides the gradient by 2·output"),
    "abs": ("× sign", "multiplies the gradient by the sign of its input"),
    "sin": ("× cos", "multiplies the gradient by cos(input)"),
    "cos": ("× −sin", "multiplies the gradient by −sin(input)"),
    "tanh": ("× (1−out²)", "multiplies the gradient by 1 − output²"),
    "sigmoid": ("× s(1−s)", "multiplies the gradient by output·(1 − output)"),
    "relu": ("gates", "passes the gradient if its input is > 0, blocks it otherwise"),
    "max": ("routes", "the whole gradient goes to the largest input (split evenly on ties)"),
    "min": ("routes", "the whole gradient goes to the smallest input (split evenly on ties)"),
    "loss": ("× (f−T)", "hands down (f − T) times its gradient"),
}


def objective_expr(expr: Expr, target: float | None) -> Expr:
    """The tree that is minimised: EXPR itself, or a loss gate 1/2*(EXPR - T)^2 on top of it."""
    if target is None:
        return expr
    return Expr("loss", (expr,), value=float(target), text=f"½(f − {_num(target)})²")


def _num(v: float) -> str:
    return f"{v:.6g}"


def apply(op: str, args: list[torch.Tensor], const: float | None = None) -> torch.Tensor:
    """Apply one gate to already evaluated inputs."""
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in _BINARY:
        return _BINARY[op](args[0], args[1])
    if op in ("max", "min"):
        stacked = torch.stack(torch.broadcast_tensors(*args))
        return stacked.amax(0) if op == "max" else stacked.amin(0)  # ties split the gradient evenly
    if op == "loss":
        return 0.5 * (args[0] - const) ** 2
    raise ExplainError(f"unknown operation {op!r}")  # unreachable for parsed trees


def evaluate(
    expr: Expr, env: Mapping[str, torch.Tensor], record: list[tuple[Expr, torch.Tensor, tuple[int, ...]]] | None = None
) -> torch.Tensor:
    """Evaluate ``expr`` with tensors from ``env`` (any common shape); optionally record every node."""

    def walk(e: Expr) -> tuple[torch.Tensor, int]:
        kids = [walk(a) for a in e.args]
        if e.op == "const":
            t = torch.tensor(e.value, dtype=DTYPE)
        elif e.op == "var":
            # one distinct tensor per occurrence, so each wire keeps its own gradient
            t = env[e.name].clone() if record is not None else env[e.name]  # type: ignore[index]
        else:
            t = apply(e.op, [k[0] for k in kids], e.value)
        if record is None:
            return t, -1
        record.append((e, t, tuple(k[1] for k in kids)))
        return t, len(record) - 1

    return walk(expr)[0]


@dataclass
class Gate:
    """One node of the circuit drawn as a tree (a variable appears once per occurrence)."""

    id: int
    op: str
    text: str
    value: float
    grad: float | None  # d objective / d (this wire); None where nothing upstream varies
    inputs: tuple[int, ...]
    name: str | None = None  # variable name for "var"
    local: tuple[float | None, ...] = ()  # d out / d input_k, None for constant inputs


@dataclass
class Circuit:
    """The evaluated circuit at one point."""

    expr: Expr
    target: float | None
    names: list[str]
    point: dict[str, float]
    value: float  # EXPR at the point
    objective: float  # EXPR, or 1/2*(EXPR - T)^2
    grads: dict[str, float]  # d objective / d variable
    expr_grads: dict[str, float]  # d EXPR / d variable
    gates: list[Gate]  # post-order: inputs before the gates that use them, root last


def resolve_point(names: list[str], at: Mapping[str, float] | None) -> dict[str, float]:
    """Values for every variable: ``at``, then the classic x=-2, y=5, z=-4; anything else must be given."""
    if not names:
        raise ExplainError("nothing to optimise: the expression has no variables")
    at = dict(at or {})
    for k, v in at.items():
        if k not in names:
            raise ExplainError(
                f"--at sets {k!r}, which is not in the expression (variables: {', '.join(names) or 'none'})"
            )
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            raise ExplainError(f"--at {k}={v!r}: the value must be a finite number")
    point = {}
    for n in names:
        if n in at:
            point[n] = float(at[n])
        elif n in CLASSIC_POINT:
            point[n] = CLASSIC_POINT[n]
        else:
            raise ExplainError(f"no value for {n!r}: pass it with --at {n}=VALUE")
    return point


def build(expr: Expr, at: Mapping[str, float] | None = None, target: float | None = None) -> Circuit:
    """Run the forward and backward pass, keeping every node's value, gradient and local derivatives."""
    names = variables(expr)
    point = resolve_point(names, at)
    leaves = {n: torch.tensor(point[n], dtype=DTYPE, requires_grad=True) for n in names}
    record: list[tuple[Expr, torch.Tensor, tuple[int, ...]]] = []
    root = evaluate(objective_expr(expr, target), leaves, record)
    for e, t, kids in record:
        if not torch.isfinite(t):
            shown = ", ".join(
                f"{snippet(record[k][0].text, 24)} = {_num(record[k][1].item())}"
                for k in kids
                if record[k][0].op != "const"
            )
            where = f" (col {e.col})" if e.col else ""
            raise ExplainError(
                f"{snippet(e.text)!r}{where} is not finite at this point "
                f"({_num(t.item())}{'; inputs: ' + shown if shown else ''})"
            )
        if t.requires_grad:
            t.retain_grad()
    root.backward(retain_graph=True)
    # snapshot now: later autograd.grad calls also fire retain_grad hooks and would add to .grad
    wire_grads = [_item(t.grad) if t.requires_grad else None for _, t, _ in record]
    grads = {n: _item(leaves[n].grad) for n in names}
    f_tensor = record[-1][1] if target is None else record[-2][1]
    expr_grads = torch.autograd.grad(f_tensor, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
    gates = []
    for i, (e, t, kids) in enumerate(record):
        local: tuple[float | None, ...] = ()
        if kids and t.requires_grad:
            ins = [record[k][1] for k in kids]
            live = [x for x in ins if x.requires_grad]
            parts = iter(torch.autograd.grad(t, live, retain_graph=True, allow_unused=True))
            local = tuple(_item(next(parts)) if x.requires_grad else None for x in ins)
        gates.append(Gate(i, e.op, e.text or _label(e), t.item(), wire_grads[i], kids, e.name, local))
    for g in gates:
        if any(v is not None and not math.isfinite(v) for v in g.local):
            raise ExplainError(
                f"{snippet(g.text)!r} has no finite slope at this point "
                f"(local derivatives {', '.join(map(str, g.local))})"
            )
    for g in reversed(gates):
        if g.grad is not None and not math.isfinite(g.grad):
            raise ExplainError(f"the gradient at {snippet(g.text)!r} is not finite at this point ({g.grad})")
    return Circuit(
        expr,
        target,
        names,
        point,
        f_tensor.item(),
        root.item(),
        grads,
        {n: _item(g) for n, g in zip(names, expr_grads)},
        gates,
    )


def _item(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.item())


def _label(e: Expr) -> str:
    if e.op == "const":
        return _num(e.value)  # type: ignore[arg-type]
    return SYMBOL.get(e.op, e.op)


def objective_fn(expr: Expr, names: list[str], target: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The objective as a function of a stacked variable tensor ``w[..., i]`` (for Hessians and scans)."""
    tree = objective_expr(expr, target)

    def fn(w: torch.Tensor) -> torch.Tensor:
        return evaluate(tree, {n: w[..., i] for i, n in enumerate(names)})

    return fn

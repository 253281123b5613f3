"""Assemble the full explanation (the ``--json`` object) and its plain-language verdict."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from .circuit import RULES, Circuit, build, objective_fn
from .descent import hessian_at, profile, quadratic_bound, sequential, simultaneous
from .lrset import decreasing_set
from .parse import SYMBOL, ExplainError, Expr, parse

DEFAULT_EXPR = "(x + y) * z"


def fmt(v: float | None, digits: int = 6) -> str:
    """Short, exact-looking number: 6 significant digits, no '-0', 'inf' spelled out."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "undefined"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = f"{v:.{digits}g}"
    return "0" if s in ("-0", "0") else s


def _clean(x: Any) -> Any:
    """Make ``x`` strictly valid JSON: non-finite floats (a step out of the domain) become null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _nodes(c: Circuit) -> list[dict]:
    """The circuit as a DAG: one node per variable (gradients from all its uses add up), then gates."""
    ids: dict[int, int] = {}
    nodes = [
        {"id": i, "op": "var", "label": n, "text": n, "value": c.point[n], "grad": c.grads[n], "inputs": [], "uses": 0}
        for i, n in enumerate(c.names)
    ]
    for g in c.gates:
        if g.op == "var":
            ids[g.id] = c.names.index(g.name)  # type: ignore[arg-type]
            nodes[ids[g.id]]["uses"] += 1
            continue
        ids[g.id] = len(nodes)
        node: dict[str, Any] = {
            "id": len(nodes),
            "op": g.op,
            "label": _label(g.op, g.text),
            "text": g.text,
            "value": g.value,
            "grad": g.grad,
            "inputs": [ids[k] for k in g.inputs],
        }
        if g.op != "const":
            node["rule"] = RULES[g.op][1]
            node["local"] = list(g.local)
            node["input_grads"] = [None if loc is None or g.grad is None else g.grad * loc for loc in g.local]
        nodes.append(node)
    return nodes


def _label(op: str, text: str) -> str:
    if op == "const":
        return text
    if op == "loss":
        return "loss"
    return SYMBOL.get(op, op)


def explain(
    expr: str = DEFAULT_EXPR, at: Mapping[str, float] | None = None, lr: float = 0.1, target: float | None = None
) -> dict:
    """Backprop on ``expr`` at ``at``, one gradient step of size ``lr``, and the decreasing-lr set."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ExplainError(f"--lr must be a positive finite number, got {lr!r}")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target)
    ):
        raise ExplainError(f"--target must be a finite number, got {target!r}")
    target = None if target is None else float(target)
    tree = parse(expr)
    with np.errstate(all="ignore"):  # overflow in a huge step shows up as null, not as warnings
        return _explain(tree, expr, at, float(lr), target)


def _explain(tree: Expr, expr: str, at: Mapping[str, float] | None, lr: float, target: float | None) -> dict:
    c = build(tree, at, target)
    names = c.names
    w = np.array([c.point[n] for n in names])
    g = np.array([c.grads[n] for n in names])
    fn = objective_fn(tree, names, target)
    h = hessian_at(fn, w)
    step = simultaneous(fn, names, w, g, h, lr)
    seq = sequential(fn, names, w, g, lr)
    qb, ghg = quadratic_bound(g, h)
    dset = decreasing_set(tree, target, fn, names, w, g, (lr,) + ((qb,) if qb else ()))
    ivs = dset["intervals"]
    unbounded = bool(ivs) and dset.get("sup", ivs[-1][1]) is None
    out = {
        "expr": expr.strip(),
        "variables": names,
        "at": c.point,
        "lr": lr,
        "target": target,
        "objective": {"formula": "f" if target is None else f"½(f − {fmt(target)})²", "value": c.objective},
        "value": c.value,
        "grads": c.grads,
        "expr_grads": c.expr_grads,
        "nodes": _nodes(c),
        "hessian": {
            "names": names,
            "matrix": h.tolist(),
            "gHg": ghg,
            "quadratic_term": step.quadratic,
            "off_diagonal": [
                {"pair": [names[i], names[j]], "value": float(h[i, j])}
                for i in range(len(names))
                for j in range(i + 1, len(names))
                if h[i, j] != 0.0
            ],
        },
        "step": asdict(step),
        "sequential": seq,
        "decreasing_lr": {**dset, "unbounded": unbounded},
        "max_decreasing_lr": None if not ivs or unbounded else dset.get("sup", ivs[-1][1]),
        "first_stop_lr": ivs[0][1] if ivs and ivs[0][0] == 0.0 else None,
        "quadratic_bound_lr": qb,
        "profile": profile(fn, w, g, [lr, qb] + [e for iv in ivs for e in iv]),
    }
    out = _clean(out)
    out["verdict"] = verdict(out)
    return out


def objective_name(r: dict) -> str:
    """The objective's letter in the text: f for an expression, L for a loss against a target."""
    return "f" if r["target"] is None else "L"


def verdict(r: dict) -> str:
    """One plain-language paragraph: what the step did, why, and how large a step still helps."""
    f, s, d = objective_name(r), r["step"], r["decreasing_lr"]
    parts = [] if r["target"] is None else [f"Here L = ½(f − {fmt(r['target'])})² is minimised."]
    if not any(r["grads"].values()):
        parts.append(f"All partial derivatives of {f} are zero here, so a gradient step does not move.")
        return " ".join(parts)
    a, lr = s["actual"], fmt(s["lr"])
    if a is None:
        parts.append(f"A step of lr = {lr} leaves the domain: {f} is undefined at the new point.")
    else:
        how = f"lowers {f} by {fmt(-a)}" if a < 0 else (f"raises {f} by {fmt(a)}" if a > 0 else f"leaves {f} unchanged")
        parts.append(
            f"A simultaneous step of lr = {lr} {how} (from {fmt(s['objective_before'])} to "
            f"{fmt(s['objective_after'])})."
        )
        parts.append(_split_sentence(s, a, len(r["variables"])))
        flips = s["sign_flips"]
        parts.append(
            "After the step "
            + ", ".join(f"∂{f}/∂{x['name']} changed sign ({fmt(x['before'])} → {fmt(x['after'])})" for x in flips)
            + ": backprop took every slope before any weight moved."
            if flips
            else "No partial derivative changed sign."
        )
    parts.append(_lr_sentence(r, f, d))
    q = r["sequential"]
    if len(q["order"]) == 1:
        pass  # one weight: "one at a time" is the same step
    elif q["actual"] is None:
        parts.append(f"One weight at a time, {f} also ends up undefined.")
    elif a is not None and negligible(q["actual"] - a, a, rel=1e-9):
        parts.append("One weight at a time gives the same change: here the order of updates does not matter.")
    else:
        seq_flips = [u["name"] for u in q["updates"] if u["sign_flipped"]]
        parts.append(
            f"One weight at a time ({', then '.join(q['order'])}, recomputing the gradient "
            f"before each update) changes {f} by {fmt(q['actual'])} instead"
            + (f"; on the way ∂{f}/∂{seq_flips[0]} had flipped sign" if seq_flips else "")
            + "."
        )
    return " ".join(parts)


def _split_sentence(s: dict, a: float, n_vars: int) -> str:
    """First-order prediction versus the rest of the change, and the interplay's share."""
    pred = f"First order predicted {fmt(s['predicted'])} (−lr·‖g‖²)"
    if negligible(s["remainder"], a, s["predicted"], rel=1e-9):
        return pred + ", and that is the whole change (up to rounding)."
    second = f"the second-order term ½ΔᵀHΔ = {fmt(s['quadratic'])}"
    text = (
        f"{pred}; the remaining {fmt(s['remainder'])} is "
        + (
            f"exactly {second}"
            if negligible(s["higher_order"], a, s["predicted"], rel=1e-9)
            else f"{second} plus {fmt(s['higher_order'])} of higher order"
        )
        + "."
    )
    if n_vars == 1:
        return text
    if not s["interplay"]:
        return text + " The weights do not interact (no off-diagonal Hessian terms)."
    return text + (
        " Interplay between different weights (off-diagonal Hessian terms, ignored by "
        f"the first-order prediction) contributes {fmt(s['interplay'])} of it."
    )


def _lr_sentence(r: dict, f: str, d: dict) -> str:
    ivs, qb = d["intervals"], r["quadratic_bound_lr"]
    where = (
        ""
        if d["method"] != "numerical"
        else (f" (numerical: lr scanned from {fmt(d['scan']['from'])} to {fmt(d['scan']['to'])}, refined by bisection)")
    )
    if not ivs:
        return f"No learning rate lowers {f} along −g{where}."
    first = ivs[0]
    if first[0] == 0.0 and first[1] is None:
        curv = (
            f" (the curvature along −g, gᵀHg = {fmt(r['hessian']['gHg'])}, is not positive)"
            if r["hessian"]["gHg"] is not None and r["hessian"]["gHg"] <= 0
            else ""
        )
        text = f"{f} keeps going down for every lr > 0 along −g{curv}, so no learning rate is too large{where}."
        if qb is None:
            return text
    elif first[0] == 0.0:
        text = f"It would stop lowering {f} above lr = {fmt(first[1])}{where}"
        more = _ivs_text(ivs[1:4]) + (
            f" and {d.get('count', len(ivs)) - 4} more intervals" if d.get("count", len(ivs)) > 4 else ""
        )
        text += (f"; it lowers {f} again for lr in {more}" if ivs[1:] else "") + "."
    else:
        text = f"The decreasing learning rates are {_ivs_text(ivs[:4])}{where}."
    if qb is None:
        return text + " The quadratic model sees no limit (gᵀHg ≤ 0)."
    exact = d["method"] == "polynomial" and d.get("degree", 9) <= 2
    true = first[1] if first[0] == 0.0 else None
    return text + (
        f" The quadratic model's bound 2‖g‖²/(gᵀHg) = {fmt(qb)}"
        + (
            " is exact here, because the objective is quadratic along the step."
            if exact
            else f" is only a local estimate{'' if true is None else ' of ' + fmt(true)}."
        )
    )


def _ivs_text(ivs: list) -> str:
    return ", ".join(f"({fmt(lo)}, {fmt(hi) if hi is not None else 'inf'})" for lo, hi in ivs)


def negligible(x: float | None, *scale: float | None, rel: float = 1e-12) -> bool:
    """Whether ``x`` is rounding noise next to the numbers in ``scale`` (False when undefined)."""
    if x is None or any(v is None for v in scale):
        return False
    return abs(x) <= rel * max([1.0] + [abs(v) for v in scale])

"""Random expressions: never a crash, always strict JSON, and gradients that match finite differences.

The oracle is a separate, tiny evaluator written here with ``ast`` and ``math`` (not the package's
torch circuit); it only ever sees the generated expressions.
"""

from __future__ import annotations

import ast
import io
import json
import math
import operator
import random
import time
import warnings

import pytest

from stepaudit.explain import ExplainError, circuit_svg, explain, parse
from stepaudit.explain.parse import variables
from stepaudit.explain.render import print_lines, render

SMOOTH = {
    "exp": math.exp,
    "log": math.log,
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tanh": math.tanh,
    "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
}
KINKED = {"abs": abs, "relu": lambda v: max(v, 0.0)}
BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def gen(rng: random.Random, depth: int, kinks: bool) -> str:
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(["x", "y", "z", "w", "0.5", "2", "3"])
    k = rng.random()
    if k < 0.45:
        op = rng.choice(["+", "-", "*", "/"])
        return f"({gen(rng, depth - 1, kinks)} {op} {gen(rng, depth - 1, kinks)})"
    if k < 0.55:
        return f"{gen(rng, depth - 1, kinks)} ** {rng.choice([2, 3, 1.5])}"
    if k < 0.65:
        return f"-{gen(rng, depth - 1, kinks)}"
    if kinks and k < 0.8:
        return f"{rng.choice(['max', 'min'])}({gen(rng, depth - 1, kinks)}, {gen(rng, depth - 1, kinks)})"
    names = list(SMOOTH) + (list(KINKED) if kinks else [])
    return f"{rng.choice(names)}({gen(rng, depth - 1, kinks)})"


def oracle(src: str, env: dict) -> float:
    """Evaluate the generated expression with plain floats."""
    funcs = {**SMOOTH, **KINKED, "max": max, "min": min}

    def ev(n: ast.AST) -> float:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return float(n.value)
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.UnaryOp):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            return BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.Call):
            return funcs[n.func.id](*[ev(a) for a in n.args])
        raise AssertionError(n)

    return ev(ast.parse(src, mode="eval"))


@pytest.mark.parametrize("seed", range(4))
def test_random_expressions_never_crash(seed):
    rng = random.Random(seed)
    for _ in range(25):
        expr = gen(rng, 4, kinks=True)
        t0 = time.perf_counter()
        try:
            r = explain(
                expr,
                at={"w": 0.7} if "w" in variables(parse(expr)) else None,
                lr=rng.choice([0.01, 0.1, 1.0]),
                target=rng.choice([None, 0.0, 2.0]),
            )
        except ExplainError as e:
            assert "\n" not in str(e)
            continue
        assert time.perf_counter() - t0 < 2.0
        json.dumps(r, allow_nan=False)
        print_lines(render(r), io.StringIO())
        assert circuit_svg(r).startswith("<svg")


@pytest.mark.parametrize("seed", range(3))
def test_gradients_match_finite_differences(seed):
    rng = random.Random(100 + seed)
    at = {"x": 0.8, "y": 1.3, "z": 0.45, "w": 0.6}
    checked = 0
    for _ in range(500):
        if checked == 15:
            break
        expr = gen(rng, 3, kinks=False)
        try:
            names = variables(parse(expr))
            r = explain(expr, at={k: v for k, v in at.items() if k in names})
        except ExplainError:
            continue
        point = r["at"]
        if abs(r["value"]) > 1e6:
            continue
        assert r["value"] == pytest.approx(oracle(expr, point), rel=1e-12, abs=1e-12)
        for name, g in r["grads"].items():
            h = 1e-6
            try:
                up = oracle(expr, {**point, name: point[name] + h})
                down = oracle(expr, {**point, name: point[name] - h})
            except (ValueError, ZeroDivisionError, OverflowError):
                continue
            assert g == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-6), (expr, name)
        checked += 1
    assert checked == 15


def test_many_oscillations_are_truncated_but_the_supremum_is_kept():
    t0 = time.perf_counter()
    r = explain("sin(1e6*x) * y", at={"x": 0.3, "y": 1.0})
    assert time.perf_counter() - t0 < 2.0
    d = r["decreasing_lr"]
    assert d["truncated"] is True and d["count"] > len(d["intervals"]) == 50
    assert r["max_decreasing_lr"] > d["intervals"][-1][1]


def test_largest_allowed_expression_is_quick():
    terms = [f"v{i % 10} * v{(i + 3) % 10}" for i in range(37)]  # 148 nodes, depth 37
    expr = " + ".join(terms)
    t0 = time.perf_counter()
    r = explain(expr, at={f"v{i}": 0.1 * i - 0.3 for i in range(10)})
    assert time.perf_counter() - t0 < 3.0
    assert len(r["hessian"]["matrix"]) == 10 and r["decreasing_lr"]["method"] == "polynomial"
    print_lines(render(r), io.StringIO())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 1e308},
        {"expr": "exp(x)", "at": {"x": 700.0}},
        {"expr": "exp(x)*y", "at": {"x": 300.0, "y": 1e5}, "lr": 1e10},
        {"expr": "x**2", "at": {"x": 1e-320}},
        {"expr": "x", "at": {"x": 1.5}},
    ],
)
def test_extreme_numbers_give_strict_json_and_no_warnings(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = explain(**kwargs)
        json.dumps(r, allow_nan=False)
        print_lines(render(r), io.StringIO())
    assert r["verdict"]

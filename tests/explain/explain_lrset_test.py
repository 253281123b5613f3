"""The set of learning rates that lower the objective, against closed forms and brute-force scans.

The brute-force oracle evaluates each objective with plain ``math`` in Python (not the package's
circuit), along -g with g from hand-derived formulas, on a fine grid of learning rates.
"""

from __future__ import annotations

import ast
import math
import operator
import random
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest

from stepaudit.explain import explain, parse
from stepaudit.explain.parse import variables

Fn = Callable[[dict], float]


def inside(ivs: list, t: float) -> bool:
    return any(lo < t and (hi is None or t < hi) for lo, hi in ivs)


def brute_force(r: dict, fn: Fn, grads: dict, t_max: float, n: int = 20000) -> None:
    """Every scanned lr is in the reported set exactly when fn really went down (away from edges)."""
    assert r["grads"] == pytest.approx(grads, rel=1e-12)
    w = r["at"]
    f0 = fn(w)
    ivs = r["decreasing_lr"]["intervals"]
    edges = [e for iv in ivs for e in iv if e not in (None, 0.0)]
    ts = np.unique(np.concatenate([np.linspace(0, t_max, n)[1:], np.logspace(-6, math.log10(t_max), n // 4)]))
    checked = 0
    for t in ts:
        if any(abs(t - e) <= 1e-7 * max(1.0, e) for e in edges):
            continue  # too close to a boundary for float64 to decide
        try:
            d = fn({k: w[k] - t * grads[k] for k in w}) - f0
        except (ValueError, OverflowError):
            d = math.nan  # outside the domain: not a decrease
        if abs(d) <= 1e-12 * max(1.0, abs(f0)):
            continue
        assert inside(ivs, t) == (d < 0), f"lr={t}: change {d}, intervals {ivs}"
        checked += 1
    assert checked > n // 2
    for e in edges:  # each reported edge really is a change of sign
        lo = fn({k: w[k] - e * (1 - 1e-6) * grads[k] for k in w}) - f0
        try:
            hi = fn({k: w[k] - e * (1 + 1e-6) * grads[k] for k in w}) - f0
        except ValueError:
            hi = math.nan
        assert (lo < 0) != (hi < 0)


def test_classic_circuit_decreases_for_every_lr():
    # along -g: f(lr) = (3 + 8 lr)(-4 - 3 lr) = -12 - 41 lr - 24 lr^2, below -12 for all lr > 0
    r = explain()
    d = r["decreasing_lr"]
    assert d["method"] == "polynomial" and d["degree"] == 2
    assert d["coefficients"] == pytest.approx([-12.0, -41.0, -24.0])
    assert d["intervals"] == [[0.0, None]] and d["unbounded"] is True
    assert r["max_decreasing_lr"] is None and r["quadratic_bound_lr"] is None
    brute_force(r, lambda v: (v["x"] + v["y"]) * v["z"], {"x": -4.0, "y": -4.0, "z": 3.0}, 50.0)


def test_classic_circuit_with_target_zero():
    # L = f^2/2, g = (48, 48, -36); along -g f(lr) = -12 + 492 lr - 3456 lr^2, |f| < 12 iff lr < 492/3456
    r = explain(target=0.0)
    assert r["decreasing_lr"]["intervals"] == [[0.0, pytest.approx(492 / 3456, rel=1e-15)]]
    assert r["max_decreasing_lr"] == pytest.approx(492 / 3456, rel=1e-15)
    assert r["first_stop_lr"] == r["max_decreasing_lr"]
    brute_force(r, lambda v: 0.5 * ((v["x"] + v["y"]) * v["z"]) ** 2, {"x": 48.0, "y": 48.0, "z": -36.0}, 1.0)


def test_quadratic_objective_exact_set_equals_the_quadratic_bound():
    r = explain("x*x + 3*y*y", at={"x": 1.0, "y": 1.0})
    assert r["decreasing_lr"]["intervals"] == [[0.0, pytest.approx(40 / 112, rel=1e-15)]]
    assert r["quadratic_bound_lr"] == pytest.approx(r["max_decreasing_lr"], rel=1e-14)
    assert "exact here" in r["verdict"]


def test_two_valleys_give_two_intervals():
    # f'(x) = (x-1)(x-2)(x-4): from x = 0.9 the step crosses the valley at 1, the hump at 2
    # (higher than the start) and the deeper valley at 4
    def fn(v):
        x = v["x"]
        return x**4 / 4 - 7 * x**3 / 3 + 7 * x**2 - 8 * x

    r = explain("x**4/4 - 7*x**3/3 + 7*x**2 - 8*x", at={"x": 0.9})
    g = (0.9 - 1) * (0.9 - 2) * (0.9 - 4)
    ivs = r["decreasing_lr"]["intervals"]
    assert r["decreasing_lr"]["method"] == "polynomial" and len(ivs) == 2 and ivs[0][0] == 0.0
    assert r["max_decreasing_lr"] == ivs[1][1] and r["first_stop_lr"] == ivs[0][1]
    brute_force(r, fn, {"x": g}, 30.0)


def test_double_root_is_not_a_gap_and_triple_root_is_exact():
    # phi(t) - phi(0) = -t (t-1)^2 <= 0: touches zero at lr = 1 without changing sign
    # (the single lr where phi returns to phi(0) is not listed as a gap)
    r = explain("-x**3 + 2*x**2 - x", at={"x": 0.0})
    assert r["decreasing_lr"]["method"] == "polynomial"
    assert r["decreasing_lr"]["intervals"] == [[0.0, None]]
    # phi(t) - phi(0) = t (t-1)^3: decreasing exactly on (0, 1); numpy.roots scatters the triple root
    r = explain("x**4 - 3*x**3 + 3*x**2 - x", at={"x": 0.0})
    assert r["decreasing_lr"]["method"] == "polynomial"
    assert r["decreasing_lr"]["intervals"] == [[0.0, pytest.approx(1.0, rel=1e-15)]]


def test_polynomial_in_three_variables():
    def fn(v):
        return (v["x"] * v["y"] - 1) ** 2 + (v["y"] - v["z"]) ** 3 + v["x"] ** 2 * v["z"]

    x, y, z = 0.7, -1.3, 0.4
    grads = {
        "x": 2 * (x * y - 1) * y + 2 * x * z,
        "y": 2 * (x * y - 1) * x + 3 * (y - z) ** 2,
        "z": -3 * (y - z) ** 2 + x**2,
    }
    r = explain("(x*y - 1)**2 + (y - z)**3 + x**2*z", at={"x": x, "y": y, "z": z})
    assert r["decreasing_lr"]["method"] == "polynomial" and r["decreasing_lr"]["degree"] == 4
    brute_force(r, fn, grads, 5.0)


def test_non_polynomial_is_scanned_and_labelled_numerical():
    def fn(v):
        return math.sin(3 * v["x"]) + v["y"] ** 2

    x, y = 0.2, 0.5
    r = explain("sin(3*x) + y**2", at={"x": x, "y": y}, lr=0.3)
    d = r["decreasing_lr"]
    assert d["method"] == "numerical" and d["scan"]["from"] > 0 and len(d["intervals"]) >= 2
    assert "numerical" in r["verdict"]
    brute_force(r, fn, {"x": 3 * math.cos(3 * x), "y": 2 * y}, 20.0)


def test_domain_edge_ends_the_numerical_set():
    # log(x) + y^2 from (0.5, 1): g = (2, 2); x hits 0 at lr = 0.25, where f -> -inf, then is undefined
    r = explain("log(x) + y*y", at={"x": 0.5, "y": 1.0})
    assert r["decreasing_lr"]["intervals"] == [[0.0, pytest.approx(0.25, rel=1e-9)]]
    brute_force(r, lambda v: math.log(v["x"]) + v["y"] ** 2, {"x": 2.0, "y": 2.0}, 2.0)


def test_piecewise_gates_use_the_scan():
    def fn(v):
        return max(v["x"], v["y"]) * v["z"] + abs(v["x"] - 1)

    r = explain("max(x, y) * z + abs(x - 1)")
    assert r["decreasing_lr"]["method"] == "numerical"
    brute_force(r, fn, {"x": -1.0, "y": -4.0, "z": 5.0}, 40.0)


@pytest.mark.parametrize(
    "expr, method",
    [
        ("x**2", "polynomial"),
        ("x / 3", "polynomial"),
        ("x**2.5", "numerical"),
        ("x / y", "numerical"),
        ("x ** y", "numerical"),
        ("exp(2) * x", "polynomial"),
        ("x**30", "numerical"),
    ],
)
def test_which_objectives_count_as_polynomial(expr, method):
    r = explain(expr, at={"x": 1.5, "y": 2.0} if "y" in expr else {"x": 1.5})
    assert r["decreasing_lr"]["method"] == method


def test_json_edges_are_finite_or_null():
    for r in (explain(), explain("max(x, y) * z"), explain(target=1.0)):
        for lo, hi in r["decreasing_lr"]["intervals"]:
            assert math.isfinite(lo) and (hi is None or (math.isfinite(hi) and hi > lo))


@pytest.mark.parametrize("x0", [10.0, 0.5, -3.0])
def test_degree_24_with_huge_or_tiny_gradients(x0):
    # phi(t) = (x0 - g t)^24 < x0^24 exactly when |x0 - g t| < |x0|, i.e. 0 < t < 2 x0 / g
    r = explain("x**24", at={"x": x0})
    g = 24 * x0**23
    assert r["grads"]["x"] == pytest.approx(g, rel=1e-15)
    assert r["decreasing_lr"]["method"] == "polynomial"
    assert r["decreasing_lr"]["intervals"] == [[0.0, pytest.approx(2 * x0 / g, rel=1e-12)]]


def test_numerical_scan_follows_the_gradient_scale():
    # exp(x) at 40: |g| = e^40, so the interesting learning rates are far below 1e-6
    r = explain("exp(x) - 2*x", at={"x": 40.0})
    d = r["decreasing_lr"]
    assert d["method"] == "numerical" and d["scan"]["from"] < 1e-6 / math.exp(40) * 1.01
    # phi(t) < phi(0) while exp(40 - g t) - 2(40 - g t) stays below its start: check the edge by hand
    g = math.exp(40) - 2
    ((lo, hi),) = d["intervals"]

    def phi(t):
        return math.exp(40 - g * t) - 2 * (40 - g * t)

    assert lo == 0.0 and phi(hi * (1 - 1e-9)) < phi(0) < phi(hi * (1 + 1e-9))


def _random_polynomial(rng) -> str:
    def gen(d: int) -> str:
        if d == 0 or rng.random() < 0.3:
            return rng.choice(["x", "y", "z", "1", "2", "0.5", "3"])
        k = rng.random()
        if k < 0.7:
            return f"({gen(d - 1)} {rng.choice(['+', '-', '*'])} {gen(d - 1)})"
        return f"{gen(d - 1)} ** {rng.choice([2, 3])}" if k < 0.85 else f"-{gen(d - 1)}"

    return gen(4)


def _exact(node: ast.AST, env: dict) -> Fraction:
    """Rational evaluation of + - * ** and unary minus: the oracle for random polynomials."""
    if isinstance(node, ast.Expression):
        return _exact(node.body, env)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        return -_exact(node.operand, env)
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}
    return ops[type(node.op)](_exact(node.left, env), _exact(node.right, env))


@pytest.mark.parametrize("seed", range(3))
def test_random_polynomials_against_an_exact_brute_force(seed):
    rng = random.Random(seed)
    tested = 0
    for _ in range(300):
        if tested == 12:
            break
        expr, target = _random_polynomial(rng), rng.choice([None, 0.0, 1.5])
        names = variables(parse(expr))
        if not names:
            continue
        r = explain(expr, at={k: v for k, v in {"x": 0.7, "y": -1.2, "z": 0.3}.items() if k in names}, target=target)
        d = r["decreasing_lr"]
        if d["method"] != "polynomial":
            continue  # zero gradient, or degree above 24
        tree = ast.parse(expr, mode="eval")
        w = {k: Fraction(v) for k, v in r["at"].items()}
        g = {k: Fraction(v) for k, v in r["grads"].items()}

        def obj(env, tree=tree, target=target):
            f = _exact(tree, env)
            return f if target is None else (f - Fraction(target)) ** 2 / 2

        f0, ivs = obj(w), d["intervals"]
        edges = [e for iv in ivs for e in iv if e not in (None, 0.0)]
        top = max([1.0] + [3 * e for e in edges])
        for t in [*np.linspace(0, top, 300)[1:], *np.logspace(-8, math.log10(top), 100)]:
            if any(abs(t - e) <= 1e-9 * e for e in edges):
                continue
            change = obj({k: w[k] - Fraction(float(t)) * g[k] for k in w}) - f0
            if change != 0:
                assert inside(ivs, t) == (change < 0), (expr, target, t, ivs)
        tested += 1
    assert tested == 12

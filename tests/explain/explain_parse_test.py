"""Safe parsing: the whitelist accepts small arithmetic and refuses everything else, fast, unevaluated."""

from __future__ import annotations

import builtins
import os
import time

import pytest

from stepaudit.explain import ExplainError, circuit, explain
from stepaudit.explain.parse import Expr, parse

HOSTILE = [
    "__import__('os').system('x')",
    "().__class__",
    "x.real",
    "[x for x in y]",
    "lambda: 0",
    "'a'*9**9",
    "(" * 100 + "x" + ")" * 100,
    "x+" * 5_000_000 + "x",  # 10 MB
    "x[0]",
    "max(x, y, key=abs)",
    "getattr(x, 'real')",
    "open('/etc/passwd')",
    "exec('1')",
    "eval('x')",
    "x.__class__.__bases__[0].__subclasses__()",
    "__builtins__",
    "x if y else z",
    "f'{x}'",
    "(x := 1)",
    "x // y",
    "x % y",
    "x @ y",
    "x << 2",
    "not x",
    "x < y",
    "x and y",
    "{x: y}",
    "{x}",
    "(x, y)",
    "max(*x)",
    "-" * 900 + "x",
    "+".join(["x"] * 300),
    "x\n+ y",
    "x; y",
    "import os",
    "b'x'",
    "1j",
    "True",
    "None",
    "\x00",
    "ｘ + 1",  # full-width x would NFKC-normalise to a plain name
    "x" * 2000,
    "sqrt(x, y)",
    "exp",
    "[" * 50 + "]" * 50,
    "",
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail loudly if anything reaches eval/exec, os.system, or the circuit evaluator."""
    calls = []

    def trap(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return f

    monkeypatch.setattr(builtins, "eval", trap("eval"))
    monkeypatch.setattr(builtins, "exec", trap("exec"))
    monkeypatch.setattr(os, "system", trap("os.system"))
    monkeypatch.setattr(circuit, "evaluate", trap("evaluate"))
    return calls


@pytest.mark.parametrize("src", HOSTILE, ids=lambda s: repr(s[:30]))
def test_hostile_input_is_refused_fast_without_evaluating(src, nothing_runs):
    t0 = time.perf_counter()
    with pytest.raises(ExplainError) as err:
        explain(src)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"took {elapsed:.3f}s"
    assert nothing_runs == []
    msg = str(err.value)
    assert "\n" not in msg and 0 < len(msg) < 300


def test_at_least_fifteen_hostile_inputs():
    assert len(HOSTILE) >= 15


@pytest.mark.parametrize(
    "src, fragment",
    [
        ("x.real", "attribute access is not allowed: 'x.real' (col 1)"),
        ("1 + x.real", "'x.real' (col 5)"),
        ("  x.real", "(col 3)"),
        ("(x + y) * z[0]", "subscripts are not allowed: 'z[0]' (col 11)"),
        ("__import__('os').system('x')", "attribute access is not allowed: \"__import__('os').system\" (col 1)"),
        ("x + 'a'*9", "strings are not allowed: \"'a'\" (col 5)"),
        ("max(x, y, key=abs)", "keyword arguments are not allowed: 'abs' (col 15)"),
        ("x + foo(y)", "function 'foo' is not allowed"),
        ("x // y", "operator '//' is not allowed: 'x // y' (col 1)"),
        ("y + __x", "dunder names are not allowed: '__x' (col 5)"),
        ("(" * 30 + "x" + ")" * 30, "(col 21)"),
        ("x+" * 600, "too long: 1,200 characters (limit 1,000)"),
        ("x + α", "character 'α' is not allowed (col 5)"),
        ("x +", "not a valid expression"),
    ],
)
def test_error_points_at_the_offending_part(src, fragment):
    with pytest.raises(ExplainError) as err:
        parse(src)
    assert fragment in str(err.value)


def test_whitelisted_expression_becomes_the_expected_tree():
    e = parse("-(x + 2.5) * max(y, z) ** 2")
    assert e.op == "mul"
    neg, power = e.args
    assert neg.op == "neg" and neg.args[0].op == "add"
    assert neg.args[0].args[0] == Expr("var", name="x")
    assert neg.args[0].args[1] == Expr("const", value=2.5)
    assert power.op == "pow" and power.args[0].op == "max" and power.args[1].value == 2.0
    assert [a.name for a in power.args[0].args] == ["y", "z"]


@pytest.mark.parametrize(
    "src",
    [
        "exp(x) + log(y) + sqrt(z)",
        "abs(x) * sin(y) - cos(z)",
        "tanh(x) / sigmoid(y)",
        "relu(x) + max(x, y, z) + min(x, y)",
        "+x - -y",
        "x ** 3 / 4",
        "1e-3 * x",
        "w_1 * x_1",
    ],
)
def test_allowed_expressions_parse(src):
    assert parse(src).op in {"add", "sub", "mul", "div"}


def test_unary_plus_is_dropped_and_constants_are_floats():
    assert parse("+x") == Expr("var", name="x")
    assert parse("3").value == 3.0 and isinstance(parse("3").value, float)


def test_too_many_variables_is_refused():
    with pytest.raises(ExplainError, match="too many variables"):
        parse(" + ".join(f"v{i}" for i in range(11)))


def test_parseable_but_overflowing_power_tower_is_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(ExplainError, match="not finite"):
        explain("9**9**9**9 * x")
    assert time.perf_counter() - t0 < 0.5

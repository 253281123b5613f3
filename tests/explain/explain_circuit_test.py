"""Values, gradients, Hessians and local gate rules against hand-derived closed forms."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from stepaudit.explain import ExplainError, explain


def node(r: dict, text: str) -> dict:
    (n,) = [n for n in r["nodes"] if n["text"] == text]
    return n


def sig(s: float) -> float:
    return 1.0 / (1.0 + math.exp(-s))


def test_classic_circuit_values_and_gradients():
    r = explain()
    assert r["expr"] == "(x + y) * z" and r["at"] == {"x": -2.0, "y": 5.0, "z": -4.0}
    assert r["value"] == -12.0
    assert r["grads"] == {"x": -4.0, "y": -4.0, "z": 3.0}
    add, mul = node(r, "x + y"), node(r, "(x + y) * z")
    assert (add["value"], add["grad"]) == (3.0, -4.0)
    assert (mul["value"], mul["grad"]) == (-12.0, 1.0)
    # the add gate distributes, the multiply gate swaps its inputs
    assert add["local"] == [1.0, 1.0] and add["input_grads"] == [-4.0, -4.0]
    assert mul["local"] == [-4.0, 3.0] and mul["input_grads"] == [-4.0, 3.0]
    ids = {n["text"]: n["id"] for n in r["nodes"]}
    assert mul["inputs"] == [ids["x + y"], ids["z"]] and add["inputs"] == [ids["x"], ids["y"]]
    assert np.array_equal(r["hessian"]["matrix"], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])


def test_cs231n_sigmoid_neuron():
    at = {"w0": 2.0, "x0": -1.0, "w1": -3.0, "x1": -2.0, "w2": -3.0}
    r = explain("sigmoid(w0*x0 + w1*x1 + w2)", at=at)
    s = at["w0"] * at["x0"] + at["w1"] * at["x1"] + at["w2"]
    d1 = sig(s) * (1 - sig(s))
    d2 = d1 * (1 - 2 * sig(s))
    assert r["value"] == pytest.approx(sig(s), rel=1e-14)
    ds = {"w0": at["x0"], "x0": at["w0"], "w1": at["x1"], "x1": at["w1"], "w2": 1.0}
    for k, v in ds.items():
        assert r["grads"][k] == pytest.approx(d1 * v, rel=1e-13)
    names = r["hessian"]["names"]
    cross = {frozenset(("w0", "x0")), frozenset(("w1", "x1"))}  # d2 s / dw dx = 1
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            want = d2 * ds[a] * ds[b] + (d1 if frozenset((a, b)) in cross else 0.0)
            assert r["hessian"]["matrix"][i][j] == pytest.approx(want, rel=1e-12, abs=1e-15)
    gate = node(r, "sigmoid(w0*x0 + w1*x1 + w2)")
    assert gate["local"] == [pytest.approx(d1, rel=1e-14)]


@pytest.mark.parametrize(
    "expr, at, value, grads, hess",
    [
        ("x*x*y", {"x": 3.0, "y": -2.0}, -18.0, [-12.0, 9.0], [[-4.0, 6.0], [6.0, 0.0]]),
        ("x/y", {"x": 3.0, "y": 2.0}, 1.5, [0.5, -0.75], [[0.0, -0.25], [-0.25, 0.75]]),
        ("sqrt(x*x + y*y)", {"x": 3.0, "y": 4.0}, 5.0, [0.6, 0.8], [[16 / 125, -12 / 125], [-12 / 125, 9 / 125]]),
        ("max(x, y) * z", None, -20.0, [0.0, -4.0, 5.0], [[0, 0, 0], [0, 0, 1], [0, 1, 0]]),
        (
            "x - y / 4 + 2**x",
            {"x": 1.0, "y": 8.0},
            1.0,
            [1 + 2 * math.log(2), -0.25],
            [[2 * math.log(2) ** 2, 0.0], [0.0, 0.0]],
        ),
    ],
)
def test_gradients_and_hessians_by_hand(expr, at, value, grads, hess):
    r = explain(expr, at=at)
    assert r["value"] == pytest.approx(value, rel=1e-14)
    assert list(r["grads"].values()) == pytest.approx(grads, rel=1e-14, abs=1e-15)
    assert np.allclose(r["hessian"]["matrix"], hess, rtol=1e-13, atol=1e-15)


def test_transcendental_gates():
    x, y = 0.5, 1.2
    r = explain("exp(x)*sin(y) + log(x) - tanh(y)*cos(x)", at={"x": x, "y": y})
    assert r["value"] == pytest.approx(math.exp(x) * math.sin(y) + math.log(x) - math.tanh(y) * math.cos(x))
    sech2 = 1 - math.tanh(y) ** 2
    gx = math.exp(x) * math.sin(y) + 1 / x + math.tanh(y) * math.sin(x)
    gy = math.exp(x) * math.cos(y) - sech2 * math.cos(x)
    assert [r["grads"]["x"], r["grads"]["y"]] == pytest.approx([gx, gy], rel=1e-13)
    hxx = math.exp(x) * math.sin(y) - 1 / x**2 + math.tanh(y) * math.cos(x)
    hxy = math.exp(x) * math.cos(y) + sech2 * math.sin(x)
    hyy = -math.exp(x) * math.sin(y) + 2 * math.tanh(y) * sech2 * math.cos(x)
    assert np.allclose(r["hessian"]["matrix"], [[hxx, hxy], [hxy, hyy]], rtol=1e-12)
    assert node(r, "exp(x)")["local"] == [pytest.approx(math.exp(x))]  # exp: times its own output
    assert node(r, "log(x)")["local"] == [pytest.approx(1 / x)]


def test_shared_variable_wires_add_up():
    # x feeds min (share +1) and abs (share -1): its gradient is their sum, 0
    r = explain("min(x, y) + relu(z) + abs(x)", at={"x": -2.0, "y": 5.0, "z": 2.0})
    assert r["value"] == 2.0 and r["grads"] == {"x": 0.0, "y": 0.0, "z": 1.0}
    assert node(r, "min(x, y)")["input_grads"] == [1.0, 0.0]  # min routes to the smaller input
    assert node(r, "abs(x)")["input_grads"] == [-1.0]
    assert node(r, "x")["uses"] == 2


def test_max_tie_splits_the_gradient_evenly():
    r = explain("max(x, y)", at={"x": 1.0, "y": 1.0})
    assert r["grads"] == {"x": 0.5, "y": 0.5}


def test_sub_neg_div_pow_local_rules():
    r = explain("-(x - y) / x ** 3", at={"x": 2.0, "y": 1.0})
    sub, neg, power, div = (node(r, t) for t in ("x - y", "-(x - y)", "x ** 3", "-(x - y) / x ** 3"))
    assert sub["local"] == [1.0, -1.0] and neg["local"] == [-1.0]
    assert power["local"] == [12.0, None]  # 3*x^2; a constant exponent gets no gradient
    assert div["local"] == [1 / 8, pytest.approx(1 / 64)]  # 1/b and -a/b^2 with a=-1, b=8
    assert power["grad"] == pytest.approx(1 / 64)


def test_target_turns_the_objective_into_half_squared_error():
    r = explain(target=0.0)
    assert r["objective"]["value"] == 72.0 and r["value"] == -12.0
    assert r["grads"] == {"x": 48.0, "y": 48.0, "z": -36.0}  # f * grad f
    assert r["expr_grads"] == {"x": -4.0, "y": -4.0, "z": 3.0}
    # Hessian of L = grad f grad f^T + f * Hessian f
    assert np.array_equal(r["hessian"]["matrix"], [[16, 16, -24], [16, 16, -24], [-24, -24, 9]])
    assert r["nodes"][-1]["op"] == "loss" and r["nodes"][-1]["local"] == [-12.0]


@pytest.mark.parametrize(
    "expr, at, match",
    [
        ("y + log(x)", None, "'log(x)' (col 5) is not finite at this point (nan; inputs: x = -2)"),
        ("sqrt(x - x)", {"x": 1.0}, "no finite slope"),
        ("w * x", {"x": 1.0}, "no value for 'w'"),
        ("x", {"q": 1.0}, "'q', which is not in the expression"),
        ("2 + 3", None, "no variables"),
    ],
)
def test_undefined_points_are_reported(expr, at, match):
    with pytest.raises(ExplainError, match=re.escape(match)):
        explain(expr, at=at)


@pytest.mark.parametrize("kwargs", [{"lr": 0}, {"lr": -1}, {"lr": float("nan")}, {"target": float("inf")}])
def test_bad_lr_or_target(kwargs):
    with pytest.raises(ExplainError):
        explain(**kwargs)

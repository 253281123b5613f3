"""The simultaneous step, its first/second/higher-order split, and the one-weight-at-a-time variant."""

from __future__ import annotations

import pytest

from stepaudit.explain import explain


def f_classic(x: float, y: float, z: float) -> float:
    return (x + y) * z


def test_simultaneous_step_on_the_classic_circuit():
    s = explain(lr=0.1)["step"]
    # w - lr*g with g = (-4, -4, 3)
    assert s["new"] == pytest.approx({"x": -1.6, "y": 5.4, "z": -4.3}, rel=1e-15)
    assert s["predicted"] == pytest.approx(-0.1 * 41)  # -lr*|g|^2
    assert s["actual"] == pytest.approx(f_classic(-1.6, 5.4, -4.3) - (-12.0), rel=1e-12)
    # f is bilinear: the whole remainder is 1/2*lr^2*g^T H g = 0.005 * 2*(g_x g_z + g_y g_z), all interplay
    assert s["quadratic"] == pytest.approx(0.005 * 2 * (-4 * 3 + -4 * 3))
    assert s["interplay"] == pytest.approx(s["quadratic"])
    assert s["remainder"] == pytest.approx(s["quadratic"], rel=1e-12)
    assert abs(s["higher_order"]) < 1e-12
    assert s["grads_after"] == pytest.approx({"x": -4.3, "y": -4.3, "z": 3.8})
    assert s["sign_flips"] == []


def test_one_weight_at_a_time_recomputes_the_gradient():
    q = explain(lr=0.1)["sequential"]
    # x: -2 - 0.1*z = -1.6;  y: 5 - 0.1*z = 5.4;  z: -4 - 0.1*(x + y) with the *new* x + y = 3.8
    assert q["order"] == ["x", "y", "z"]
    assert [u["grad_used"] for u in q["updates"]] == pytest.approx([-4.0, -4.0, 3.8])
    assert q["new"] == pytest.approx({"x": -1.6, "y": 5.4, "z": -4.38})
    assert q["objective_after"] == pytest.approx(f_classic(-1.6, 5.4, -4.38))
    assert q["actual"] == pytest.approx(f_classic(-1.6, 5.4, -4.38) + 12.0)
    assert [u["objective"] for u in q["updates"]] == pytest.approx(
        [f_classic(-1.6, 5, -4), f_classic(-1.6, 5.4, -4), f_classic(-1.6, 5.4, -4.38)]
    )


def test_sign_flips_after_a_large_step_on_the_loss():
    r = explain(lr=0.1, target=0.0)
    # L = f^2/2, g = f*grad f = (48, 48, -36): the step lands at (-6.8, 0.2, -0.4)
    s = r["step"]
    assert s["new"] == pytest.approx({"x": -6.8, "y": 0.2, "z": -0.4})
    f1 = f_classic(-6.8, 0.2, -0.4)
    after = {"x": f1 * -0.4, "y": f1 * -0.4, "z": f1 * (-6.8 + 0.2)}
    assert s["grads_after"] == pytest.approx(after)
    assert [fl["name"] for fl in s["sign_flips"]] == ["x", "y"]
    assert s["actual"] == pytest.approx(0.5 * f1**2 - 72.0)
    # one at a time: after x moves, dL/dy = f(x1, 5, -4) * z = (-6.8 + 5)(-4) * (-4) < 0, flipped
    u = r["sequential"]["updates"]
    assert u[1]["grad_used"] == pytest.approx(f_classic(-6.8, 5, -4) * -4)
    assert u[1]["sign_flipped"] is True and u[0]["sign_flipped"] is False


def test_separable_objective_sequential_equals_simultaneous():
    # no interplay (H is diagonal), so the order of updates does not matter
    r = explain("x**2 + 3*y**2 + exp(z)", at={"x": 1.0, "y": -2.0, "z": 0.5}, lr=0.05)
    assert r["hessian"]["off_diagonal"] == []
    assert r["sequential"]["new"] == pytest.approx(r["step"]["new"], rel=1e-15)
    assert r["step"]["interplay"] == pytest.approx(0.0, abs=1e-15)


def test_quadratic_bound_matches_closed_form():
    # f = x^2 + 3y^2 at (1, 1): g = (2, 6), H = diag(2, 6): 2|g|^2 / g^T H g = 80 / 224
    r = explain("x*x + 3*y*y", at={"x": 1.0, "y": 1.0})
    assert r["hessian"]["gHg"] == pytest.approx(224.0)
    assert r["quadratic_bound_lr"] == pytest.approx(80 / 224, rel=1e-14)
    assert explain()["quadratic_bound_lr"] is None  # g^T H g = -48 < 0: no bound


def test_zero_gradient_means_no_step():
    r = explain("x*x + y*y", at={"x": 0.0, "y": 0.0})
    assert r["step"]["actual"] == 0.0 and r["decreasing_lr"]["intervals"] == []
    assert r["max_decreasing_lr"] is None
    assert "zero" in r["verdict"]


def test_step_out_of_the_domain_is_null_not_nan():
    r = explain("log(x) + y*y", at={"x": 0.5, "y": 1.0}, lr=1.0)  # x -> 0.5 - 2 < 0
    assert r["step"]["actual"] is None and r["step"]["objective_after"] is None
    assert "leaves the domain" in r["verdict"]


def test_verdict_states_the_numbers():
    v = explain(target=0.0)["verdict"]
    assert "lowers L by 68.5152" in v
    assert "stop lowering L above lr = 0.142361" in v  # 492/3456, see explain_lrset_test
    assert "∂L/∂x changed sign" in v

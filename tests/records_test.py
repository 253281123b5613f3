"""Per-parameter sums: the fast working-dtype path against float64 sums of the same vectors."""

from __future__ import annotations

import torch

from stepaudit.records import layer_rows, per_parameter_sums


def test_fast_and_exact_sums_agree_within_float32_accuracy():
    g = torch.Generator().manual_seed(0)
    sizes = [65536, 256, 10]
    w, grad, delta = (torch.randn(sum(sizes), generator=g) for _ in range(3))
    exact = per_parameter_sums(w, grad, delta, sizes, exact=True)
    fast = per_parameter_sums(w, grad, delta, sizes, exact=False)
    for i, _ in enumerate(sizes):
        lo, hi = sum(sizes[:i]), sum(sizes[: i + 1])
        oracle_dot = float((grad[lo:hi].double() * delta[lo:hi].double()).sum())
        scale = float((grad[lo:hi].double() * delta[lo:hi].double()).abs().sum())
        assert abs(exact[i][0] - oracle_dot) <= 1e-12 * scale
        assert abs(fast[i][0] - oracle_dot) <= 1e-6 * scale  # float32 BLAS, relative to Σ|g·Δw|
        for j, v in ((1, grad), (2, delta), (3, w)):
            oracle = float((v[lo:hi].double() ** 2).sum())
            assert abs(fast[i][j] - oracle) <= 1e-6 * oracle and abs(exact[i][j] - oracle) <= 1e-12 * oracle


def test_layer_rows_aggregate_modules_and_groups():
    sums = [[1.0, 4.0, 9.0, 16.0], [2.0, 5.0, 7.0, 9.0], [-1.0, 1.0, 1.0, 1.0]]
    rows, totals = layer_rows(["a.w", "a.b", "c.w"], ["a", "a", "c"], [0, 0, 1], sums)
    by = {(r["kind"], r["name"]): r for r in rows}
    assert by[("module", "a")]["grad_norm"] == 3.0 and by[("module", "a")]["update_norm"] == 4.0
    assert by[("group", "1")]["update_ratio"] == 1.0
    assert totals["first_order"] == 2.0 and totals["weight_norm"] == 26**0.5
    assert totals["descent_cos"] == -2.0 / (10 * 17) ** 0.5

"""FlatBuffers against an independent float64 recomputation of g·Δw and the per-parameter norms."""

import math

import pytest
import torch

from stepaudit.flat import FlatBuffers


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=dtype).requires_grad_()
    unused = torch.randn(4, generator=g, dtype=dtype).requires_grad_()  # .grad stays None
    transposed = torch.randn(3, 5, generator=g, dtype=dtype).t().requires_grad_()  # non-contiguous
    return [weight, bias, unused, transposed]


@pytest.mark.parametrize("keep_before", [True, False])
@pytest.mark.parametrize("exact", [False, True])
def test_finish_matches_float64_oracle(keep_before, exact):
    params = _params()
    flat = FlatBuffers(params, exact=exact)
    for _ in range(2):  # buffers are reused: the second step must not see the first
        flat.take_before()
        first_order, rows = _step_with(flat, params)
        got_first_order, got_rows = flat.finish(keep_before=keep_before)
        assert got_first_order == pytest.approx(first_order, rel=1e-5)
        for got, want in zip(got_rows, rows):
            assert got[1:] == pytest.approx(want, rel=1e-5)
        if keep_before:
            want_delta = torch.cat([p.detach().reshape(-1) for p in params]) - flat.before
            assert torch.equal(flat.delta_w, want_delta)


def _step_with(flat, params):
    """Like _step but with the gradients copied into ``flat`` after they are set, before the update."""
    for i, p in enumerate(params):
        if i != 2:
            p.grad = torch.randn(p.shape, dtype=p.dtype)
    flat.take_grad()
    before = [p.detach().double().clone() for p in params]
    grads = [p.grad.double() if p.grad is not None else torch.zeros_like(b) for p, b in zip(params, before)]
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    delta = [p.detach().double() - b for p, b in zip(params, before)]
    first_order = sum(float((g * d).sum()) for g, d in zip(grads, delta))
    rows = [
        [float(g.pow(2).sum()), float(d.pow(2).sum()), float(b.pow(2).sum())] for g, d, b in zip(grads, delta, before)
    ]
    return first_order, rows


def test_replaced_parameter_storage_is_followed():
    params = _params()
    flat = FlatBuffers(params)
    flat.take_before()
    params[0].data = torch.full_like(params[0], 2.0)  # new storage: cached flat views must be rebuilt
    flat.take_before()
    assert torch.equal(flat.before_views[0], torch.full((5, 3), 2.0))


def test_bfloat16_accumulates_in_float32():
    params = _params(torch.bfloat16)
    flat = FlatBuffers(params)
    flat.take_before()
    first_order, rows = _step_with(flat, params)
    got_first_order, got_rows = flat.finish(keep_before=False)
    assert math.isfinite(got_first_order)
    assert got_first_order == pytest.approx(first_order, rel=1e-2)
    assert got_rows[2][1] == 0.0  # the parameter without a gradient


def test_parameters_on_two_devices_are_refused():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)]
    with pytest.raises(ValueError, match="one device"):
        FlatBuffers(params)

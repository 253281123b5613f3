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
        for got, want in zip(got_rows, rows, strict=True):
            assert got[1:] == pytest.approx(want, rel=1e-5)
        if keep_before:
            want_delta = torch.cat([p.detach().reshape(-1) for p in params]) - flat.before
            assert torch.equal(flat.delta_w, want_delta)


def _step_with(flat, params, take=None, scale_grad_in_step=False, per_parameter=False):
    """An SGD step with fresh gradients: ``take`` (default ``flat.take_grad``) runs after they are set and
    before the update; ``scale_grad_in_step`` makes the step also halve each ``.grad`` in place, after using it.
    Returns the float64 oracle: g·Δw and rows [‖g‖², ‖Δw‖², ‖w‖²] (``per_parameter``: [g·Δw, ...] per row)."""
    for i, p in enumerate(params):
        if i != 2:
            p.grad = torch.randn(p.shape, dtype=p.dtype)
    (take or flat.take_grad)()
    before = [p.detach().double().clone() for p in params]
    grads = [p.grad.double() if p.grad is not None else torch.zeros_like(b) for p, b in zip(params, before)]
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
                if scale_grad_in_step:
                    p.grad.mul_(0.5)
    delta = [p.detach().double() - b for p, b in zip(params, before)]
    dots = [float((g * d).sum()) for g, d in zip(grads, delta)]
    rows = [
        [float(g.pow(2).sum()), float(d.pow(2).sum()), float(b.pow(2).sum())] for g, d, b in zip(grads, delta, before)
    ]
    if per_parameter:
        rows = [[dot, *row] for dot, row in zip(dots, rows)]
    return sum(dots), rows


@pytest.mark.parametrize("keep_before", [True, False])
def test_borrowed_gradient_matches_float64_oracle(keep_before):
    """Once a step has shown that step() leaves .grad alone, the sums read the live .grad after the step."""
    params = _params()
    flat = FlatBuffers(params)
    flat.take_before()
    assert not flat.borrow_grad()  # nothing learned yet: the first audited step copies
    _step_with(flat, params)
    flat.finish(keep_before=keep_before)
    assert flat.grad_kept is True
    for _ in range(2):
        flat.take_before()
        first_order, rows = _step_with(flat, params, take=lambda: _borrowed(flat), per_parameter=True)
        got_first_order, got_rows = flat.finish(keep_before=keep_before)
        assert got_first_order == pytest.approx(first_order, rel=1e-5)
        for got, want in zip(got_rows, rows, strict=True):
            assert got == pytest.approx(want, rel=1e-5)
        assert got_rows[2][:2] == [0.0, 0.0]  # the parameter without .grad: a zero gradient


def _borrowed(flat):
    assert flat.borrow_grad()


def test_a_gradient_changed_inside_step_is_never_read_as_the_one_the_step_used():
    """step() writing .grad in place: learned on the copied step, or caught by the version counter after."""
    params = _params()
    flat = FlatBuffers(params)
    flat.take_before()
    first_order, _ = _step_with(flat, params, scale_grad_in_step=True)
    assert flat.finish()[0] == pytest.approx(first_order, rel=1e-5)  # the copy holds the gradient used
    assert flat.grad_kept is False
    flat.take_before()
    assert not flat.borrow_grad()

    flat = FlatBuffers(params)
    flat.take_before()
    _step_with(flat, params)
    flat.finish()
    flat.take_before()
    _step_with(flat, params, take=lambda: _borrowed(flat), scale_grad_in_step=True)
    with pytest.raises(RuntimeError, match="wrote to or replaced .grad"):
        flat.finish()
    flat.take_before()
    assert not flat.borrow_grad() and flat.grad_kept is False


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


def test_gradient_copy_is_exact_for_any_layout_and_dtype():
    """The flat gradient holds each .grad as it is (channels_last, transposed, sparse, another dtype, None)."""
    g = torch.Generator().manual_seed(1)
    conv = torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    transposed = torch.randn(3, 5, generator=g).t().requires_grad_()
    wide = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    sparse = torch.randn(5, 2, generator=g).requires_grad_()
    unused = torch.randn(3, generator=g).requires_grad_()
    params = [conv, transposed, wide, sparse, unused]
    conv.grad = torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last)
    transposed.grad = torch.randn(3, 5, generator=g).t()  # non-contiguous too
    wide.grad = torch.randn(6, generator=g, dtype=torch.float64)
    sparse.grad = torch.sparse_coo_tensor([[1, 3]], torch.randn(2, 2, generator=g), (5, 2), check_invariants=True)
    flat = FlatBuffers(params)
    flat.take_before()
    flat.take_grad()
    # oracle: each gradient densified, in row-major order, cast to float64 (the buffers' promoted dtype)
    want = [conv.grad, transposed.grad, wide.grad, sparse.grad.to_dense(), torch.zeros(3)]
    assert flat.grad.dtype == torch.float64
    assert torch.equal(flat.grad, torch.cat([w.double().flatten() for w in want]))


def test_norms_read_back_are_the_per_parameter_norms():
    """finish's rows carry ‖g‖², ‖Δw‖², ‖w‖² of each parameter: float64 sums of squares are the oracle."""
    params = _params()
    flat = FlatBuffers(params)
    flat.take_before()
    before = [p.detach().clone() for p in params]
    _step_with(flat, params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    _, rows = flat.finish(keep_before=True)
    for row, p, w, grad in zip(rows, params, before, grads, strict=True):
        delta = p.detach().flatten() - w.flatten()
        want = [float((t.double().flatten() ** 2).sum()) for t in (grad, delta, w)]
        assert row[1:] == pytest.approx(want, rel=1e-6)


def test_complex_parameters_sum_squared_moduli():
    """Complex tensors (seen by the passive doctor): ‖z‖² = Σ|z|², and g·Δw = Re Σ conj(g)·Δw, in float64."""
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(4, 3, dtype=torch.complex64, generator=g).requires_grad_()]
    flat = FlatBuffers(params)
    flat.take_before()
    before = params[0].detach().clone().to(torch.complex128)
    params[0].grad = torch.randn(4, 3, dtype=torch.complex64, generator=g)
    flat.take_grad()
    with torch.no_grad():
        params[0].sub_(0.1 * params[0].grad)
    grad, delta = params[0].grad.to(torch.complex128), params[0].detach().to(torch.complex128) - before
    first_order, rows = flat.finish()
    assert first_order == pytest.approx(float((grad.conj() * delta).sum().real), rel=1e-5)
    want = [float((t.abs() ** 2).sum()) for t in (grad, delta, before)]
    assert rows[0][1:] == pytest.approx(want, rel=1e-5)


def test_nothing_is_learned_about_step_from_a_step_without_gradients():
    params = _params()
    flat = FlatBuffers(params)
    flat.take_before()
    flat.take_grad()  # every .grad is None (e.g. all frozen for now): no evidence about step()
    flat.finish()
    assert flat.grad_kept is None
    flat.take_before()
    assert not flat.borrow_grad()

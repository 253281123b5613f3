"""GradScaler: the audit sees unscaled gradients, counts skipped steps, and keeps training bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import classification_loss, make_mlp

import stepaudit


def scaled_training(model, audit, batches, scale=2.0**10):
    opt = audit.optimizer if audit else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    for batch in batches:
        block = audit.watch(batch) if audit else _Null()
        with block:
            opt.zero_grad()
            loss = classification_loss(model, batch)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return opt


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gradscaler_first_order_uses_unscaled_gradient_and_is_bit_identical(tiny_batch, tmp_path):
    plain = make_mlp()
    audited = copy.deepcopy(plain)
    old = copy.deepcopy(plain)
    opt_plain = scaled_training(plain, None, [tiny_batch] * 3)
    opt = torch.optim.SGD(audited.parameters(), lr=0.1, momentum=0.9)
    with stepaudit.Audit(audited, opt, classification_loss, run=tmp_path / "r") as audit:
        scaled_training(audited, audit, [tiny_batch] * 3)
    for a, b in zip(plain.parameters(), audited.parameters()):
        assert torch.equal(a, b)
    for p_plain, p_audited in zip(plain.parameters(), audited.parameters()):
        assert torch.equal(opt_plain.state[p_plain]["momentum_buffer"], opt.state[p_audited]["momentum_buffer"])
    # oracle for step 0: true gradient at the initial weights dotted with the first update
    grads = torch.autograd.grad(classification_loss(old, tiny_batch), list(old.parameters()))
    first = audit.records[0]
    assert first["grad_norm"] == pytest.approx(
        float(torch.cat([g.reshape(-1) for g in grads]).double().norm()), rel=1e-5
    )
    # SGD with momentum moves by −lr·g on its first step (the buffer starts at g): g·Δw = −lr·‖g‖²
    first_order = -0.1 * sum(float((g.double() ** 2).sum()) for g in grads)
    assert first["first_order"] == pytest.approx(first_order, rel=1e-5)


def test_skipped_step_is_counted_not_audited(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = tiny_batch
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r") as audit:
        with pytest.warns(UserWarning, match="no optimizer step happened"):
            scaled_training(model, audit, [(x * float("inf"), y)])
        scaled_training(model, audit, [tiny_batch])
    assert audit.skipped_steps == 1
    assert [r["step"] for r in audit.records] == [0]
    assert audit.summary()["skipped_steps"] == 1


def test_fused_optimizer_gradient_is_unscaled_and_its_skipped_step_counted(tiny_batch, tmp_path):
    # A fused optimizer gets the still-scaled gradient plus optimizer.grad_scale / found_inf from
    # GradScaler and unscales (or skips) inside its kernel; the record must see the true gradient.
    records = {}
    for fused in (False, True):
        model = make_mlp()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / f"f{fused}") as audit:
            with audit.watch(tiny_batch) as w:
                optimizer.zero_grad()
                w.loss = classification_loss(model, tiny_batch)
                scaler.scale(w.loss).backward()
                scaler.step(optimizer)
                scaler.update()
        records[fused] = audit.last
    oracle = make_mlp()  # the same initial weights, gradient by autograd
    grads = torch.autograd.grad(classification_loss(oracle, tiny_batch), list(oracle.parameters()))
    true_norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    for fused in (False, True):
        assert records[fused]["grad_norm"] == pytest.approx(true_norm, rel=1e-5)
    # Adam's first step: m̂ = g, v̂ = g², Δw = −lr·g/(|g| + eps), so g·Δw = −lr·Σ g²/(|g| + eps)
    first_order = -1e-2 * sum(float((g.double() ** 2 / (g.double().abs() + 1e-8)).sum()) for g in grads)
    for fused in (False, True):
        assert records[fused]["first_order"] == pytest.approx(first_order, rel=1e-4)

    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    bad = (tiny_batch[0] * float("inf"), tiny_batch[1])
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "skip") as audit:
        with pytest.warns(UserWarning, match="no optimizer step happened"):
            with audit.watch(bad):
                optimizer.zero_grad()
                scaler.scale(classification_loss(model, bad)).backward()
                scaler.step(optimizer)
                scaler.update()
    assert audit.skipped_steps == 1 and audit.records == []

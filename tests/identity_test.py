"""Auditing never changes training: weights, optimizer state, buffers and RNG are bit-identical."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_loss, make_mlp
from support.identity import assert_same_model, assert_same_optimizer, assert_same_rng, rng_state, seed_host
from torch import nn

import stepaudit

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


def batches(n: int, accumulate: int):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        micro = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(accumulate)]
        out.append(micro)
    return out


def train(
    optimizer_name: str,
    audited: bool,
    tmp_path,
    accumulate: int = 1,
    autocast: bool = False,
    probes=None,
    every: int = 1,
):
    """Dropout + BatchNorm model, StepLR, gradient clipping, optional bf16 autocast and accumulation."""
    model = make_mlp(dropout=0.3, batchnorm=True)
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    audit = (
        stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "run", probes=probes, every=every)
        if audited
        else None
    )
    torch.manual_seed(99)
    seed_host()
    for micro in batches(5, accumulate):
        block = audit.watch(micro if accumulate > 1 else micro[0], accumulate=accumulate) if audited else _nothing()
        with block:
            opt.zero_grad()
            for x, y in micro:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = classification_loss(model, (x, y)) / accumulate
                loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        scheduler.step()
    if audit is not None:
        audit.close()
    return model, opt, rng_state(), audit


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_identical(a, b):
    (model_a, opt_a, rng_a, _), (model_b, opt_b, rng_b, _) = a, b
    assert_same_model(model_a, model_b)  # weights and BatchNorm buffers
    assert_same_optimizer(opt_a, opt_b)  # every state entry and every group's settings (lr, initial_lr …)
    assert_same_rng(rng_a, rng_b)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_bit_identical_with_dropout_batchnorm_scheduler_clipping(optimizer_name, tmp_path):
    plain = train(optimizer_name, False, tmp_path / "a")
    audited = train(optimizer_name, True, tmp_path / "b")
    assert_identical(plain, audited)
    assert len(audited[3].records) == 5 and all(r["verdict"] != "error" for r in audited[3].records)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_bit_identical_with_bf16_autocast_and_accumulation(optimizer_name, tmp_path):
    plain = train(optimizer_name, False, tmp_path / "a", accumulate=2, autocast=True)
    audited = train(optimizer_name, True, tmp_path / "b", accumulate=2, autocast=True)
    assert_identical(plain, audited)
    records = audited[3].records
    assert all(r["verdict"] != "error" for r in records), records
    assert records[0]["batch_size"] == 32


def test_accumulation_replays_each_micro_batch_with_its_own_masks(tmp_path):
    # Oracle: the audited loss_before equals the user's accumulated loss bit for bit only if each
    # micro-batch's dropout masks are replayed from its own RNG state.
    model = make_mlp(dropout=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = batches(1, 2)[0]
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r") as audit:
        with audit.watch(micro, accumulate=2) as handle:
            opt.zero_grad()
            total = 0.0
            for x, y in micro:
                loss = classification_loss(model, (x, y)) / 2
                loss.backward()
                total += float(loss)
            opt.step()  # handle.loss unset: loss_before is re-evaluated by replay
    assert handle.record["loss_before"] == pytest.approx(total, rel=1e-6)


def test_plain_step_api_is_bit_identical_to_a_hand_written_loop(tmp_path):
    def run(audited):
        model = make_mlp(dropout=0.2, batchnorm=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        audit = stepaudit.Audit(model, opt, classification_loss, run=tmp_path / str(audited)) if audited else None
        torch.manual_seed(5)
        seed_host()
        for ((x, y),) in batches(4, 1):
            if audited:
                audit.step((x, y))
            else:
                opt.zero_grad()
                classification_loss(model, (x, y)).backward()
                opt.step()
        return model, opt, rng_state(), audit

    assert_identical(run(False), run(True))


ALL_OPTIMIZERS = [
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
]


@pytest.mark.parametrize("name", [n for n in ALL_OPTIMIZERS if hasattr(torch.optim, n)])
def test_every_torch_optimizer_is_audited_and_untouched(name, tiny_batch, tmp_path):
    def run(audited):
        model = make_mlp(dropout=0.1)
        kwargs = {"lr": 0.01} if name not in ("Adadelta",) else {}
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
        audit = stepaudit.Audit(model, opt, classification_loss, run=tmp_path / f"{name}{audited}") if audited else None
        torch.manual_seed(3)
        seed_host()
        for _ in range(3):
            if audit:
                audit.step(tiny_batch)
            else:
                opt.zero_grad()
                classification_loss(model, tiny_batch).backward()
                opt.step()
        if audit:
            audit.close()
        return model, opt, rng_state(), audit

    plain, audited = run(False), run(True)
    assert_identical(plain, audited)
    assert [r["verdict"] in ("decrease", "increase", "flat") for r in audited[3].records] == [True] * 3

"""Training state the audit must replay and put back: Python/NumPy generators, re-bound buffers, autocast's
weight cache, the random state a loss_fn starts from. Each case runs the same loop with and without the
audit (the oracle) or against an independent recomputation."""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import classification_loss
from support.identity import assert_same_model, assert_same_rng, rng_state
from torch import nn

import stepaudit


def batches(count: int, n: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(count)]


class HostLayerDrop(nn.Module):
    """Layer drop decided with Python's and NumPy's global generators (older Hugging Face code)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        if self.training and random.random() < 0.5:
            x = x + self.a(x)
        if self.training and np.random.uniform() < 0.5:
            x = x * 1.5
        return self.b(x)


class RebindingEma(nn.Module):
    """A buffer updated by re-binding (``self.mean = …``), as in EMA and VQ-codebook modules."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x):
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return self.lin(x - self.mean)


def train(make, audited: bool, tmp_path, steps: int = 6, skip=(), before_each=None, **audit_kwargs):
    """The same loop with or without the audit (through ``watch``; steps in ``skip`` never call
    ``optimizer.step()``); returns (model, the RNG states (``support.identity.rng_state``), records)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = (
        stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / f"r{audited}", **audit_kwargs)
        if audited
        else None
    )
    for i, batch in enumerate(batches(steps)):
        if before_each is not None:
            before_each(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no optimizer step happened" on skipped steps
            with audit.watch(batch) if audit is not None else contextlib.nullcontext():
                optimizer.zero_grad()
                classification_loss(model, batch).backward()
                if i not in skip:
                    optimizer.step()
    records = audit.records if audit is not None else None
    if audit is not None:
        audit.close()
    return model, rng_state(), records


def assert_same_training(make, tmp_path, **kwargs) -> None:
    """Weights, buffers and the torch, Python and NumPy generator states bit-identical with and without the audit."""
    plain, rng_plain, _ = train(make, False, tmp_path, **kwargs)
    audited, rng_audited, _ = train(make, True, tmp_path, **kwargs)
    assert_same_model(plain, audited)
    assert_same_rng(rng_plain, rng_audited)


def test_python_and_numpy_generators_are_replayed_and_restored(tmp_path):
    assert_same_training(HostLayerDrop, tmp_path)
    # replayed, not merely restored: at lr 0 the re-evaluation takes the same layer-drop decisions
    torch.manual_seed(0)
    model = HostLayerDrop()
    with stepaudit.Audit(
        model, torch.optim.SGD(model.parameters(), lr=0.0), classification_loss, run=tmp_path / "lr0"
    ) as audit:
        for batch in batches(4):
            audit.step(batch)
    assert all(r["delta"] == 0.0 for r in audit.records)


def test_a_rebound_buffer_goes_back_to_its_object_and_values(tmp_path):
    plain, *_ = train(RebindingEma, False, tmp_path, steps=4)
    audited, *_ = train(RebindingEma, True, tmp_path, steps=4)
    assert torch.equal(plain.mean, audited.mean)
    assert_same_training(RebindingEma, tmp_path, steps=4)
    # the object too: the re-evaluation re-binds ``mean`` again; the training pass's tensor must come back
    model = RebindingEma()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "identity") as audit:
        for batch in batches(3):
            with audit.watch(batch):
                optimizer.zero_grad()
                classification_loss(model, batch).backward()
                trained = model.mean  # the object the training forward bound
                values = trained.clone()
                optimizer.step()
            assert model.mean is trained and torch.equal(model.mean, values)
        assert all(r["verdict"] != "error" for r in audit.records)


def test_loss_after_inside_an_autocast_region_spanning_the_step_uses_the_new_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = batches(1, n=64)[0]
    audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole step inside autocast: its weight cache
        with audit.watch(batch) as w:  # holds bf16 copies of the pre-step weights
            optimizer.zero_grad()
            loss = classification_loss(model, batch)
            loss.backward()
            w.loss = loss
            optimizer.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the new weights
        expected = float(classification_loss(model, batch))
    audit.close()
    assert audit.last["loss_after"] == expected
    assert audit.last["loss_after"] != audit.last["loss_before"]


def noisy_loss(model, batch):
    """A loss_fn that draws its own noise before calling the model (denoising, diffusion)."""
    x, y = batch
    return F.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y)


@pytest.mark.parametrize("use_watch", [False, True])
def test_a_loss_fn_drawing_noise_before_the_model_is_replayed_from_its_start(use_watch, tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: delta must be exactly 0
    with stepaudit.Audit(model, optimizer, noisy_loss, run=tmp_path / "r") as audit:
        for batch in batches(3):
            if use_watch:
                with audit.watch(batch) as w:
                    optimizer.zero_grad()
                    w.loss = noisy_loss(model, batch)
                    w.loss.backward()
                    optimizer.step()
            else:
                audit.step(batch)
    assert all(r["delta"] == 0.0 for r in audit.records)
    # the loss itself is random, so its rounding error cannot be measured against a float64 twin
    assert all(r["noise_method"] == "roundoff" for r in audit.records)


def test_host_generators_are_tracked_even_when_the_checking_step_is_not_taken(tmp_path):
    assert_same_training(HostLayerDrop, tmp_path, steps=5, skip={0})  # step 0 checks, but is never taken


def test_replays_without_a_state_of_their_own_restore_host_generators_while_tracked(tmp_path):
    # reference_mode="train" replays a fixed torch state that carries no Python/NumPy part
    assert_same_training(
        HostLayerDrop, tmp_path, steps=5, reference=batches(1, n=32, seed=7)[0], reference_mode="train"
    )


def r_drop(model, batch):
    """Two dropout forwards per loss (R-Drop, SimCSE)."""
    x, y = batch
    first, second = model(x), model(x)
    return 0.5 * (F.cross_entropy(first, y) + F.cross_entropy(second, y)) + F.mse_loss(first, second)


def logit_dropout(model, batch):
    """Randomness drawn by loss_fn after the model call."""
    x, y = batch
    return F.cross_entropy(F.dropout(model(x), 0.3), y)


@pytest.mark.parametrize("loss_fn", [r_drop, logit_dropout, noisy_loss])
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_accumulation_replays_each_micro_batch_from_where_its_loss_fn_started(loss_fn, micro_batches, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: delta must be exactly 0
    micro = batches(micro_batches)
    with stepaudit.Audit(model, optimizer, loss_fn, run=tmp_path / "r") as audit:
        with audit.watch(micro, accumulate=micro_batches):
            optimizer.zero_grad()
            for batch in micro:
                (loss_fn(model, batch) / micro_batches).backward()
            optimizer.step()
    assert audit.last["delta"] == 0.0 and audit.last["loss_before"] == audit.last["loss_after"]


def test_python_random_drawn_only_later_in_training_is_still_restored(tmp_path):
    class LateLayerDrop(HostLayerDrop):
        on = False  # switched on by the loop after the audit's first check

        def forward(self, x):
            if self.training and LateLayerDrop.on and random.random() < 0.5:
                x = x + self.a(x)
            return self.b(x)

    def switch(step: int) -> None:
        LateLayerDrop.on = step >= 3

    assert_same_training(LateLayerDrop, tmp_path, steps=8, before_each=switch)


def test_one_backward_for_all_micro_batches_replays_each_from_its_forward(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    micro = batches(2)
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r") as audit:
        with audit.watch(micro, accumulate=2) as w:
            optimizer.zero_grad()
            w.loss = sum(classification_loss(model, b) / 2 for b in micro)
            w.loss.backward()
            optimizer.step()
    assert audit.last["loss_after"] == pytest.approx(float(w.loss), rel=1e-6)  # the same masks, lr 0


def test_closing_inside_a_step_leaves_no_host_tracker_behind(tmp_path):
    from stepaudit import state

    before = state._HOST_TRACKERS[0]
    torch.manual_seed(0)
    model = HostLayerDrop()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r")
    batch = batches(1)[0]
    with audit.watch(batch):
        optimizer.zero_grad()
        classification_loss(model, batch).backward()
        audit.close()
    assert state._HOST_TRACKERS[0] == before

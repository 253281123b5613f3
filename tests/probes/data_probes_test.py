"""The reference / next_delta / noise probes against independent recomputation on twin models,
and bit-identical training with them switched on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from support.identity import assert_same_model, assert_same_optimizer, assert_same_rng, rng_state, seed_host

import stepaudit
from stepaudit.probes.data import reference_batches, run_shares


class Net(nn.Module):
    """5 → 16 (BatchNorm?) tanh (dropout?) → 3."""

    def __init__(self, dropout: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, (x @ torch.randn(5, 3, generator=g)).argmax(1)


def batches(n_batches: int, size: int = 32, seed: int = 1):
    x, y = data(n_batches * size, seed)
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n_batches)]


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def twin(factory, state: dict, params_from: dict | None = None, dtype=torch.float32) -> nn.Module:
    """A fresh model holding ``state``, with the parameters replaced by ``params_from`` if given."""
    model = factory()
    state = dict(state)
    if params_from is not None:
        state.update({k: v for k, v in params_from.items() if k in dict(model.named_parameters())})
    model.load_state_dict(state)
    return model.to(dtype)


def audited(model, tmp_path, **kwargs):
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    return stepaudit.Audit(model, opt, loss_fn, run=tmp_path / "run", **kwargs)


# -- reference ---------------------------------------------------------------------------------------------------
def reference_oracle(factory, state, x, y, mode="eval", rng=None) -> tuple[float, torch.Tensor]:
    model = factory()
    model.load_state_dict(state)
    model.train(mode == "train")
    if rng is not None:
        torch.set_rng_state(rng)
    loss = loss_fn(model, (x, y))
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def batch_gradient(factory, state, batch) -> torch.Tensor:
    model = factory()
    model.load_state_dict(state)
    loss_fn(model, batch).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("shape", ["tuple", "list", "loader"])
def test_ref_delta_and_grad_cos_match_recomputation_eval_mode(tmp_path, shape):
    torch.manual_seed(0)
    factory = lambda: Net(bn=True)  # noqa: E731 - BatchNorm: eval mode must use running statistics
    model = factory()
    xr, yr = data(70, seed=9)
    reference = {
        "tuple": (xr, yr),
        "list": [(xr[:30], yr[:30]), (xr[30:33], yr[30:33]), (xr[33:], yr[33:])],  # unequal sizes
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xr, yr), batch_size=32),
    }[shape]
    audit = audited(model, tmp_path, reference=reference, strict=True)
    for batch in batches(3):
        before = snapshot(model)
        audit.step(batch)
        after = snapshot(model)
        record = audit.last
        # Both evaluations use the buffers as they are after the step; only the weights differ.
        loss_old, grad_ref = reference_oracle(
            factory, {**after, **{k: before[k] for k in dict(model.named_parameters())}}, xr, yr
        )
        loss_new, _ = reference_oracle(factory, after, xr, yr)
        assert record["ref_mode"] == "eval"
        assert record["ref_loss_before"] == pytest.approx(loss_old, rel=1e-6)
        assert record["ref_loss_after"] == pytest.approx(loss_new, rel=1e-6)
        assert record["ref_delta"] == pytest.approx(loss_new - loss_old, abs=2e-6)
        g = batch_gradient(factory, before, batch)
        assert record["grad_cos_ref"] == pytest.approx(float(g @ grad_ref / (g.norm() * grad_ref.norm())), abs=1e-5)
        assert 0 < record["ref_rounding_noise"] < 1e-4
    audit.close()


def test_reference_train_mode_uses_one_fixed_set_of_dropout_masks(tmp_path):
    torch.manual_seed(0)
    factory = lambda: Net(dropout=0.5)  # noqa: E731
    model = factory()
    xr, yr = data(40, seed=9)
    audit = audited(model, tmp_path, reference=(xr, yr), reference_mode="train", strict=True)
    states, rng = [snapshot(model)], None
    for batch in batches(3):
        audit.step(batch)
        rng = torch.get_rng_state() if rng is None else rng  # the probe fixed its masks here
        states.append(snapshot(model))
    for t, record in enumerate(audit.records):
        assert record["ref_mode"] == "train"
        assert record["ref_loss_before"] == pytest.approx(
            reference_oracle(factory, states[t], xr, yr, "train", rng)[0], rel=1e-6
        )
        assert record["ref_loss_after"] == pytest.approx(
            reference_oracle(factory, states[t + 1], xr, yr, "train", rng)[0], rel=1e-6
        )
    for previous, record in zip(audit.records, audit.records[1:]):
        assert record["ref_loss_before"] == previous["ref_loss_after"]  # same weights, same masks
    eval_loss = reference_oracle(factory, states[-1], xr, yr, "eval")[0]
    assert abs(audit.last["ref_loss_after"] - eval_loss) > 1e-3  # dropout really was on
    audit.close()


@pytest.mark.parametrize("bn", [False, True])
def test_cached_reference_loss_matches_recomputation(tmp_path, bn):
    """With grad_cos off, L_ref(w_{t+1}) is reused as the next step's "before" only when weights and
    buffers are bit-identical; with BatchNorm the running statistics move, so it must recompute."""
    torch.manual_seed(0)
    factory = lambda: Net(bn=bn)  # noqa: E731
    model = factory()
    xr, yr = data(50, seed=9)
    audit = audited(model, tmp_path, reference=(xr, yr), strict=True)
    audit.options["probe_options"] = {"reference": {"grad_cos": False}}
    for batch in batches(3):
        before = snapshot(model)
        audit.step(batch)
        after = snapshot(model)
        old = {**after, **{k: before[k] for k in dict(model.named_parameters())}}
        assert audit.last["ref_loss_before"] == pytest.approx(reference_oracle(factory, old, xr, yr)[0], rel=1e-6)
        assert "grad_cos_ref" not in audit.last
    audit.close()


def test_reference_every_schedules_the_probe(tmp_path):
    torch.manual_seed(0)
    audit = audited(Net(), tmp_path, reference=data(20, 9), reference_every=2, strict=True)
    for batch in batches(4):
        audit.step(batch)
    assert ["ref_delta" in r for r in audit.records] == [True, False, True, False]
    audit.close()


def test_reference_kinds_and_refusals(tmp_path):
    x, y = data(10, 9)
    assert len(list(reference_batches((x, y))())) == 1  # a tuple is one batch
    assert len(list(reference_batches({"x": x})())) == 1
    assert len(list(reference_batches(x)())) == 1
    assert len(list(reference_batches([(x, y), (x, y)])())) == 2  # a list is a list of batches
    with pytest.raises(TypeError, match="one-shot"):
        reference_batches(b for b in [(x, y)])
    with pytest.raises(TypeError, match="re-iterable"):
        reference_batches(3.0)
    torch.manual_seed(0)
    audit = audited(Net(), tmp_path, reference=[x, y])  # a list read as two batches: hint the tuple
    audit.step(batches(1)[0])
    assert "pass a tuple" in audit.last["probe_errors"]["reference"]
    audit.close()


# -- next_delta ---------------------------------------------------------------------------------------------------
def replayed(factory, state, batch, rng, dtype=torch.float32) -> float:
    model = twin(factory, state, dtype=dtype)
    torch.set_rng_state(rng)
    with torch.no_grad():
        return float(loss_fn(model, (batch[0].to(dtype), batch[1])))


@pytest.mark.parametrize("precision", [None, "float64"])
def test_next_delta_matches_recomputation_with_the_same_dropout_masks(tmp_path, precision):
    torch.manual_seed(0)
    factory = lambda: Net(dropout=0.3, bn=True)  # noqa: E731
    model = factory()
    audit = audited(model, tmp_path, probes={"next_delta": 1}, precision=precision, strict=True)
    data_batches = batches(4)
    states, rngs = [], []
    for batch in data_batches:
        states.append(snapshot(model))
        rngs.append(torch.get_rng_state())  # the training forward of this step starts here
        audit.step(batch)
    dtype = torch.float64 if precision else torch.float32
    tolerance = 1e-12 if precision else 1e-6
    for t in range(3):
        record = audit.records[t]
        at_old = replayed(factory, states[t], data_batches[t + 1], rngs[t + 1], dtype)
        at_new = replayed(factory, states[t + 1], data_batches[t + 1], rngs[t + 1], dtype)
        assert record["next_loss_before"] == pytest.approx(at_old, rel=tolerance)
        assert record["next_loss_after"] == pytest.approx(at_new, rel=tolerance)
        assert record["next_delta"] == pytest.approx(at_new - at_old, abs=10 * tolerance)
        assert 0 < record["next_rounding_noise"] < 1e-4
    assert "next_delta" not in audit.records[3]  # its next batch has not been seen
    audit.close()
    stored = stepaudit.load(audit.run)  # merged into the previous record and rewritten in the store
    assert list(stored["next_delta"].iloc[:3]) == pytest.approx([r["next_delta"] for r in audit.records[:3]])


def test_next_delta_every_other_step_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"probes=\{'next_delta': 1\}"):
        audited(Net(), tmp_path, probes={"next_delta": 2})


# -- noise -------------------------------------------------------------------------------------------------------
def unit_gradients(factory, state, batch, bounds, train=True) -> torch.Tensor:
    """Rows: gradient of the loss on each slice, one backward each, on a twin."""
    rows = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        model = twin(factory, state).train(train)
        loss_fn(model, (batch[0][start:stop], batch[1][start:stop])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    return torch.stack(rows)


def covariance_trace(rows: torch.Tensor) -> float:
    return float(torch.trace(torch.cov(rows.T)))


@pytest.mark.parametrize(
    "bn, options, expected, engine",
    [
        (False, {}, "per_sample", "hooks"),
        (False, {"groups": 1}, "per_sample", "hooks"),
        (False, {"engine": "vmap"}, "per_sample", "vmap"),
        (True, {}, "micro_batch", None),
        (False, {"method": "micro_batch"}, "micro_batch", None),
    ],
)
def test_noise_probe_matches_brute_force_gradients(tmp_path, bn, options, expected, engine):
    torch.manual_seed(0)
    factory = lambda: Net(bn=bn)  # noqa: E731
    model = factory()
    audit = audited(model, tmp_path, probes={"noise": 1}, strict=True)
    audit.options["probe_options"] = {"noise": options}
    for batch in batches(2):
        before = snapshot(model)
        audit.step(batch)
        record = audit.last
        assert record["noise_scale_method"] == expected and record.get("noise_engine") == engine
        if engine == "hooks":
            assert record["noise_pass"] == "training"  # no forward/backward of its own
        unit = 1 if expected == "per_sample" else 4  # 8 micro-batches of 4
        rows = unit_gradients(factory, before, batch, list(range(0, 33, unit)))
        trace = unit * covariance_trace(rows)
        signal = float(rows.mean(0) @ rows.mean(0)) - trace / 32
        assert record["trace_sigma"] == pytest.approx(trace, rel=1e-4)
        assert record["grad_sq_norm"] == pytest.approx(signal, rel=1e-4, abs=1e-6)
        assert record["noise_scale"] == pytest.approx(trace / signal, rel=1e-3)
        assert record["grad_snr"] == pytest.approx(32 * signal / trace, rel=1e-3)
        if options.get("groups") == 1:  # norms only, as BackPACK's BatchL2Grad: no standard errors
            assert math.isnan(record["noise_stderr"])
        else:
            assert record["noise_stderr"] > 0
        assert ("noise_fallback" in record) == bn
    audit.close()


def test_two_batch_method_matches_its_formula_on_brute_force_gradients(tmp_path):
    torch.manual_seed(0)
    factory = lambda: Net(bn=True)  # noqa: E731
    model = factory()
    audit = audited(model, tmp_path, probes={"noise": 1}, strict=True)
    audit.options["probe_options"] = {"noise": {"method": "two_batch", "micro_batches": 8}}
    estimates = []
    for batch in batches(3):
        before = snapshot(model)
        audit.step(batch)
        small, big = (unit_gradients(factory, before, batch, [0, stop])[0] for stop in (4, 32))
        s2, b2 = float(small @ small), float(big @ big)
        signal, trace = (32 * b2 - 4 * s2) / 28, (s2 - b2) / (1 / 4 - 1 / 32)
        assert audit.last["grad_sq_norm"] == pytest.approx(signal, rel=1e-4, abs=1e-6)
        assert audit.last["trace_sigma"] == pytest.approx(trace, rel=1e-4)
        estimates.append((signal, trace))
    mean_signal, mean_trace = (sum(e[i] for e in estimates) / 3 for i in (0, 1))
    assert audit.last["noise_scale"] == pytest.approx(mean_trace / mean_signal, rel=1e-3)  # ratio of means
    assert audit.last["noise_scale_steps"] == 3
    audit.close()


def test_noise_probe_refuses_a_summed_loss(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    summed = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    audit = stepaudit.Audit(model, opt, summed, run=tmp_path / "run", probes={"noise": 1})
    audit.step(batches(1)[0])
    assert "sums over the batch" in audit.last["probe_errors"]["noise"]
    audit.close()


def masked_example_gradients(factory, state, batch, rng: torch.Tensor) -> torch.Tensor:
    """Rows: each example's gradient under the dropout masks the training forward drew from ``rng``."""
    model = twin(factory, state).train()
    torch.set_rng_state(rng)  # one forward over the whole batch draws the same masks as training did
    losses = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    params = list(model.parameters())
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]).double() for row in rows])


@pytest.mark.parametrize("clip", [False, True])
def test_noise_probe_with_dropout_uses_the_training_masks(tmp_path, clip):
    # clip: the training gradient no longer adds up, so the probe replays the pass, with the step's masks
    torch.manual_seed(0)
    factory = lambda: Net(dropout=0.5)  # noqa: E731
    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    audit = stepaudit.Audit(model, optimizer, loss_fn, run=tmp_path / "run", probes={"noise": 1}, strict=True)
    for batch in batches(2):
        before, rng = snapshot(model), torch.get_rng_state()
        with audit.watch(batch):
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            optimizer.step()
        record = audit.last
        assert record["noise_scale_method"] == "per_sample"
        assert record["noise_pass"] == ("replay" if clip else "training")
        rows = masked_example_gradients(factory, before, batch, rng)
        trace = covariance_trace(rows)
        assert record["trace_sigma"] == pytest.approx(trace, rel=1e-4)
        assert record["grad_sq_norm"] == pytest.approx(float(rows.mean(0) @ rows.mean(0)) - trace / 32, rel=1e-4)
        fresh = masked_example_gradients(factory, before, batch, torch.Generator().manual_seed(123).get_state())
        assert covariance_trace(fresh) != pytest.approx(trace, rel=1e-2)  # other masks: the check can tell
    audit.close()


def test_noise_probe_replays_the_pass_when_the_training_gradient_was_clipped(tmp_path):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    audit = stepaudit.Audit(model, optimizer, loss_fn, run=tmp_path / "run", probes={"noise": 1}, strict=True)
    batch = batches(1)[0]
    before = snapshot(model)
    with audit.watch(batch):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the captured gradients no longer add up
        optimizer.step()
    record = audit.last
    assert record["noise_pass"] == "replay"
    rows = unit_gradients(Net, before, batch, list(range(33)))
    assert record["trace_sigma"] == pytest.approx(covariance_trace(rows), rel=1e-4)  # of the unclipped loss
    assert all(not m._forward_hooks for m in model.modules())  # the capture's hooks are gone
    audit.close()


def test_noise_capture_watches_only_the_training_pass(tmp_path):
    torch.manual_seed(0)
    model = Net()
    audit = audited(model, tmp_path, probes={"noise": 2})
    for step, batch in enumerate(batches(3)):
        audit.step(batch)
        assert all(not m._forward_hooks for m in model.modules())
        assert ("noise_pass" in audit.last) == (step % 2 == 0)
    audit.close()


# -- auditing never changes training ------------------------------------------------------------------------------
def train(model, optimizer, data_batches, audit=None):
    for batch in data_batches:
        if audit is not None:
            audit.step(batch)
        else:
            optimizer.zero_grad()
            loss_fn(model, batch).backward()
            optimizer.step()
        torch.rand(1)  # the user's own RNG draws continue from where training left them


@pytest.mark.parametrize("config", ["bn-dropout-train-ref-loader", "dropout-per-sample-eval-ref", "two-batch"])
def test_training_is_bit_identical_with_data_probes_on(tmp_path, config):
    bn = config.startswith("bn") or config == "two-batch"
    factory = lambda: Net(dropout=0.3, bn=bn)  # noqa: E731
    xr, yr = data(48, seed=9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xr, yr), batch_size=16, shuffle=True)
    runs = []
    for audit_on in (False, True):
        torch.manual_seed(0)
        seed_host()
        model = factory()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        audit = None
        if audit_on:
            reference, mode = (loader, "train") if config.startswith("bn") else ((xr, yr), "eval")
            audit = stepaudit.Audit(
                model,
                optimizer,
                loss_fn,
                run=tmp_path / config,
                strict=True,
                probes={"noise": 1, "next_delta": 1},
                reference=reference,
                reference_mode=mode,
            )
            if config == "two-batch":
                audit.options["probe_options"] = {"noise": {"method": "two_batch"}}
        train(model, optimizer, batches(4), audit)
        runs.append((model, optimizer, rng_state()))
        if audit:
            assert all("probe_errors" not in r for r in audit.records)
            if config == "dropout-per-sample-eval-ref":
                assert all(r["noise_pass"] == "training" for r in audit.records)
            assert "next_delta" in audit.records[0] and "ref_delta" in audit.records[0]
            audit.close()
    (m0, o0, r0), (m1, o1, r1) = runs
    assert_same_model(m0, m1)
    assert_same_optimizer(o0, o1)
    assert_same_rng(r0, r1)
    assert all(m.training for m in m1.modules())


# -- per-run shares ---------------------------------------------------------------------------------------------------
def test_run_shares_counts_by_hand():
    records = [
        {
            "verdict": "decrease",
            "next_delta": 0.2,
            "next_rounding_noise": 0.01,
            "ref_delta": -0.1,
            "grad_cos_ref": 0.5,
            "trace_sigma": 10.0,
            "grad_sq_norm": 1.0,
        },
        {
            "verdict": "decrease",
            "next_delta": 0.005,
            "next_rounding_noise": 0.01,
            "ref_delta": 0.3,
            "grad_cos_ref": -0.1,
            "trace_sigma": 30.0,
            "grad_sq_norm": 3.0,
        },  # next within rounding: not "hurt"
        {
            "verdict": "increase",
            "next_delta": 0.4,
            "ref_delta": 0.2,
            "ref_rounding_noise": 0.0,
            "grad_cos_ref": 0.2,
            "trace_sigma": 20.0,
            "grad_sq_norm": -0.5,
        },
        {"verdict": "decrease", "ref_delta": math.nan},  # nothing measured
    ]
    shares = run_shares(records)
    assert shares["steps_with_next_delta"] == 3 and shares["steps_with_ref_delta"] == 3
    assert shares["share_hurt_next"] == pytest.approx(2 / 3)
    assert shares["share_helped_own_hurt_next"] == pytest.approx(1 / 3)
    assert shares["share_hurt_ref"] == pytest.approx(2 / 3)
    assert shares["share_helped_own_hurt_ref"] == pytest.approx(1 / 3)
    assert shares["median_grad_cos_ref"] == pytest.approx(0.2)
    assert shares["noise_scale_pooled"] == pytest.approx((60 / 3) / (3.5 / 3), rel=1e-12)  # averaged, then divided
    empty = run_shares([])
    assert empty["steps_with_next_delta"] == 0 and math.isnan(empty["share_hurt_next"])


def test_noise_falls_back_to_two_batch_when_micro_batches_are_impossible(tmp_path):
    torch.manual_seed(0)
    audit = audited(Net(bn=True), tmp_path, probes={"noise": 1}, strict=True)
    x, y = data(3, seed=2)  # BatchNorm in train mode and 3 examples: no 2 micro-batches of ≥ 2
    audit.step((x, y))
    record = audit.last
    assert record["noise_scale_method"] == "two_batch"
    assert "BatchNorm in train mode" in record["noise_fallback"] and "micro_batch" in record["noise_fallback"]
    audit.close()


def test_gradient_accumulation_parts_pool_into_one_batch(tmp_path):
    """watch(accumulate=2): per-example statistics over both micro-batches = over the 32 examples."""
    torch.manual_seed(0)
    factory = lambda: Net()  # noqa: E731
    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    audit = stepaudit.Audit(model, optimizer, loss_fn, run=tmp_path / "run", probes={"noise": 1}, strict=True)
    batch = batches(1)[0]
    parts = [(batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:])]
    before = snapshot(model)
    with audit.watch(parts, accumulate=2):
        optimizer.zero_grad()
        for part in parts:
            (loss_fn(model, part) / 2).backward()
        optimizer.step()
    rows = unit_gradients(factory, before, batch, list(range(33)))
    trace = covariance_trace(rows)
    assert audit.last["trace_sigma"] == pytest.approx(trace, rel=1e-4)
    assert audit.last["grad_sq_norm"] == pytest.approx(float(rows.mean(0) @ rows.mean(0)) - trace / 32, rel=1e-3)
    audit.close()


def test_noise_capture_on_the_training_pass_leaves_training_bit_identical(tmp_path):
    # the capture returns each hooked output as a clone; in-place ReLU then works on the clone
    def factory():
        return nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(16, 3))

    runs = []
    for audit_on in (False, True):
        torch.manual_seed(0)
        seed_host()
        model = factory()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        audit = (
            stepaudit.Audit(model, optimizer, loss_fn, run=tmp_path / "run", probes={"noise": 1}, strict=True)
            if audit_on
            else None
        )
        train(model, optimizer, batches(4), audit)
        if audit is not None:
            assert all(r["noise_pass"] == "training" for r in audit.records)
            audit.close()
        runs.append((model, optimizer, rng_state()))
    (m0, o0, r0), (m1, o1, r1) = runs
    assert_same_model(m0, m1)
    assert_same_optimizer(o0, o1)
    assert_same_rng(r0, r1)


def test_noise_probe_replays_when_reading_the_training_pass_fails(tmp_path, monkeypatch):
    import stepaudit.probes.data.noise as data_probes

    def broken(*args, **kwargs):
        raise RuntimeError("unexpected capture")

    monkeypatch.setattr(data_probes, "captured_moments", broken)
    torch.manual_seed(0)
    audit = audited(Net(), tmp_path, probes={"noise": 1}, strict=True)
    audit.step(batches(1)[0])
    assert audit.last["noise_pass"] == "replay" and audit.last["noise_scale_method"] == "per_sample"
    audit.close()


class KeywordCall(nn.Module):
    """Calls its Linear layer with a keyword argument: forward hooks see no positional input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(input=x)


def test_noise_capture_never_raises_into_the_training_forward(tmp_path):
    torch.manual_seed(0)
    model = KeywordCall()
    audit = audited(model, tmp_path, probes={"noise": 1})
    audit.step(batches(1)[0])  # must not raise
    assert audit.last["noise_pass"] == "replay" and "probe_errors" not in audit.last
    assert not model.fc._forward_hooks
    audit.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_noise_probe_on_a_16_bit_model(tmp_path, dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    audit = audited(model, tmp_path, probes={"noise": 1}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    batch = batches(1)[0]
    before = snapshot(model)
    audit.step((batch[0].to(dtype), batch[1]))
    record = audit.last
    assert "probe_errors" not in record and record["noise_scale_method"] == "per_sample"
    # oracle: the same (16-bit) weights in float32, one gradient per example; the tolerance is 16-bit rounding
    rows = unit_gradients(Net, {k: v.float() for k, v in before.items()}, batch, list(range(33)))
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]  # measured 4e-5 and 4e-4: 10× margin
    assert record["trace_sigma"] == pytest.approx(covariance_trace(rows), rel=tolerance)
    audit.close()

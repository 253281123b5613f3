"""The core audit against independent oracles: recomputed losses, autograd dot products, closed forms."""

from __future__ import annotations

import copy
import math
import statistics
import warnings

import numpy as np
import pytest
import torch
from conftest import classification_loss, make_mlp
from torch import nn

import stepaudit


def audited_sgd_step(model, batch, lr, tmp_path, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "run", **kwargs) as audit:
        audit.step(batch)
        return audit.last


def test_delta_matches_independent_recomputation_with_dropout(tiny_batch, tmp_path):
    model = make_mlp(dropout=0.3)
    old = copy.deepcopy(model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    record = audited_sgd_step(model, tiny_batch, 0.5, tmp_path)
    with torch.no_grad():  # the oracle: same masks by reseeding, old and new weights
        torch.set_rng_state(rng)
        before = classification_loss(old, tiny_batch).item()
        torch.set_rng_state(rng)
        after = classification_loss(model, tiny_batch).item()
    assert record["loss_before"] == pytest.approx(before, rel=1e-6)
    assert record["loss_after"] == pytest.approx(after, rel=1e-6)
    assert record["delta"] == pytest.approx(after - before, rel=1e-5, abs=1e-7)


def test_first_order_is_autograd_gradient_dot_update(tiny_batch, tmp_path):
    model = make_mlp()
    old = copy.deepcopy(model)
    record = audited_sgd_step(model, tiny_batch, 0.3, tmp_path)
    grads = torch.autograd.grad(classification_loss(old, tiny_batch), list(old.parameters()))
    update = [new.detach() - o.detach() for new, o in zip(model.parameters(), old.parameters())]
    expected = sum(float((g.double() * u.double()).sum()) for g, u in zip(grads, update))
    assert record["first_order"] == pytest.approx(expected, rel=1e-6)
    g_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    u_norm = math.sqrt(sum(float((u.double() ** 2).sum()) for u in update))
    assert record["grad_norm"] == pytest.approx(g_norm, rel=1e-6)
    assert record["update_norm"] == pytest.approx(u_norm, rel=1e-6)
    assert record["descent_cos"] == pytest.approx(-expected / (g_norm * u_norm), rel=1e-6)
    w_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in old.parameters()))
    assert record["update_ratio"] == pytest.approx(u_norm / w_norm, rel=1e-6)


def test_layer_rows_match_per_module_norms(tiny_batch, tmp_path):
    model = make_mlp()
    old = copy.deepcopy(model)
    record = audited_sgd_step(model, tiny_batch, 0.3, tmp_path)
    rows = {(r["kind"], r["name"]): r for r in record["layers"]}
    for index in ("0", "2"):
        d = torch.cat(
            [(a - b).reshape(-1) for a, b in zip(model[int(index)].parameters(), old[int(index)].parameters())]
        )
        w = torch.cat([b.reshape(-1) for b in old[int(index)].parameters()])
        assert rows[("module", index)]["update_norm"] == pytest.approx(float(d.double().norm()), rel=1e-6)
        assert rows[("module", index)]["update_ratio"] == pytest.approx(
            float(d.double().norm() / w.double().norm()), rel=1e-6
        )
    assert rows[("group", "0")]["update_norm"] == pytest.approx(record["update_norm"], rel=1e-9)


def test_remainder_shrinks_like_lr_squared(tiny_batch, tmp_path):
    lrs = np.geomspace(3e-3, 3e-1, 6)
    remainders = []
    for i, lr in enumerate(lrs):
        model = make_mlp().double()
        batch = (tiny_batch[0].double(), tiny_batch[1])
        record = audited_sgd_step(model, batch, float(lr), tmp_path / str(i))
        remainders.append(abs(record["remainder"]))
    slope = np.polyfit(np.log(lrs), np.log(remainders), 1)[0]
    assert 1.8 <= slope <= 2.2


class Quadratic(nn.Module):
    """L(w) = ½ (w − c)ᵀ A (w − c): the parabola along any step is exact, so alpha has a closed form."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(len(c), dtype=torch.float64))
        self.a, self.c = a, c

    def forward(self, _batch):
        d = self.w - self.c
        return 0.5 * d @ self.a @ d


@pytest.mark.parametrize("lr", [0.05, 0.2, 0.5, 0.9])
def test_alpha_and_best_scale_on_a_quadratic(lr, tmp_path):
    a = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    model = Quadratic(a, c)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with stepaudit.Audit(model, opt, lambda m, b: m(b), run=tmp_path / "q") as audit:
        audit.step(torch.zeros(1))
    r = audit.last
    g = a @ (torch.zeros(2, dtype=torch.float64) - c)  # gradient at w = 0
    step = -lr * g
    slope, curvature = float(g @ step), float(0.5 * step @ a @ step)
    best = -slope / (2 * curvature)  # closed-form minimiser of the 1-D parabola
    assert r["first_order"] == pytest.approx(slope, rel=1e-12)
    assert r["remainder"] == pytest.approx(curvature, rel=1e-9)
    assert r["best_scale"] == pytest.approx(best, rel=1e-9)
    assert r["alpha"] == pytest.approx(1 / best - 1, rel=1e-9, abs=1e-12)
    assert r["verdict"] == "decrease"


def test_alpha_is_minus_one_when_the_step_does_not_reach_curvature(tmp_path):
    # A linear loss: no curvature at all, the valley is infinitely far → Cockpit's −1.
    model = nn.Linear(3, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, lambda m, b: m(b).sum(), run=tmp_path / "lin") as audit:
        audit.step(torch.ones(1, 3, dtype=torch.float64))
    assert audit.last["alpha"] == -1.0 and math.isinf(audit.last["best_scale"])


def test_tiny_float32_step_is_flat_never_increase(tiny_batch, tmp_path):
    verdicts = []
    for i, lr in enumerate([1e-9, 1e-10, 1e-11, 1e-12]):
        record = audited_sgd_step(make_mlp(seed=i), tiny_batch, lr, tmp_path / str(i))
        verdicts.append(record["verdict"])
        assert abs(record["delta"]) <= record["rounding_noise"] or record["delta"] == 0
    assert set(verdicts) == {"flat"}


def test_float64_precision_reports_exact_tiny_decrease(tiny_batch, tmp_path):
    record = audited_sgd_step(make_mlp(), tiny_batch, 1e-4, tmp_path, precision="float64")
    assert record["noise_method"] == "float64"
    assert record["verdict"] == "decrease"  # a small plain-SGD step always goes downhill (descent lemma)
    assert record["delta"] == pytest.approx(record["first_order"], rel=1e-2)


def test_every_n_audits_one_step_in_n(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r", every=4) as audit:
        for _ in range(10):
            audit.step(tiny_batch)
    assert [r["step"] for r in audit.records] == [0, 4, 8]


def test_first_step_continues_a_resumed_count(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r", every=2, first_step=3) as audit:
        for _ in range(4):  # global steps 3, 4, 5, 6: every=2 audits 4 and 6
            audit.step(tiny_batch)
    assert [r["step"] for r in audit.records] == [4, 6]
    assert audit.summary()["steps_seen"] == 4
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="first_step"):
            stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "bad", first_step=bad)


def test_param_groups_lbfgs_and_adamw(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 1e-3}], weight_decay=0.1
    )
    old = copy.deepcopy(model)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "adamw") as audit:
        audit.step(tiny_batch)
    groups = {r["name"]: r for r in audit.last["layers"] if r["kind"] == "group"}
    d0 = torch.cat([(a - b).reshape(-1) for a, b in zip(model[0].parameters(), old[0].parameters())])
    assert groups["0"]["update_norm"] == pytest.approx(float(d0.double().norm()), rel=1e-6)
    assert set(groups) == {"0", "1"}

    model = make_mlp().double()
    batch = (tiny_batch[0].double(), tiny_batch[1])
    old = copy.deepcopy(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "lbfgs") as audit:
        loss = audit.step(batch)
    r = audit.last
    assert r["loss_before"] == pytest.approx(float(classification_loss(old, batch)), rel=1e-12)
    assert float(loss) == pytest.approx(r["loss_before"], rel=1e-12)
    with torch.no_grad():
        assert r["loss_after"] == pytest.approx(float(classification_loss(model, batch)), rel=1e-12)
    grads = torch.autograd.grad(classification_loss(old, batch), list(old.parameters()))
    fo = sum(
        float((g * (n.detach() - o.detach())).sum()) for g, n, o in zip(grads, model.parameters(), old.parameters())
    )
    assert r["first_order"] == pytest.approx(fo, rel=1e-9)
    assert r["verdict"] == "decrease"


def test_summary_and_load_round_trip(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r") as audit:
        for _ in range(3):
            audit.step(tiny_batch)
    summary = audit.summary()
    assert summary["audited_steps"] == 3
    assert summary["share_decrease"] + summary["share_increase"] + summary["share_flat"] == pytest.approx(1.0)
    frame = stepaudit.load(tmp_path / "r")
    assert list(frame["step"]) == [0, 1, 2]
    _check_summary_against_records(audit.summary(), audit.records)
    assert list(frame["delta"]) == pytest.approx([r["delta"] for r in audit.records], rel=1e-15)
    meta = stepaudit.load(tmp_path / "r", table="meta")
    assert meta["optimizer"] == "SGD" and meta["param_groups"][0]["lr"] == 0.1
    assert meta["summary"]["audited_steps"] == 3
    layers = stepaudit.load(tmp_path / "r", table="layers")
    assert set(layers["kind"]) == {"module", "group"}


def _check_summary_against_records(summary: dict, records: list[dict]) -> None:
    """The summary's shares and medians, recomputed from the records with the standard library."""
    for verdict in ("decrease", "increase", "flat", "nonfinite", "error"):
        count = sum(r["verdict"] == verdict for r in records)
        assert summary[f"share_{verdict}"] == pytest.approx(count / len(records), rel=1e-15), verdict
    assert summary["median_alpha"] == pytest.approx(statistics.median(r["alpha"] for r in records), rel=1e-15)
    ratio = statistics.median(r["delta"] / r["first_order"] for r in records)
    assert summary["median_delta_over_first_order"] == pytest.approx(ratio, rel=1e-15)
    assert summary["first_loss"] == records[0]["loss_before"] and summary["last_loss"] == records[-1]["loss_before"]


def test_summary_medians_and_shares_on_a_run_that_overshoots(tmp_path):
    # lr 30 on this MLP: some steps lower the batch's loss and some raise it, so the shares and medians differ
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(9)]
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r") as audit:
        for batch in data:
            audit.step(batch)
    verdicts = {r["verdict"] for r in audit.records}
    assert {"decrease", "increase"} <= verdicts, verdicts
    assert len({r["alpha"] for r in audit.records}) == len(audit.records)
    _check_summary_against_records(audit.summary(), audit.records)


def test_strict_capture_failure_leaves_no_open_step(tmp_path, monkeypatch):
    from stepaudit import probes as registry

    def failing_capture(model, names, params, options):
        raise RuntimeError("boom")

    monkeypatch.setitem(registry._REGISTRY, "_failing_capture", lambda ctx: {})
    monkeypatch.setitem(registry._CAPTURES, "_failing_capture", failing_capture)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(
        model, opt, lambda m, b: m(b).pow(2).mean(), run=tmp_path / "run", probes={"_failing_capture": 2}, strict=True
    )
    with pytest.raises(stepaudit.AuditError, match="could not watch"):
        audit.step(torch.randn(4, 3))
    assert audit._pending is None and not model._forward_pre_hooks
    monkeypatch.setitem(registry._CAPTURES, "_failing_capture", lambda *args: None)
    audit.step(torch.randn(4, 3))  # the audit is usable again
    audit.close()


@pytest.mark.parametrize("every, expected", [(3, [False] * 4), (1, [True] * 4)])
def test_flat_buffers_are_kept_only_while_the_next_step_is_audited(tmp_path, monkeypatch, every, expected):
    from stepaudit.flat import FlatBuffers

    monkeypatch.setattr(FlatBuffers, "KEEP_BYTES", 8)  # the model's 16 bytes of buffers count as large
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, opt, lambda m, b: m(b).pow(2).mean(), run=tmp_path / "run", every=every)
    held = []
    for _ in range(4):
        audit.step(torch.randn(4, 3))
        held.append(audit._flat is not None and audit._flat.before is not None)
    assert held == expected  # sparse auditing holds no copy of a large model between audited steps
    assert [r["step"] for r in audit.records] == list(range(0, 4, every))
    assert all(r["verdict"] != "error" for r in audit.records)


def test_small_flat_buffers_are_kept_between_sparse_steps_and_reused_exactly(tmp_path):
    """Under ``KEEP_BYTES`` the buffers stay (no allocation per sparse step); reused, they give the same
    first_order as a float64 recomputation from copies taken by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    audit = stepaudit.Audit(model, opt, loss_fn, run=tmp_path / "run", every=3)
    buffers, truths = set(), {}
    for step in range(7):
        batch = torch.randn(4, 3)
        before = [p.detach().double().clone() for p in model.parameters()]
        audit.step(batch)
        if step % 3 == 0:
            grads = [p.grad.double() for p in model.parameters()]
            after = [p.detach().double() for p in model.parameters()]
            truths[step] = sum(float((g * (a - b)).sum()) for g, a, b in zip(grads, after, before))
        buffers.add(audit._flat.before.data_ptr())
        assert audit._flat.before is not None
    assert len(buffers) == 1
    for record in audit.records:
        assert record["first_order"] == pytest.approx(truths[record["step"]], rel=1e-5)
    audit.close()


def test_dtype_change_mid_run_reallocates_the_buffers(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, opt, lambda m, b: m(b).pow(2).mean(), run=tmp_path / "run")
    audit.step(torch.randn(4, 3))
    model.double()  # new parameter storage, new dtype (the optimizer holds the same Parameter objects)
    audit.step(torch.randn(4, 3, dtype=torch.float64))
    assert audit.last["verdict"] != "error" and audit._flat.before.dtype == torch.float64
    audit.close()


def test_a_param_group_added_after_the_audit_is_audited_too(tiny_batch, tmp_path):
    import copy
    import warnings

    model = make_mlp()
    first, last = model[0], model[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the last layer is not in the optimizer yet: a named warning
        optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
        audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r")
    audit.step(tiny_batch)
    optimizer.add_param_group({"params": list(last.parameters()), "lr": 0.05})  # progressive unfreezing
    before = copy.deepcopy(model)
    audit.step(tiny_batch)
    audit.close()
    grads = torch.autograd.grad(classification_loss(before, tiny_batch), list(before.parameters()))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    first_order = sum(
        float((g * (p.detach() - q.detach())).sum())
        for (n, p), q, g in zip(model.named_parameters(), before.parameters(), grads)
        if n in trained
    )
    record = audit.last
    assert record["first_order"] == pytest.approx(first_order, rel=1e-5)
    assert {row["name"] for row in record["layers"] if row["kind"] == "group"} == {"0", "1"}


def test_probe_state_is_reset_when_a_param_group_is_added(tiny_batch, tmp_path):
    import warnings

    model = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
        audit = stepaudit.Audit(
            model,
            optimizer,
            classification_loss,
            run=tmp_path / "r",
            probes={"interplay": 1, "next_delta": 1, "sharpness": 1},
        )
    with audit:
        audit.step(tiny_batch)
        audit.step(tiny_batch)
        optimizer.add_param_group({"params": list(model[-1].parameters())})
        audit.step(tiny_batch)
        audit.step(tiny_batch)
    assert all("probe_errors" not in r for r in audit.records)


def test_a_param_group_without_a_numeric_lr_is_recorded_as_nan_not_an_error(tmp_path):
    """transformers' Adafactor with relative steps keeps lr=None in its groups."""
    transformers = pytest.importorskip("transformers")
    import math

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = transformers.optimization.Adafactor(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
        lr=None,
        relative_step=True,
        scale_parameter=True,
        warmup_init=True,
    )
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    audit = stepaudit.Audit(model, opt, loss_fn, run=tmp_path / "adafactor")
    for _ in range(3):
        audit.step((torch.randn(8, 4), torch.randint(0, 2, (8,))))
    audit.close()
    assert [r["verdict"] for r in audit.records] != ["error"] * 3
    assert all(r.get("error") is None for r in audit.records), audit.records[0].get("error")
    assert all(math.isnan(r["lr"]) and math.isnan(r["lr_group_1"]) for r in audit.records)


def test_a_new_run_in_an_old_folder_does_not_inherit_its_logged_metrics(tmp_path):
    from stepaudit.store import RunStore, read_metrics

    first = RunStore(tmp_path / "r", {"model": "m"})
    first.log_metric(0, "val_loss", 9.9)  # logged, no step recorded
    first.close()
    RunStore(tmp_path / "r", {"model": "m"}).close()
    assert read_metrics(tmp_path / "r") == {}


def test_autocast_entered_inside_loss_fn_sets_the_noise_floor_of_step(tmp_path):
    """A loss_fn that enters bfloat16 autocast around the model: step() must see it (the forward hook reads it
    inside the forward), so the rounding noise is that of bfloat16 (2⁻⁸ relative at least), not float32's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(m(b[0]), b[1])

    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    with stepaudit.Audit(model, opt, loss_fn, run=tmp_path / "run") as audit:
        for _ in range(3):
            audit.step((x, y))
    for record in audit.records:
        assert record["rounding_noise"] >= 2.0**-8 * abs(record["loss_before"]), record


class _GradWritingSGD(torch.optim.SGD):
    """SGD whose step() also halves each .grad after using it, from call ``writes_from`` on: in place, or
    through ``.data`` (which no version counter sees)."""

    def __init__(self, params, writes_from: int, through_data: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.writes_from, self.through_data, self.calls = writes_from, through_data, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        if self.calls >= self.writes_from:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        (p.grad.data if self.through_data else p.grad).mul_(0.5)
        self.calls += 1
        return loss


def _audit_against_oracle(optimizer_for, tmp_path, monkeypatch, steps=5):
    """Audit ``steps`` steps; per step the float64 oracle of g·Δw, ‖g‖, ‖Δw‖ from autograd on a copy of the
    model taken before it. Returns the records, the oracles, how many times the gradient was copied, and
    whether the final weights equal an unaudited run's."""
    from stepaudit.flat import FlatBuffers

    copies = []
    take_grad = FlatBuffers.take_grad
    monkeypatch.setattr(FlatBuffers, "take_grad", lambda self: copies.append(1) or take_grad(self))
    batches = [(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(steps)]
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # SGD.step hooked: a subclass's super().step() nests
    plain = make_mlp()
    plain_opt = optimizer_for(plain)
    for batch in batches:
        plain_opt.zero_grad()
        classification_loss(plain, batch).backward()
        plain_opt.step()
    model = make_mlp()
    opt = optimizer_for(model)
    oracles = []
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "run") as audit:
        for batch in batches:
            old = copy.deepcopy(model)
            audit.step(batch)
            grads = torch.autograd.grad(classification_loss(old, batch), list(old.parameters()))
            deltas = [(n.detach() - o.detach()).double() for n, o in zip(model.parameters(), old.parameters())]
            oracles.append(
                (
                    sum(float((g.double() * d).sum()) for g, d in zip(grads, deltas)),
                    math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)),
                    math.sqrt(sum(float((d**2).sum()) for d in deltas)),
                )
            )
        records = list(audit.records)
    assert [r["step"] for r in records] == list(range(steps))  # a nested step() is one step
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    return records, oracles, len(copies), identical


def _assert_matches(record, oracle):
    first_order, grad_norm, update_norm = oracle
    assert record["first_order"] == pytest.approx(first_order, rel=1e-5)
    assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    assert record["update_norm"] == pytest.approx(update_norm, rel=1e-6)


@pytest.mark.parametrize(
    "optimizer_for",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-2, maximize=False, foreach=False),
    ],
    ids=["sgd", "adamw", "adam-single-tensor"],
)
def test_later_steps_borrow_the_gradient_and_still_match_the_oracle(optimizer_for, tmp_path, monkeypatch):
    """torch's own optimizers: after the first audited step shows step() leaves .grad alone, no copy is
    taken, and every record still equals the autograd recomputation; training is unchanged."""
    torch.manual_seed(5)
    records, oracles, copies, identical = _audit_against_oracle(optimizer_for, tmp_path, monkeypatch)
    assert copies == 1 and identical
    for record, oracle in zip(records, oracles, strict=True):
        _assert_matches(record, oracle)


@pytest.mark.parametrize("writes_from", [0, 2])
@pytest.mark.parametrize("through_data", [False, True])
def test_an_optimizer_with_its_own_step_is_always_copied(writes_from, through_data, tmp_path, monkeypatch):
    """A custom step() may write .grad, even where no version counter sees it (``.data``): its gradient is
    copied before every step, and every record matches the oracle."""
    torch.manual_seed(6)
    records, oracles, copies, identical = _audit_against_oracle(
        lambda m: _GradWritingSGD(m.parameters(), writes_from, through_data, lr=0.1), tmp_path, monkeypatch
    )
    assert copies == 5 and identical
    for record, oracle in zip(records, oracles, strict=True):
        assert record["verdict"] != "error"
        _assert_matches(record, oracle)


def test_a_step_that_raised_leaves_the_step_count_and_the_next_step_intact(tiny_batch, tmp_path):
    """A step() that raised (here a hook before it) and was retried is still one audited step, inside a
    block and outside one; a nested step() is told apart by its frame, not by a count a raise would leave."""
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    failures = [1]

    def flaky(optimizer, args, kwargs):
        if failures:
            failures.pop()
            raise RuntimeError("out of memory (simulated)")

    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "run") as audit:
        opt.register_step_pre_hook(flaky)  # after the audit's: the audit's pre-hook ran, the step did not
        with audit.watch(tiny_batch):
            opt.zero_grad()
            classification_loss(model, tiny_batch).backward()
            with pytest.raises(RuntimeError, match="simulated"):
                opt.step()
            old = copy.deepcopy(model)
            opt.step()  # the retry is the step
        grads = torch.autograd.grad(classification_loss(old, tiny_batch), list(old.parameters()))
        deltas = [(n.detach() - o.detach()).double() for n, o in zip(model.parameters(), old.parameters())]
        first_order = sum(float((g.double() * d).sum()) for g, d in zip(grads, deltas))
        assert [r["step"] for r in audit.records] == [0]
        assert audit.records[0]["first_order"] == pytest.approx(first_order, rel=1e-5)
        failures.append(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # steps outside audit.step()/watch() are counted, not audited
            with pytest.raises(RuntimeError, match="simulated"):
                opt.step()
            for _ in range(3):
                opt.step()
        audit.step(tiny_batch)
        assert [r["step"] for r in audit.records] == [0, 4]

"""Healthy scripts the passive doctor once raised errors on: two optimizers after one backward, a backward
of several losses or of a non-scalar loss with its gradient, a complex parameter, a parameter group with lr=0."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from doctor_rules_test import codes, passive, run
from support.doctor import diagnose_script, watch_script
from support.doctor import toy_script as _script

from stepaudit.doctor import diagnose, diagnose_facts
from stepaudit.doctor.facts import Facts


def _codes(found: list[dict]) -> list[str]:
    return [d["code"] for d in found]


def _errors(found: list[dict]) -> list[str]:
    return [d["code"] for d in found if d["severity"] == "error"]


TWO_OPTIMIZERS = """
body = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
head = nn.Linear(64, 3)
o1 = torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9)
o2 = torch.optim.Adam(head.parameters(), lr=3e-3)
for epoch in range(6):
    for i in range(0, 512, 32):
        loss = F.cross_entropy(head(body(X[i:i + 32])), y[i:i + 32])
        o1.zero_grad(); o2.zero_grad(); loss.backward(); o1.step(); o2.step()
"""


def test_two_optimizers_stepped_after_one_backward_both_get_its_loss(tmp_path):
    watcher = watch_script(_script(tmp_path, TWO_OPTIMIZERS))
    first = [r["loss_before"] for r in watcher.records if r["optimizer"] == 0]
    second = [r["loss_before"] for r in watcher.records if r["optimizer"] == 1]
    assert len(first) == len(second) == 96 and all(math.isfinite(v) for v in second) and first == second
    found = diagnose_facts(Facts(watcher.records, {}, watcher.observations()))
    assert found[0]["code"] == "healthy" and "nonfinite" not in _codes(found), found


ALTERNATING = """
a, b = nn.Linear(8, 3), nn.Linear(8, 3)
oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
for i in range(0, 512, 32):
    oa.zero_grad(); F.cross_entropy(a(X[i:i + 32]), y[i:i + 32]).backward(); oa.step()
    ob.zero_grad(); (100 + F.cross_entropy(b(X[i:i + 32]), y[i:i + 32])).backward(); ob.step()
"""


def test_alternating_optimizers_each_get_their_own_loss(tmp_path):
    # a GAN's discriminator and generator steps: each optimizer's loss is the one backward before its step
    watcher = watch_script(_script(tmp_path, ALTERNATING))
    first = [r["loss_before"] for r in watcher.records if r["optimizer"] == 0]
    second = [r["loss_before"] for r in watcher.records if r["optimizer"] == 1]
    assert len(first) == len(second) == 16
    assert all(0 < v < 10 for v in first) and all(100 < v < 110 for v in second)


NO_BACKWARD = """
model = nn.Linear(8, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(4):
    for i in range(0, 512, 32):
        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for p, gp in zip(model.parameters(), grads):
            p.grad = gp
        opt.step()
"""


def test_a_step_without_an_observed_loss_has_no_loss_not_a_nan(tmp_path):
    watcher = watch_script(_script(tmp_path, NO_BACKWARD))
    assert watcher.records and all(r.get("loss_before") is None for r in watcher.records)
    found = diagnose_facts(Facts(watcher.records, {}, watcher.observations()))
    assert "nonfinite" not in _codes(found) and "loss_wiring" not in _errors(found), found


VECTOR_BACKWARD = """
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(6):
    for i in range(0, 512, 32):
        out = model(X[i:i + 32])
        opt.zero_grad()
        if LIST:
            half = F.cross_entropy(out[:16], y[i:i + 16]) / 2, F.cross_entropy(out[16:], y[i + 16:i + 32]) / 2
            torch.autograd.backward(list(half))
        else:
            per = F.cross_entropy(out, y[i:i + 32], reduction="none")
            per.backward(gradient=torch.full_like(per, 1 / 32))
        opt.step()
"""


def test_a_backward_of_a_loss_list_or_a_weighted_vector_counts_the_loss(tmp_path):
    for listed in (True, False):
        path = _script(tmp_path, f"LIST = {listed}\n" + textwrap.dedent(VECTOR_BACKWARD))
        watcher = watch_script(path)
        losses = [r["loss_before"] for r in watcher.records]
        assert len(losses) == 96 and all(math.isfinite(v) for v in losses)
        assert 0.9 < losses[0] < 1.4 and losses[-1] < 0.5 * losses[0], losses[:: len(losses) // 4]  # ≈ ln 3 at init
        found = diagnose_facts(Facts(watcher.records, {}, watcher.observations()))
        assert found[0]["code"] == "healthy" and not _errors(found), found


def test_a_weighted_backward_of_a_16_bit_loss_is_summed_without_overflow():
    """Σ loss·w of a float16 vector whose sum exceeds float16's range (65504): finite, in float32."""
    from stepaudit.doctor.passive import _backward_loss

    per = torch.full((256, 64), 115.0, dtype=torch.float16)
    total = _backward_loss(per, torch.ones_like(per))
    assert math.isfinite(float(total)) and float(total) == pytest.approx(115.0 * 256 * 64, rel=1e-3)


COMPLEX = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.filt = nn.Parameter(torch.ones(5, dtype=torch.cfloat))
        self.mlp = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    def forward(self, v):
        return self.mlp(torch.fft.irfft(torch.fft.rfft(v, dim=1) * self.filt, n=8, dim=1))
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(6):
    for i in range(0, 512, 32):
        opt.zero_grad(); F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward(); opt.step()
"""


def test_a_complex_parameter_is_not_called_a_parameter_without_gradient(tmp_path):
    found = diagnose_script(_script(tmp_path, COMPLEX))
    assert "params_not_updating" not in _errors(found), found
    assert not any(d["code"] == "params_not_updating" and "filt" in d["evidence"] for d in found), found


REFUSED = """
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
spare = nn.Parameter(torch.zeros(2, device="meta"))  # FlatBuffers refuses a second device: no statistics
opt = torch.optim.Adam([*model.parameters(), spare], lr=3e-3)
for epoch in range(6):
    for i in range(0, 512, 32):
        opt.zero_grad(); F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward(); opt.step()
"""


def test_a_failed_gradient_capture_is_not_a_zero_gradient(tmp_path):
    watcher = watch_script(_script(tmp_path, REFUSED))
    assert all("capture_error" in r for r in watcher.records[:5]) and not any("measured" in r for r in watcher.records)
    found = diagnose_facts(Facts(watcher.records, {}, watcher.observations()))
    assert "params_not_updating" not in _errors(found), found
    assert found[0]["code"] == "healthy" and "could not be taken" in found[0]["evidence"], found


LR0_GROUP = """
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
opt = torch.optim.SGD(
    [{"params": model[0].parameters(), "lr": LR0}, {"params": [*model[2].parameters(), *model[4].parameters()]}],
    lr=0.05,
    momentum=0.9,
)
for epoch in range(6):
    for i in range(0, 512, 32):
        opt.zero_grad(); F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward(); opt.step()
"""


def test_a_small_group_with_lr_0_on_a_run_that_learns_is_a_note(tmp_path):
    found = diagnose_script(_script(tmp_path, "LR0 = 0.0\n" + textwrap.dedent(LR0_GROUP)))
    assert found[0]["code"] == "healthy" and not _errors(found), found
    note = next(d for d in found if d["code"] == "params_not_updating")
    assert note["severity"] == "info" and "group 0 has lr=0" in note["evidence"]
    assert "if that is intended" in note["fix"]


def _cosine_lr(t: int, period: int) -> float:
    """Cosine annealing from 0.1 to 0 over ``period`` steps, restarted every period when ``period`` repeats."""
    return 0.05 * (1 + math.cos(math.pi * (t % period) / period))


def test_warm_restarts_that_dip_to_zero_are_not_a_schedule_collapse():
    # SGDR with a 50-step period: the lr touches ~1e-5 at the end of each cycle and comes back to 0.1; the
    # loss levels off at a noise floor (0.64), so only the collapse test stands between this run and lr_too_low
    plateau = lambda t: 0.64 + 0.05 * math.exp(-t / 10)  # noqa: E731
    restarts = lambda t: _cosine_lr(t + 1, 50) if (t + 1) % 50 else 1e-6  # noqa: E731
    f = Facts(run(n=200, loss=plateau, lr=restarts), {})
    assert min(r["lr"] for r in f.records[:60]) < 1e-4 and max(r["lr"] for r in f.records[60:]) > 0.09
    assert f.lr_collapse is None
    assert "lr_too_low" not in codes(diagnose(run(n=200, loss=plateau, lr=restarts), meta=passive(steps=200)))
    # the same run with the lr kept at ~0 after the first dip (a per-epoch schedule stepped per batch)
    collapsed = lambda t: restarts(t) if t < 50 else 1e-6 * 0.99**t  # noqa: E731
    found = diagnose(run(n=200, loss=plateau, lr=collapsed), meta=passive(steps=200))
    assert Facts(run(n=200, loss=plateau, lr=collapsed), {}).lr_collapse is not None
    assert codes(found)[0] == "lr_too_low", found


def test_a_loss_falling_from_near_zero_to_a_small_negative_value_is_not_unbounded():
    # a Gaussian NLL (0.5·log σ² + …) starting near 0 and still falling steadily as σ shrinks: -1.35 at the end
    slow = lambda t: 0.006 - 1.4 * t / 300  # noqa: E731
    f = Facts(run(n=300, loss=slow, jitter=False), {})
    assert f.loss_end < -1.2 and f.loss_form is None
    assert "loss_wiring" not in codes(diagnose(run(n=300, loss=slow), meta=passive(steps=300)))
    # a log-likelihood without its minus sign: -1.2 → -60 and still falling
    runaway = lambda t: -1.2 - 60 * (t / 300) ** 1.5  # noqa: E731
    f = Facts(run(n=300, loss=runaway, jitter=False), {})
    assert f.loss_form is not None and f.loss_form["kind"] == "unbounded_below"


def test_one_of_two_optimizers_never_zeroed_is_missing_zero_grad(tmp_path):
    # the two-optimizer script with o2.zero_grad() left out: the head's gradients add up from step to step
    watcher = watch_script(_script(tmp_path, TWO_OPTIMIZERS.replace("o2.zero_grad(); ", "")))
    found = diagnose_facts(Facts(watcher.records, {}, watcher.observations()))
    hit = next(d for d in found if d["code"] == "missing_zero_grad")
    assert hit["severity"] == "error" and "optimizer 1 (Adam)" in hit["evidence"], found
    assert "nonfinite" not in _codes(found)

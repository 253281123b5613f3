"""The doctor's detections of issue #14, each on a small real script with the fault built in, and the same
script without it (the one-change fix) as the check that the rule does not fire on healthy code."""

from __future__ import annotations

import textwrap

import pytest
from support.doctor import diagnose_script

HEAD = """
import torch
import torch.nn as nn
import torch.nn.functional as F
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(512, 8, generator=g)
W = torch.randn(8, 3, generator=g)
y = (X @ W).argmax(1)
"""


def doctor(tmp_path, body: str, max_steps: int = 300) -> list[dict]:
    """The doctor's diagnoses of ``HEAD + body`` run as a script."""
    path = tmp_path / "train.py"
    path.write_text(HEAD + textwrap.dedent(body))
    return diagnose_script(path, max_steps)


def problems(found: list[dict]) -> list[str]:
    return [d["code"] for d in found if d["severity"] in ("error", "warning")]


LOOP = """
for epoch in range(6):
    for i in range(0, 512, 32):
        xb, yb = X[i:i + 32], y[i:i + 32]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
"""

LIST_MODEL = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = {container}(nn.Linear(32, 32) for _ in range(2))
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        x = F.relu(self.inp(x))
        for block in self.blocks:
            x = F.relu(block(x))
        return self.out(x)


model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
"""


def test_layers_in_a_plain_list_are_named_and_modulelist_is_clean(tmp_path):
    found = doctor(tmp_path, LIST_MODEL.format(container="list") + LOOP)
    assert found[0]["code"] == "params_not_updating" and found[0]["severity"] == "error"
    assert "blocks[0].weight" in found[0]["evidence"] and "nn.ModuleList" in found[0]["fix"]
    assert problems(doctor(tmp_path, LIST_MODEL.format(container="nn.ModuleList") + LOOP)) == []


def test_a_parameter_created_inside_forward_is_held_by_no_optimizer(tmp_path):
    body = """
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 24)

        def forward(self, x):
            scale = torch.ones(24, requires_grad=True)
            return F.linear(F.relu(self.inp(x)) * scale, torch.linspace(-0.3, 0.3, 72).reshape(3, 24).requires_grad_())


    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    """
    found = doctor(tmp_path, textwrap.dedent(body) + LOOP)
    assert found[0]["code"] == "params_not_updating"
    assert "created during the forward pass" in found[0]["evidence"]
    assert "2 parameter tensors" in found[0]["evidence"]  # counted once, not once per step


def test_an_input_that_requires_grad_is_not_a_parameter(tmp_path):
    body = """
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(6):
        for i in range(0, 512, 32):
            xb, yb = X[i:i + 32].clone().requires_grad_(), y[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    """
    assert problems(doctor(tmp_path, body)) == []


SCHEDULE = """
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
for epoch in range(6):
    for i in range(0, 512, 32):
        xb, yb = X[i:i + 32], y[i:i + 32]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        {per_batch}sched.step()
    {per_epoch}sched.step()
"""


def test_a_per_epoch_schedule_stepped_every_batch_collapses_the_learning_rate(tmp_path):
    found = doctor(tmp_path, SCHEDULE.format(per_batch="", per_epoch="# "))
    top = found[0]
    assert top["code"] == "lr_too_low" and top["severity"] == "error"
    assert "StepLR (step() called 9" in top["evidence"] and "× in 96 optimizer steps)" in top["evidence"]
    assert "once per epoch" in top["fix"]
    # 0.05 · 0.1^k after 10k steps: below 1/1000 of the peak (5e-5) at step 40
    assert top["first_step"] == 40
    assert "lr_too_low" not in problems(doctor(tmp_path, SCHEDULE.format(per_batch="# ", per_epoch="")))


def test_a_hand_written_update_is_not_called_a_missing_optimizer_step(tmp_path):
    body = """
    w1 = (torch.randn(8, 32) / 8 ** 0.5).requires_grad_()
    w2 = (torch.randn(32, 3) / 32 ** 0.5).requires_grad_()
    for epoch in range(6):
        for i in range(0, 512, 32):
            xb, yb = X[i:i + 32], y[i:i + 32]
            loss = F.cross_entropy(F.relu(xb @ w1) @ w2, yb)
            loss.backward()
            with torch.no_grad():
                for w in (w1, w2):
                    w -= 0.1 * w.grad
                    w.grad = None
    """
    found = doctor(tmp_path, body)
    assert problems(found) == [] and found[0]["code"] == "healthy"
    assert "96 steps" in found[0]["evidence"]  # one step per backward pass


def test_backward_without_any_update_is_still_not_updating(tmp_path):
    body = """
    model = nn.Linear(8, 3)
    for i in range(0, 512, 32):
        F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward()
    """
    found = doctor(tmp_path, body)
    assert found[0]["code"] == "params_not_updating" and found[0]["severity"] == "error"


SOFTMAX = """
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(6):
    for i in range(0, 512, 32):
        xb, yb = X[i:i + 32], y[i:i + 32]
        opt.zero_grad()
        log_probs = torch.log(F.softmax(model(xb), dim={dim}))
        F.nll_loss(log_probs, yb).backward()
        opt.step()
"""


def test_softmax_over_the_batch_axis(tmp_path):
    found = doctor(tmp_path, SOFTMAX.format(dim=0))
    assert found[0]["code"] == "loss_wiring" and "dim 0" in found[0]["evidence"]
    assert problems(doctor(tmp_path, SOFTMAX.format(dim=1))) == []


HAND_LOSS = """
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(6):
    for i in range(0, 512, 32):
        xb, yb = X[i:i + 32], y[i:i + 32]
        opt.zero_grad()
        picked = F.log_softmax(model(xb), dim=1).gather(1, yb[:, None])
        loss = {sign}picked.mean()
        loss.backward()
        opt.step()
"""


def test_a_log_likelihood_without_its_minus_sign_is_unbounded_below(tmp_path):
    found = doctor(tmp_path, HAND_LOSS.format(sign=""))
    assert found[0]["code"] == "loss_wiring" and "unbounded below" in found[0]["evidence"]
    assert problems(doctor(tmp_path, HAND_LOSS.format(sign="-"))) == []


def test_a_loss_that_is_exactly_zero_is_no_learning_signal(tmp_path):
    body = """
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(6):
        for i in range(0, 512, 32):
            xb, yb = X[i:i + 32], y[i:i + 32]
            opt.zero_grad()
            out = model(xb)
            probs = F.one_hot(out.argmax(1), 3).float() + 0 * out  # a hard argmax: log(1) = 0 everywhere
            loss = -(torch.log(probs.max(1).values)).mean() + 1e-3 * out.pow(2).mean() * 0
            loss.backward()
            opt.step()
    """
    found = doctor(tmp_path, body)
    assert found[0]["code"] == "loss_wiring" and "exactly 0" in found[0]["evidence"]


LINEAR = """
x = torch.arange(200, dtype=torch.float32)[:, None]{scale}
t = 3 * torch.arange(200, dtype=torch.float32)[:, None] / 199 + 1
model = nn.Linear(1, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
for epoch in range(2):
    for i in torch.randperm(200, generator=g).tolist():
        opt.zero_grad()
        F.mse_loss(model(x[i:i + 1]), t[i:i + 1]).backward()
        opt.step()
"""


def test_raw_inputs_at_batch_size_one_are_named_as_the_cause(tmp_path):
    found = doctor(tmp_path, LINEAR.format(scale=""))
    assert found[0]["code"] == "unnormalized_inputs", [d["code"] for d in found]
    assert "lr_too_low" not in [d["code"] for d in found]  # nothing computed from the NaN run
    assert "unnormalized_inputs" not in problems(doctor(tmp_path, LINEAR.format(scale=" / 199")))


SLIVER = """
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
Xs = {inputs}
for epoch in range(6):
    for i in range(0, 512, 32):
        opt.zero_grad()
        F.cross_entropy(model(Xs[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
"""


@pytest.mark.parametrize(
    "inputs, what",
    [
        ("1 + 0.01 * X", "sliver"),  # min-max into [0.97, 1.03]: a sliver of the range
        ("X * torch.tensor([1, 1, 1, 1, 1, 1, 1, 300.0])", "differ"),  # one column in raw units, the rest unit-scale
    ],
)
def test_inputs_wrong_per_feature_not_only_in_rms(tmp_path, inputs, what):
    found = doctor(tmp_path, SLIVER.format(inputs=inputs))
    hit = [d for d in found if d["code"] == "unnormalized_inputs"]
    assert hit and what in hit[0]["evidence"]
    assert "unnormalized_inputs" not in [d["code"] for d in doctor(tmp_path, SLIVER.format(inputs="X"))]


def test_a_few_columns_a_thousand_times_smaller_than_the_rest(tmp_path):
    found = doctor(tmp_path, SLIVER.format(inputs="X * torch.tensor([1, 1, 1, 1, 1, 1e-3, 1e-3, 1e-3])"))
    hit = [d for d in found if d["code"] == "unnormalized_inputs"]
    assert hit and "differ by" in hit[0]["evidence"]


def test_a_gaussian_nll_with_a_finite_negative_minimum_is_not_unbounded(tmp_path):
    body = """
    t = X[:, :1] + 0.02 * torch.randn(512, 1, generator=g)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(6):
        for i in range(0, 512, 32):
            opt.zero_grad()
            mean, log_var = model(X[i:i + 32]).chunk(2, dim=1)
            loss = (0.5 * log_var.clamp_min(-9) + 0.5 * (t[i:i + 32] - mean) ** 2 / log_var.clamp_min(-9).exp()).mean()
            loss.backward()
            opt.step()
    """
    assert problems(doctor(tmp_path, body)) == []


def test_a_torchscript_model_is_diagnosed(tmp_path):
    body = """
    model = torch.jit.script(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    """
    found = doctor(tmp_path, textwrap.dedent(body) + LOOP)
    assert found[0]["code"] == "healthy"


def test_progressive_unfreezing_with_add_param_group_is_not_params_not_updating(tmp_path):
    """Fine-tuning that unfreezes the backbone later (``add_param_group``): its parameters are held from then
    on, so no "belong to no optimizer" error; a backbone never added is still caught (the control)."""
    body = """
backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
model = nn.Sequential(backbone, nn.Linear(32, 3))
for p in backbone.parameters():
    p.requires_grad_(False)
opt = torch.optim.Adam(model[1].parameters(), lr=1e-2)
for step in range(200):
    if step == 20:
        for p in backbone.parameters():
            p.requires_grad_(True)
        {add}
    idx = torch.randint(0, 512, (64,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    opt.step()
"""
    added = doctor(
        tmp_path, body.replace("{add}", 'opt.add_param_group({"params": backbone.parameters(), "lr": 1e-3})')
    )
    assert "params_not_updating" not in problems(added), added[0]
    forgotten = doctor(tmp_path, body.replace("{add}", "pass"))
    assert forgotten[0]["code"] == "params_not_updating"

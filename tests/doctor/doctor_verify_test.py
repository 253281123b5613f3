"""``stepaudit doctor --verify``: each counterfactual hook against an oracle, the verdicts, and end-to-end runs."""

from __future__ import annotations

import json
import math
import statistics
import textwrap

import pytest
import torch
from torch import nn

from stepaudit.doctor import cli, counterfactual
from stepaudit.doctor.report import render_plain
from stepaudit.doctor.verify import (
    RunLoss,
    _detail,
    judge,
    printed_metric,
    run_child,
    verify,
    watched_run,
)

HEAD = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = (x[:, 0] + x[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
"""
LR_TOO_HIGH = (
    HEAD
    + """
opt = torch.optim.SGD(model.parameters(), lr=8.0, momentum=0.9)
for step in range(100):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
"""
)
NO_ZERO_GRAD = (
    HEAD
    + """
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for step in range(120):
    idx = torch.randint(0, 512, (64,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
"""
)
HEALTHY = (
    HEAD
    + """
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for step in range(60):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
print(f"val_acc: {93.5}%")
"""
)


def write(tmp_path, source: str, name: str = "train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def diagnosis(code: str) -> dict:
    return {
        "code": code,
        "severity": "error",
        "confidence": 0.9,
        "first_step": 0,
        "evidence": "forced",
        "fix": "forced",
    }


@pytest.fixture(autouse=True)
def _no_hook_left():
    """Every test removes the hooks it installs (a global hook left behind would change later tests)."""
    yield
    from torch.nn.modules import module
    from torch.optim import optimizer

    assert not optimizer._global_optimizer_pre_hooks and not optimizer._global_optimizer_post_hooks
    assert not module._global_forward_pre_hooks


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).pow(2).mean().backward()
    opt.step()


# -- the hooks, each against an oracle ------------------------------------------------------------------------
def test_scale_lr_scales_each_group_and_scheduler_once():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3}, {"params": model[1].parameters()}], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    handles = counterfactual.install("lr_too_high", 0.1)
    try:
        _step(model, opt, torch.randn(8, 3))
        assert [g["lr"] for g in opt.param_groups] == [0.3 * 0.1, 0.05 * 0.1]
        assert scheduler.base_lrs == [0.3 * 0.1, 0.05 * 0.1]
        _step(model, opt, torch.randn(8, 3))  # applied once, not at every step
        assert [g["lr"] for g in opt.param_groups] == [0.3 * 0.1, 0.05 * 0.1]
        scheduler.step()
        assert [g["lr"] for g in opt.param_groups] == [0.3 * 0.1 * 0.5, 0.05 * 0.1 * 0.5]
    finally:
        counterfactual.remove(handles)


def test_zero_after_step_keeps_accumulation_and_clears_the_last_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights (and so each gradient) stay fixed
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    alone = {}
    for name, x in (("a", a), ("b", b)):
        model.zero_grad()
        model(x).sum().backward()
        alone[name] = model.weight.grad.clone()
    model.zero_grad()
    handles = counterfactual.install("missing_zero_grad")
    try:
        model(a).sum().backward()
        model(b).sum().backward()  # two micro-batches before one step: both kept
        assert torch.allclose(model.weight.grad, alone["a"] + alone["b"])
        opt.step()
        assert model.weight.grad is not None  # nothing is cleared until the next forward
        model(a).sum().backward()
        assert torch.equal(model.weight.grad, alone["a"])  # the previous step's gradient is gone
    finally:
        counterfactual.remove(handles)


def test_clip_gradients_at_the_median_of_the_first_norms():
    param = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=0.0)
    norms = [3.0, 1.0, 2.0, 5.0, 4.0]
    handles = counterfactual.install("exploding_gradients")
    try:
        for norm in norms:
            param.grad = torch.full((10,), norm / math.sqrt(10), dtype=torch.float64)
            opt.step()
        param.grad = torch.full((10,), 100.0, dtype=torch.float64)
        opt.step()
        assert abs(float(param.grad.norm()) - statistics.median(norms)) < 1e-6
        param.grad = torch.full((10,), 0.1, dtype=torch.float64)  # below the threshold: untouched
        opt.step()
        assert torch.equal(param.grad, torch.full((10,), 0.1, dtype=torch.float64))
    finally:
        counterfactual.remove(handles)


@pytest.mark.parametrize(
    "layer, shape, dims",
    [
        (nn.Linear(6, 2), (256, 6), (0,)),
        (nn.Conv2d(3, 2, 3), (16, 3, 8, 8), (0, 2, 3)),
        (nn.GRU(4, 3, batch_first=True), (16, 5, 4), (0, 1)),
    ],
)
def test_standardize_inputs_on_the_stats_batch(layer, shape, dims):
    torch.manual_seed(0)
    model = layer.double()
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # runs after the global hook
    x = torch.randn(shape, dtype=torch.float64) * 50 + 200
    handles = counterfactual.install("unnormalized_inputs")
    try:
        model(x)
    finally:
        counterfactual.remove(handles)
    inner = seen[0]
    assert inner.mean(dims).abs().max() < 1e-9
    assert (inner.std(dims, unbiased=False) - 1).abs().max() < 1e-9


def test_add_missing_params_on_the_first_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the second layer is missing
    before = model[1].weight.detach().clone()
    handles = counterfactual.install("params_not_updating")
    try:
        _step(model, opt, torch.randn(8, 3))
    finally:
        counterfactual.remove(handles)
    assert len(opt.param_groups) == 2
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model[1].parameters()}
    assert not torch.equal(model[1].weight, before)  # updated at that very step


# -- verdicts -----------------------------------------------------------------------------------------------
def test_judge_verdicts_and_lines():
    original, rerun = RunLoss(2.3, 2.29, steps=100), RunLoss(2.3, 2.29, steps=100)
    assert judge(original, rerun, RunLoss(2.3, 0.12, steps=100)) == ("confirmed", 0.0)
    assert (
        _detail("confirmed", "lr ×0.1", original, rerun, RunLoss(2.3, 0.12), 0.0)
        == "confirmed: with lr ×0.1 the loss fell 2.3 → 0.12 (original 2.3 → 2.29)"
    )
    assert judge(original, rerun, RunLoss(2.3, 2.2))[0] == "refuted"  # 4 % better: not markedly
    assert (
        judge(RunLoss(2.3, 1.0, nonfinite=True), RunLoss(2.3, 1.0, nonfinite=True), RunLoss(2.3, 1.5))[0] == "confirmed"
    )
    assert judge(original, rerun, RunLoss(2.3, None, nonfinite=True))[0] == "refuted"
    noisy = RunLoss(2.3, 1.2)  # the original's re-run ends 0.48 of the start away: too noisy to tell
    assert judge(original, noisy, RunLoss(2.3, 1.5))[0] == "inconclusive"
    # a fix that lowers the first loss (standardised inputs): judged in units of the lower start
    assert judge(RunLoss(282.0, 9.68), RunLoss(282.0, 9.68), RunLoss(0.697, 0.282))[0] == "confirmed"
    assert judge(RunLoss(282.0, 0.3), RunLoss(282.0, 0.3), RunLoss(0.697, 0.282))[0] == "refuted"
    partial = RunLoss(2.29, 2.88)  # far below the original's 19.8, yet the loss rose: not a fix
    assert judge(RunLoss(2.29, 19.8), RunLoss(2.29, 19.8), partial)[0] == "inconclusive"
    assert _detail("inconclusive", "lr ×0.1", RunLoss(2.29, 19.8), RunLoss(2.29, 19.8), partial, 0.0).endswith(
        "better than the original, but that run did not train either"
    )
    at_chance = RunLoss(404.0, 2.3, at_prior=True)  # from a huge first loss down to the label prior: not trained
    assert (
        judge(RunLoss(404.0, None, nonfinite=True), RunLoss(404.0, None, nonfinite=True), at_chance)[0]
        == "inconclusive"
    )
    failed = RunLoss(None, None, error="RuntimeError: boom")
    assert judge(original, rerun, failed)[0] == "inconclusive"
    assert (
        _detail("inconclusive", "lr ×0.1", original, rerun, failed, 0.0)
        == "inconclusive: the verification run failed: RuntimeError: boom"
    )


def test_printed_metric():
    assert printed_metric("epoch 1 acc 0.5\nepoch 2 acc 0.75\n") == 0.75
    assert printed_metric("val_accuracy: 93.5%") == 0.935
    assert printed_metric("loss 0.3") is None
    assert printed_metric("acc 0.5\nfinal_metric r2 -0.25\n") == -0.25


def test_no_automatic_check_runs_nothing(tmp_path):
    found = verify([diagnosis("labels_unlearnable"), diagnosis("healthy")], tmp_path / "absent.py", [], 10)
    assert found[0]["verification"]["verdict"] == "no automatic check"
    assert "verification" not in found[1]
    text = render_plain({"script": "t.py", "steps": 10, "stopped": "finished", "diagnoses": found[:1]})
    assert "verified: no automatic check" in text


# -- end to end ---------------------------------------------------------------------------------------------
def _doctor_verify(tmp_path, source: str, capfd) -> list[dict]:
    script = write(tmp_path, source)
    assert cli.main(["--json", "--no-store", "--verify", str(script)]) == 0
    return json.loads(capfd.readouterr().out)["diagnoses"]


def test_lr_too_high_is_confirmed(tmp_path, capfd):
    found = _doctor_verify(tmp_path, LR_TOO_HIGH, capfd)
    top = found[0]
    assert top["code"] == "lr_too_high"
    check = top["verification"]
    assert check["verdict"] == "confirmed" and check["fix"].startswith("lr ×0.")
    assert check["steps"] == 100 and check["seconds"] > 0
    assert check["loss_fixed"]["end"] < 0.5 * check["loss_fixed"]["start"]
    assert set(check) >= {
        "fix",
        "verdict",
        "loss_original",
        "loss_fixed",
        "metric_original",
        "metric_fixed",
        "steps",
        "seconds",
    }


def test_missing_zero_grad_is_confirmed(tmp_path, capfd):
    found = _doctor_verify(tmp_path, NO_ZERO_GRAD, capfd)
    check = next(d for d in found if d["code"] == "missing_zero_grad")["verification"]
    assert check["verdict"] == "confirmed", check["detail"]
    assert check["loss_fixed"]["end"] < check["loss_original"]["end"]
    assert found[0]["verification"]["verdict"] == "confirmed"  # confirmed ones come first


def test_a_forced_diagnosis_on_a_healthy_script_is_refuted(tmp_path):
    script = write(tmp_path, HEALTHY)
    original = watched_run(script, [], None)  # the diagnosing run, here in this process
    assert original.steps == 60
    found = verify([diagnosis("missing_zero_grad")], script, [], None, original=original)
    check = found[0]["verification"]
    assert check["verdict"] == "refuted", check["detail"]
    assert check["noise"] == 0.0 and check["loss_fixed"] == check["loss_original"]  # seeded: identical runs
    assert check["metric_original"] == check["metric_fixed"] == 0.935  # printed after the last step: it ran to its end
    assert check["detail"].endswith("no better than the original")


WRITER = """
import pathlib, torch
model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad(); model(torch.randn(4, 2)).pow(2).mean().backward(); opt.step()
with open("history.txt", "a") as f:
    f.write("new\\n")
assert open("history.txt").read() == "old\\nnew\\n"  # appended to the run's own copy
torch.save(model.state_dict(), "ckpt.pt")
pathlib.Path("logs/run.txt").write_text("changed")
pathlib.Path("fresh.txt").write_text("x")
try:
    open(ORIGINAL + "/history.txt", "w")
    print("final_metric refused 0")
except PermissionError:
    print("final_metric refused 1")
"""


def test_verification_runs_never_change_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "history.txt").write_text("old\n")
    (tmp_path / "ckpt.pt").write_bytes(b"original")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.txt").write_text("old")
    write(tmp_path, f"ORIGINAL = {str(tmp_path)!r}\n" + WRITER)
    found = run_child("train.py", [], None)
    assert found.error is None and found.steps == 3
    assert found.metric == 1  # a write reaching the real folder by its absolute path is refused
    assert (tmp_path / "history.txt").read_text() == "old\n" and (tmp_path / "ckpt.pt").read_bytes() == b"original"
    assert (tmp_path / "logs" / "run.txt").read_text() == "old" and not (tmp_path / "fresh.txt").exists()


def test_ctrl_c_marks_the_unfinished_verifications(monkeypatch):
    from stepaudit.doctor import verify as module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run_child", interrupted)
    found = verify(
        [diagnosis("lr_too_high"), diagnosis("labels_unlearnable")], "train.py", [], 10, original=RunLoss(2.3, 2.2)
    )
    assert found[0]["verification"]["detail"] == "inconclusive: cancelled (Ctrl-C) before this verification ran"
    assert found[1]["verification"]["verdict"] == "no automatic check"


# -- loss wiring, schedule collapse, re-initialisation: each hook against an oracle ----------------------------
def _original_functions() -> dict:
    import torch.nn.functional as F

    return {
        name: getattr(F, name)
        for name in (
            "softmax",
            "log_softmax",
            "cross_entropy",
            "nll_loss",
            "mse_loss",
            "binary_cross_entropy_with_logits",
        )
    } | {"torch.sigmoid": torch.sigmoid, "Tensor.softmax": torch.Tensor.softmax}


def test_rewired_loss_calls_give_the_logits_loss_exactly():
    import torch.nn.functional as F

    torch.manual_seed(0)
    before = _original_functions()
    z = torch.randn(32, 5, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    expected = F.cross_entropy(z, y)
    (expected_grad,) = torch.autograd.grad(expected, z)
    b = torch.rand(32)
    handles = counterfactual.install("loss_wiring")
    try:
        rewired = nn.CrossEntropyLoss()(nn.Softmax(dim=1)(z), y)  # softmax into CrossEntropyLoss: dropped
        (grad,) = torch.autograd.grad(rewired, z)
        on_batch_axis = F.nll_loss(torch.log_softmax(z, dim=0), y)  # over the batch: taken over the classes
        raw_scores = F.nll_loss(z, y)  # raw scores into NLL: given their log_softmax
        method = F.cross_entropy(z.softmax(-1), y)  # the tensor method's output too
        bce = F.binary_cross_entropy_with_logits(torch.sigmoid(z[:, :1]).squeeze(1), b)  # through a view
        pred = z[:, :1]  # (N, 1) against a target of shape (N,): the target is reshaped
        mse = F.mse_loss(pred, b)
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    assert torch.equal(rewired, expected) and torch.equal(grad, expected_grad)
    assert torch.equal(on_batch_axis, expected) and torch.equal(raw_scores, expected) and torch.equal(method, expected)
    assert torch.equal(bce, F.binary_cross_entropy_with_logits(z[:, 0], b))
    assert torch.equal(mse, F.mse_loss(z[:, 0], b))
    assert counts == {
        "softmax dropped before cross_entropy": 2,
        "softmax over the classes, not the batch": 1,  # at the log_softmax call itself
        "log_softmax over the classes into nll_loss": 1,  # the raw scores
        "sigmoid dropped before binary_cross_entropy_with_logits": 1,
        "target reshaped to the input's shape": 1,
    }
    assert _original_functions() == before  # every wrapper removed


def test_correct_loss_calls_are_left_alone():
    import torch.nn.functional as F

    torch.manual_seed(0)
    z, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    handles = counterfactual.install("loss_wiring")
    try:
        values = [F.cross_entropy(z, y), F.nll_loss(F.log_softmax(z, 1), y), F.mse_loss(z, z + 1)]
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    assert [float(v) for v in values] == [float(F.cross_entropy(z, y))] * 2 + [1.0]
    assert counts == {}


@pytest.mark.parametrize("floor", [1e-2, 1e-1])
def test_a_held_schedule_never_takes_the_lr_below_its_floor(floor):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    handles = counterfactual.install("lr_schedule_collapse", floor)
    try:
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        lrs = []
        for _ in range(20):
            opt.step()
            scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
    finally:
        counterfactual.remove(handles)
    last = max(k for k in range(20) if 0.5**k >= floor)  # the last halving that stays above the floor
    assert lrs == [0.5 ** min(t + 1, last) for t in range(20)]  # as written until then, held afterwards
    assert min(lrs) >= floor and scheduler.get_last_lr() == [lrs[-1]]
    scheduler.step()  # without the hook the schedule runs on
    assert opt.param_groups[0]["lr"] == lrs[-1] * 0.5


def test_reinitialisation_draws_the_schemes_std_from_a_private_generator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    nn.init.constant_(model[0].bias, -2.0)
    last = model[4].weight.detach().clone()
    handles = counterfactual.install("dead_relu")
    try:
        model(torch.randn(4, 512))
        model(torch.randn(4, 512))  # once only, at the first forward
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    he, xavier = math.sqrt(2 / 512), math.sqrt(2 / (256 + 256))
    assert abs(float(model[0].weight.detach().std()) / he - 1) < 0.03  # 131 072 draws: sampling error ≈ 0.2 %
    assert abs(float(model[2].weight.detach().std()) / xavier - 1) < 0.03
    assert not model[0].bias.any() and not model[2].bias.any()
    assert torch.equal(model[4].weight, last)  # the output layer feeds no activation: left alone
    generator = torch.Generator().manual_seed(counterfactual.counterfactual_init.SEED)
    drawn = torch.randn((256, 512), generator=generator, dtype=torch.float64) * he
    assert torch.equal(model[0].weight, drawn.float())  # exactly the documented draw
    assert counts == {"He": 1, "Xavier": 1}


def test_reinitialisation_leaves_the_global_random_stream_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    state = torch.get_rng_state()
    handles = counterfactual.install("saturated_activations")
    try:
        model(torch.zeros(1, 8))
    finally:
        counterfactual.remove(handles)
    assert torch.equal(torch.get_rng_state(), state)


# -- end to end: one faulty script per counterfactual, confirmed -----------------------------------------------
LOOP = """
for step in range({steps}):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = {loss}
    loss.backward()
    opt.step(){after}
"""
SOFTMAX_INTO_CE = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 20); y = x[:, :10].argmax(1)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10), nn.Softmax(dim=1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
""" + LOOP.format(steps=150, loss="loss_fn(model(x[idx]), y[idx])", after="")
BROADCAST = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2]
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
""" + LOOP.format(steps=150, loss="nn.functional.mse_loss(model(x[idx]), y[idx])", after="")
DEAD_RELU = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = (x[:, 0] + x[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
for layer in (model[0], model[2]):
    nn.init.constant_(layer.bias, -3.0)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
""" + LOOP.format(steps=150, loss="nn.functional.cross_entropy(model(x[idx]), y[idx])", after="")
SCHEDULE_PER_BATCH = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = x[:, :4].argmax(1)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1)
""" + LOOP.format(steps=200, loss="nn.functional.cross_entropy(model(x[idx]), y[idx])", after="\n    scheduler.step()")
TINY_TANH_INIT = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = (x[:, 0] + x[:, 1] > 0).long()
layers = []
for i in range(6):
    layers += [nn.Linear(10 if i == 0 else 64, 64), nn.Tanh()]
model = nn.Sequential(*layers, nn.Linear(64, 2))
for m in model:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.01)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
""" + LOOP.format(steps=150, loss="nn.functional.cross_entropy(model(x[idx]), y[idx])", after="")
CROSS_ENTROPY = "nn.functional.cross_entropy(model(x[idx]), y[idx])"
LR_TOO_LOW = (
    HEAD
    + "opt = torch.optim.SGD(model.parameters(), lr=0.003)\n"
    + LOOP.format(steps=100, loss=CROSS_ENTROPY, after="")
)
EXPLODING = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = 100 * (x[:, :1] - x[:, 1:2])  # targets in the hundreds: huge first gradients
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
""" + LOOP.format(steps=80, loss="nn.functional.mse_loss(model(x[idx]), y[idx])", after="")
OFFSET_INPUTS = (
    HEAD
    + "x = x + 20  # every feature 20 standard deviations away from 0\n"
    + "opt = torch.optim.Adam(model.parameters(), lr=0.003)\n"
    + LOOP.format(steps=80, loss=CROSS_ENTROPY, after="")
)
OTHER_MODELS_PARAMS = (
    HEAD
    + "opt = torch.optim.Adam(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2)).parameters(), lr=0.01)\n"
    + LOOP.format(steps=100, loss=CROSS_ENTROPY, after="")
)


@pytest.mark.parametrize(
    "source, code, fix",
    [
        (SOFTMAX_INTO_CE, "loss_wiring", "the loss call rewired (softmax dropped before cross_entropy ×150)"),
        (BROADCAST, "loss_wiring", "the loss call rewired (target reshaped to the input's shape ×150)"),
        (SCHEDULE_PER_BATCH, "lr_too_low", "scheduler steps ignored once the lr fell below 0.1 × its peak"),
        (DEAD_RELU, "dead_relu", "layers re-initialised (He ×2)"),
        (TINY_TANH_INIT, "vanishing_gradients", "layers re-initialised (Xavier ×6)"),
        (LR_TOO_LOW, "lr_too_low", "lr ×10"),
        (EXPLODING, "exploding_gradients", "gradient norm clipped at the early median"),
        (OFFSET_INPUTS, "unnormalized_inputs", "first layer's input standardised"),
        (OTHER_MODELS_PARAMS, "params_not_updating", "missing parameters added to the optimizer"),
    ],
    ids=[
        "softmax_into_cross_entropy",
        "broadcast_shapes",
        "schedule_collapse",
        "dead_relu",
        "vanishing_gradients",
        "lr_too_low",
        "exploding_gradients",
        "unnormalized_inputs",
        "params_not_updating",
    ],
)
def test_each_counterfactual_is_confirmed_on_its_fault(tmp_path, capfd, source, code, fix):
    found = _doctor_verify(tmp_path, source, capfd)
    check = next(d for d in found if d["code"] == code)["verification"]
    assert check["verdict"] == "confirmed", check["detail"]
    assert check["fix"].startswith(fix)
    assert check["loss_fixed"]["end"] < check["loss_original"]["end"]
    if code == "loss_wiring":  # judged against the original measured with the rewired loss
        assert (
            check["original_measured_with"] == "the rewired loss"
            and "measured with the rewired loss" in check["detail"]
        )
    assert "losses_fixed" not in check and "losses_original" not in check  # the curves go to the run store only


@pytest.mark.parametrize("code", ["loss_wiring", "dead_relu"])
def test_a_new_counterfactual_forced_on_a_healthy_script_is_not_confirmed(tmp_path, code):
    script = write(tmp_path, HEALTHY)
    original = watched_run(script, [], None)
    check = verify([diagnosis(code)], script, [], None, original=original)[0]["verification"]
    assert check["verdict"] in ("refuted", "inconclusive"), check["detail"]
    if code == "loss_wiring":  # nothing miswired: the hooks change nothing, and say so
        assert check["verdict"] == "inconclusive"
        assert "the hooks found nothing to change in this run" in check["detail"]


def test_the_verified_run_stores_both_loss_curves(tmp_path, capfd):
    from stepaudit.report.data import load_run
    from stepaudit.report.sections import verification_figure

    script = write(tmp_path, DEAD_RELU)
    assert cli.main(["--json", "--run", str(tmp_path / "run"), "--verify", str(script)]) == 0
    out = json.loads(capfd.readouterr().out)
    run = load_run(out["run"], diagnose=False)
    stored = run.meta["verification_losses"]
    assert [s for s, _ in stored["original"]] == list(range(150))
    fix = next(f for f in stored["fixes"] if f["code"] == "dead_relu")
    assert fix["verdict"] == "confirmed" and len(fix["losses"]) == 150
    assert fix["losses"][-1][1] < stored["original"][-1][1]
    assert verification_figure(run) is not None


def test_observe_only_wiring_returns_the_scripts_loss_and_measures_the_rewired_one():
    import torch.nn.functional as F

    from stepaudit.doctor import counterfactual_wiring

    torch.manual_seed(0)
    z = torch.randn(32, 5, requires_grad=True)
    y = torch.randint(0, 5, (32,))
    handles = counterfactual.install("loss_wiring", 0.0)
    try:
        own = F.nll_loss(z, y)  # raw scores into NLL: kept as written, measured as cross_entropy
        with torch.no_grad():
            F.nll_loss(z, y)  # an evaluation call: not measured
        measured = list(counterfactual_wiring.SHADOW)
    finally:
        counterfactual.remove(handles)
    assert torch.allclose(own, -z.gather(1, y[:, None]).mean())
    assert measured == [float(F.cross_entropy(z.detach(), y).double())]

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
LR_TOO_HIGH = HEAD + """
opt = torch.optim.SGD(model.parameters(), lr=8.0, momentum=0.9)
for step in range(100):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
"""
NO_ZERO_GRAD = HEAD + """
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for step in range(120):
    idx = torch.randint(0, 512, (64,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
"""
HEALTHY = HEAD + """
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for step in range(60):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
print(f"val_acc: {93.5}%")
"""


def write(tmp_path, source: str, name: str = "train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def diagnosis(code: str) -> dict:
    return {"code": code, "severity": "error", "confidence": 0.9, "first_step": 0, "evidence": "forced", "fix": "forced"}


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
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


@pytest.mark.parametrize("layer, shape, dims", [(nn.Linear(6, 2), (256, 6), (0,)),
                                                (nn.Conv2d(3, 2, 3), (16, 3, 8, 8), (0, 2, 3)),
                                                (nn.GRU(4, 3, batch_first=True), (16, 5, 4), (0, 1))])
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
    assert _detail("confirmed", "lr ×0.1", original, rerun, RunLoss(2.3, 0.12), 0.0) == \
        "confirmed: with lr ×0.1 the loss fell 2.3 → 0.12 (original 2.3 → 2.29)"
    assert judge(original, rerun, RunLoss(2.3, 2.2))[0] == "refuted"  # 4 % better: not markedly
    assert judge(RunLoss(2.3, 1.0, nonfinite=True), RunLoss(2.3, 1.0, nonfinite=True), RunLoss(2.3, 1.5))[0] == "confirmed"
    assert judge(original, rerun, RunLoss(2.3, None, nonfinite=True))[0] == "refuted"
    noisy = RunLoss(2.3, 1.2)  # the original's re-run ends 0.48 of the start away: too noisy to tell
    assert judge(original, noisy, RunLoss(2.3, 1.5))[0] == "inconclusive"
    # a fix that lowers the first loss (standardised inputs): judged in units of the lower start
    assert judge(RunLoss(282.0, 9.68), RunLoss(282.0, 9.68), RunLoss(0.697, 0.282))[0] == "confirmed"
    assert judge(RunLoss(282.0, 0.3), RunLoss(282.0, 0.3), RunLoss(0.697, 0.282))[0] == "refuted"
    partial = RunLoss(2.29, 2.88)  # far below the original's 19.8, yet the loss rose: not a fix
    assert judge(RunLoss(2.29, 19.8), RunLoss(2.29, 19.8), partial)[0] == "inconclusive"
    assert _detail("inconclusive", "lr ×0.1", RunLoss(2.29, 19.8), RunLoss(2.29, 19.8), partial, 0.0).endswith(
        "better than the original, but that run did not train either")
    at_chance = RunLoss(404.0, 2.3, at_prior=True)  # from a huge first loss down to the label prior: not trained
    assert judge(RunLoss(404.0, None, nonfinite=True), RunLoss(404.0, None, nonfinite=True), at_chance)[0] == \
        "inconclusive"
    failed = RunLoss(None, None, error="RuntimeError: boom")
    assert judge(original, rerun, failed)[0] == "inconclusive"
    assert _detail("inconclusive", "lr ×0.1", original, rerun, failed, 0.0) == \
        "inconclusive: the verification run failed: RuntimeError: boom"


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
    assert set(check) >= {"fix", "verdict", "loss_original", "loss_fixed", "metric_original", "metric_fixed",
                          "steps", "seconds"}


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
    found = verify([diagnosis("lr_too_high"), diagnosis("dead_relu")], "train.py", [], 10, original=RunLoss(2.3, 2.2))
    assert found[0]["verification"]["detail"] == "inconclusive: cancelled (Ctrl-C) before this verification ran"
    assert found[1]["verification"]["verdict"] == "no automatic check"

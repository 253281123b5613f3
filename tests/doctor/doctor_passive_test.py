"""Passive capture: measured against the script's own bookkeeping, never changing what the script does."""

from __future__ import annotations

import contextlib
import io
import json
import math
import runpy
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

from stepaudit.doctor.passive import PassiveWatcher, sampled
from stepaudit.doctor.runner import run_script

TRAIN = """
import json, sys, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
log, previous = [], None
for step in range(int(sys.argv[2])):
    idx = torch.randint(0, 64, (32,))  # the global RNG: any change to it would change the run
    opt.zero_grad()
    loss = nn.functional.cross_entropy(nn.functional.dropout(model(x[idx]), 0.1), y[idx])
    loss.backward()
    params = list(model.parameters())
    before = [p.detach().clone().double() for p in params]
    grads = [p.grad.detach().clone().double() for p in params]
    opt.step()
    dw = [p.detach().double() - b for p, b in zip(params, before)]
    norm = lambda ts: sum(float((t * t).sum()) for t in ts) ** 0.5
    dot = lambda xs, ys: sum(float((a * b).sum()) for a, b in zip(xs, ys))
    cos = dot(grads, previous) / (norm(grads) * norm(previous)) if previous else None
    log.append({"loss": loss.item(), "grad": norm(grads), "update": norm(dw), "weight": norm(before),
                "first_order": dot(grads, dw), "cos": cos})
    previous = grads
    print(f"step {step} loss {loss.item():.6f}")
json.dump(log, open(sys.argv[1], "w"))
torch.save(model.state_dict(), sys.argv[1] + ".pt")
"""


def write(tmp_path, source: str, name: str = "train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def global_state():
    """Everything a session installs: hook dictionaries and patched functions."""
    return (
        dict(optim_module._global_optimizer_pre_hooks),
        dict(optim_module._global_optimizer_post_hooks),
        dict(nn_module._global_forward_hooks),
        dict(nn_module._global_forward_pre_hooks),
        torch.autograd.backward,
        torch.relu,
        torch.relu_,
        torch.sigmoid,
        torch.tanh,
        F.cross_entropy,
        F.nll_loss,
        F.mse_loss,
        F.binary_cross_entropy_with_logits,
    )


def watch(path, args=(), **kwargs):
    watcher = PassiveWatcher(**{"max_steps": 300, **kwargs})
    outcome = run_script(path, list(args), watcher)
    return watcher, outcome


def test_records_match_the_scripts_own_bookkeeping(tmp_path):
    path = write(tmp_path, TRAIN)
    log_file = tmp_path / "log.json"
    watcher, outcome = watch(path, [str(log_file), "30"], sample_every=10)
    assert outcome.stopped == "finished" and watcher.step_count == 30
    log = json.loads(log_file.read_text())
    by_step = {r["step"]: r for r in watcher.records}
    assert [r["loss_before"] for r in watcher.records] == pytest.approx([e["loss"] for e in log], rel=1e-6)
    measured = [s for s in range(30) if sampled(s, 10)]
    assert measured == [0, 1, 2, 3, 4, 10, 11, 20, 21]
    for step in measured:
        record, truth = by_step[step], log[step]
        for field, key in (
            ("grad_norm", "grad"),
            ("update_norm", "update"),
            ("weight_norm", "weight"),
            ("first_order", "first_order"),
        ):
            assert record[field] == pytest.approx(truth[key], rel=1e-5), (step, field)
        assert record["update_ratio"] == pytest.approx(truth["update"] / truth["weight"], rel=1e-5)
    assert "grad_cos_prev" in by_step[11] and "grad_cos_prev" not in by_step[10]
    for step in (1, 2, 3, 4, 11, 21):  # consecutive sampled steps
        assert by_step[step]["grad_cos_prev"] == pytest.approx(log[step]["cos"], rel=1e-5, abs=1e-6), step
    assert not any("grad_norm" in by_step[s] for s in range(30) if s not in measured)


NESTED = TRAIN.replace(
    "opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)",
    """torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # SGD.step is hooked: the subclass's super().step() nests
class LoggedSGD(torch.optim.SGD):
    def step(self, closure=None):
        return super().step(closure)
opt = LoggedSGD(model.parameters(), lr=0.1, momentum=0.9)""",
)


def test_a_step_calling_super_step_is_one_step(tmp_path):
    """A subclass's step() calling super().step() runs the global hooks twice, nested: one step, measured whole."""
    path = write(tmp_path, NESTED)
    log_file = tmp_path / "log.json"
    watcher, outcome = watch(path, [str(log_file), "12"], sample_every=10)
    assert outcome.stopped == "finished" and watcher.step_count == 12 and len(watcher.records) == 12
    log = json.loads(log_file.read_text())
    assert [r["loss_before"] for r in watcher.records] == pytest.approx([e["loss"] for e in log], rel=1e-6)
    for record in watcher.records:
        if "first_order" in record:
            assert record["first_order"] == pytest.approx(log[record["step"]]["first_order"], rel=1e-5)


def test_no_copy_of_the_model_is_held_between_sparse_sampled_steps(tmp_path, monkeypatch):
    """As Audit's sparse auditing: the flat buffers go after a sampled step whose next step is not sampled."""
    from stepaudit.flat import FlatBuffers

    released, release = [], FlatBuffers.release

    def spy(self):
        released.append(watcher_box[0].step_count)
        release(self)

    watcher_box = [PassiveWatcher(max_steps=300, sample_every=10)]
    monkeypatch.setattr(FlatBuffers, "release", spy)
    outcome = run_script(write(tmp_path, TRAIN), [str(tmp_path / "log.json"), "30"], watcher_box[0])
    assert outcome.stopped == "finished"
    assert released == [5, 12, 22]  # after steps 4, 11 and 21, whose next steps are not sampled
    state = watcher_box[0].optimizers[0]
    assert state.flat.before is None and state.flat.grad is None and state.prev_grad is None


def test_an_optimizer_that_stops_stepping_holds_no_copy_once_another_starts(tmp_path):
    """Trials or folds (a fresh model and optimizer each): when a new optimizer first steps, the earlier
    ones' buffers and gradient copies go, so the watcher holds at most the newest one's; a NumPy lr is read."""
    source = """
        import numpy as np, torch
        torch.manual_seed(0)
        for trial in range(4):
            model = torch.nn.Linear(5, 2)
            opt = torch.optim.SGD(model.parameters(), lr=np.float32(0.1))
            for step in range(3):  # all sampled: buffers and the previous gradient are held in between
                opt.zero_grad(); model(torch.ones(4, 5)).pow(2).mean().backward(); opt.step()
    """
    watcher, outcome = watch(write(tmp_path, source), [])
    assert outcome.stopped == "finished" and len(watcher.optimizers) == 4
    for state in watcher.optimizers[:3]:
        assert state.flat.before is None and state.flat.grad is None and state.prev_grad is None
    assert watcher.optimizers[3].flat.before is not None  # the newest keeps them (its next step may come)
    assert all(r["lr"] == pytest.approx(0.1) for r in watcher.records)


def test_parameters_on_several_devices_are_recorded_never_raised(tmp_path):
    """FlatBuffers audits one device: a model it refuses gets ``capture_error`` records, and trains unchanged."""
    source = """
        import sys, torch
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        spare = torch.nn.Parameter(torch.zeros(2, device="meta"))  # never used: its .grad stays None
        opt = torch.optim.SGD([*model.parameters(), spare], lr=0.1)
        for step in range(6):
            opt.zero_grad(); model(torch.ones(4, 3)).pow(2).mean().backward(); opt.step()
        torch.save(model.state_dict(), sys.argv[1])
    """
    path = write(tmp_path, source)
    saved = sys.argv[:]
    sys.argv = [str(path), str(tmp_path / "plain.pt")]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    watcher, outcome = watch(path, [str(tmp_path / "watched.pt")])
    assert outcome.stopped == "finished" and watcher.step_count == 6
    assert all("one device" in r["capture_error"] for r in watcher.records[:5])  # the sampled steps
    assert not any("measured" in r for r in watcher.records) and "capture_error" not in watcher.records[5]
    assert all(math.isfinite(r["loss_before"]) for r in watcher.records)
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "watched.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_behaviour_and_output_are_unchanged(tmp_path, capsys):
    path = write(tmp_path, TRAIN)
    plain_log, watched_log = tmp_path / "plain.json", tmp_path / "watched.json"
    saved = sys.argv[:]
    sys.argv = [str(path), str(plain_log), "25"]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved
    plain_out, plain_rng = capsys.readouterr().out, torch.get_rng_state()
    before = global_state()
    watcher, outcome = watch(path, [str(watched_log), "25"], sample_every=2)  # every step sampled
    watched_out = capsys.readouterr().out
    assert outcome.stopped == "finished"
    assert watched_out == plain_out and plain_out.count("\n") == 25
    assert torch.equal(torch.get_rng_state(), plain_rng)
    a, b = torch.load(str(plain_log) + ".pt"), torch.load(str(watched_log) + ".pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain_log.read_text() == watched_log.read_text()
    assert global_state() == before and sys.argv == saved


def test_script_exception_is_reported_and_what_ran_is_kept(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(10):
            opt.zero_grad()
            model(torch.ones(4, 3)).pow(2).mean().backward()
            opt.step()
            if step == 2:
                raise ValueError("boom at step 2")
    """,
    )
    before = global_state()
    watcher, outcome = watch(path)
    assert outcome.stopped == "error"
    assert "ValueError: boom at step 2" in outcome.error and "train.py" in outcome.error
    assert "runpy" not in outcome.error  # the traceback starts at the script's own frame
    assert watcher.step_count == 3 and len(watcher.records) == 3
    assert global_state() == before


def test_stops_at_max_steps_even_through_except_exception(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        steps = 0
        while True:
            try:
                opt.zero_grad()
                model(torch.ones(4, 3)).pow(2).mean().backward()
                opt.step()
                steps += 1
            except Exception:
                pass
        print("unreachable")
    """,
    )
    before = global_state()
    watcher, outcome = watch(path, max_steps=7)
    assert outcome.stopped == "max_steps" and watcher.step_count == 7 and len(watcher.records) == 7
    assert global_state() == before


def test_time_limit_in_and_outside_the_hooks(tmp_path):
    training = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        while True:
            opt.zero_grad(); model(torch.ones(4, 3)).sum().backward(); opt.step()
    """,
        "forever.py",
    )
    start = time.monotonic()
    watcher, outcome = watch(training, max_steps=None, time_limit=0.3)
    assert outcome.stopped == "time_limit" and watcher.step_count > 0
    assert time.monotonic() - start < 2
    idle = write(tmp_path, "import time\nwhile True:\n    time.sleep(0.01)\n", "idle.py")
    start = time.monotonic()
    watcher, outcome = watch(idle, time_limit=0.1)  # no hook ever runs: the alarm backstop stops it
    assert outcome.stopped == "time_limit" and time.monotonic() - start < 5


ZERO_GRAD = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
for step in range(30):
    {body}
"""


@pytest.mark.parametrize(
    "body, kept",
    [
        ("opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()", 0.0),
        ("torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()", 1.0),
        # accumulation over two micro-batches, cleared after each step
        (
            "[torch.nn.functional.cross_entropy(model(x[i::2]), y[i::2]).div(2).backward() for i in (0, 1)]; "
            "opt.step(); opt.zero_grad()",
            0.0,
        ),
        # .grad set to None by hand
        (
            "torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()\n"
            "    for p in model.parameters(): p.grad = None",
            0.0,
        ),
    ],
)
def test_zero_grad_checks(tmp_path, body, kept):
    watcher, outcome = watch(write(tmp_path, ZERO_GRAD.format(body=body)), sample_every=10)
    assert outcome.stopped == "finished", outcome.error
    checks = watcher.zero_checks
    assert len(checks) >= 5 and {c["kept"] for c in checks} == {kept}


def test_two_models_two_optimizers_are_not_missing_zero_grad(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        from torch import nn
        torch.manual_seed(0)
        G, D = nn.Linear(2, 2), nn.Linear(2, 1)
        og, od = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
        bce = nn.BCEWithLogitsLoss()
        for step in range(25):
            z, real = torch.randn(16, 2), torch.randn(16, 2) + 2
            od.zero_grad()
            (bce(D(real), torch.ones(16, 1)) + bce(D(G(z).detach()), torch.zeros(16, 1))).backward()
            od.step()
            og.zero_grad()
            bce(D(G(z)), torch.ones(16, 1)).backward()  # also fills D's .grad; od.zero_grad() clears it next time
            og.step()
    """,
    )
    watcher, outcome = watch(path, sample_every=4)
    assert outcome.stopped == "finished"
    assert len(watcher.optimizers) == 2 and watcher.step_count == 50
    assert {r["optimizer"] for r in watcher.records} == {0, 1}
    assert watcher.zero_checks and all(c["kept"] == 0.0 for c in watcher.zero_checks)
    assert watcher.observations()["orphan_params"] == []


@pytest.mark.parametrize(
    "loss, kind",
    [
        ("nn.functional.cross_entropy(model(x).softmax(1), y)", "probabilities_into_cross_entropy"),
        ("nn.CrossEntropyLoss()(nn.Softmax(dim=1)(model(x)), y)", "probabilities_into_cross_entropy"),
        ("nn.functional.cross_entropy(model(x).log_softmax(1), y)", "log_probabilities_into_cross_entropy"),
        ("nn.NLLLoss()(model(x), y)", "scores_into_nll_loss"),
        ("nn.functional.mse_loss(model(x)[:, :1], y.float())", "broadcast_shapes"),
        ("nn.functional.cross_entropy(model(x), y)", None),
        ("nn.functional.nll_loss(model(x).log_softmax(1), y)", None),
    ],
)
def test_loss_wiring_is_seen_in_what_the_loss_receives(tmp_path, loss, kind):
    path = write(
        tmp_path,
        f"""
        import torch, warnings
        from torch import nn
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        for step in range(12):
            opt.zero_grad(); ({loss}).backward(); opt.step()
    """,
    )
    watcher, outcome = watch(path, sample_every=5)
    assert outcome.stopped == "finished", outcome.error
    found = [f["kind"] for f in watcher.loss_findings()]
    assert found == ([kind] if kind else [])


def test_dead_units_orphans_and_first_layer_input(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
        with torch.no_grad():
            model[0].bias[:5] = -1e4   # units 0-4 of the first hidden layer can never fire: 5 of 10
        opt = torch.optim.SGD(list(model[0].parameters()) + list(model[2].parameters()), lr=1e-3)
        x, y = 50 * torch.randn(64, 4) + 100, torch.randint(0, 2, (64,))
        for step in range(6):
            opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    """,
    )
    watcher, outcome = watch(path)
    assert outcome.stopped == "finished"
    first = watcher.records[0]
    assert first["dead_relu_max"] >= 0.5  # the first ReLU: ≥ 5 of 10 units dead by construction
    assert first["dead_relu_layers"] == 2
    # x = 50·N(0,1) + 100 per feature: RMS = √(100² + 50²)
    assert first["input_rms"] == pytest.approx(math.hypot(100, 50), rel=0.1)
    assert first["input_layer"] == "Linear"
    obs = watcher.observations()
    assert sorted(o["name"] for o in obs["orphan_params"]) == ["4.bias", "4.weight"]
    assert obs["label_counts"] and sum(obs["label_counts"].values()) == 64 * 5  # steps 0-4 inspected
    assert obs["initial_loss"]["classes"] == 2


def test_closure_optimizer_and_no_step_scripts(tmp_path):
    path = write(
        tmp_path,
        """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        for step in range(5):
            opt.step(closure)
    """,
    )
    watcher, outcome = watch(path)
    assert outcome.stopped == "finished" and watcher.step_count == 5
    assert all(math.isfinite(r["loss_before"]) and r["grad_norm"] > 0 for r in watcher.records)
    assert watcher.records[1]["loss_before"] < watcher.records[0]["loss_before"]
    no_step = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(3, 1)
        for step in range(1000):
            model(torch.ones(2, 3)).sum().backward()
    """,
        "no_step.py",
    )
    watcher, outcome = watch(no_step, max_steps=20)
    assert outcome.stopped == "max_steps" and watcher.step_count == 0 and watcher.backward_count == 21


def test_one_session_at_a_time():
    first = PassiveWatcher().install()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            PassiveWatcher().install()
    finally:
        first.close()
    with contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(ValueError, match="sample_every"):
            PassiveWatcher(sample_every=1)


def test_learning_rate_schedules_and_zero_lr(tmp_path):
    source = """
        import torch
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr={lr})
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)  # ends at lr 0
        for step in range(20):
            opt.zero_grad(); model(torch.ones(4, 3)).pow(2).mean().backward(); opt.step(); sched.step()
    """
    watcher, _ = watch(write(tmp_path, source.format(lr=0.1)), sample_every=5)
    described = watcher.observations()["optimizers"][0]
    assert described["param_groups"][0]["lr"] == 0.0  # where the schedule ended
    assert described["max_lr"] == [0.1]  # the largest lr the group had at a sampled step (step 0)
    from stepaudit.doctor import diagnose

    assert "params_not_updating" not in [
        d["code"] for d in diagnose(watcher.records, meta={"observations": watcher.observations()})
    ]
    watcher, _ = watch(write(tmp_path, source.format(lr=0.0), "zero.py"), sample_every=5)
    found = diagnose(watcher.records, meta={"observations": watcher.observations()})
    assert found[0]["code"] == "params_not_updating"


def test_a_failing_watcher_never_breaks_the_script(tmp_path, monkeypatch):
    """Auditing never breaks training: an error inside the hooks is counted, the script runs on unchanged."""
    path = write(tmp_path, TRAIN)

    def broken(self, *args, **kwargs):
        raise RuntimeError("watcher bug")

    for name in ("_measure", "on_activation", "on_loss", "_zero_check", "_forward_pre"):
        monkeypatch.setattr(PassiveWatcher, name, broken)
    watcher, outcome = watch(path, [str(tmp_path / "log.json"), "12"])
    assert outcome.stopped == "finished" and watcher.step_count == 12
    assert watcher.capture_errors > 0 or any("capture_error" in r for r in watcher.records)
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["loss_before"] for r in watcher.records] == pytest.approx([e["loss"] for e in log], rel=1e-6)


def test_gradscaler_losses_are_unscaled(tmp_path):
    path = write(
        tmp_path,
        """
        import json, sys, torch
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        losses = []
        for step in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        json.dump(losses, open(sys.argv[1], "w"))
    """,
    )
    watcher, outcome = watch(path, [str(tmp_path / "losses.json")])
    assert outcome.stopped == "finished", outcome.error
    truth = json.loads((tmp_path / "losses.json").read_text())
    assert [r["loss_before"] for r in watcher.records] == pytest.approx(truth, rel=1e-6)
    assert torch.amp.GradScaler.scale.__name__ == "scale" and not hasattr(torch.amp.GradScaler.scale, "__wrapped__")


SCRIPTED = """
import torch
import torch.nn.functional as F


@torch.jit.script
def swish(x):
    return x.mul(torch.sigmoid(x))


@torch.jit.script
def scripted_loss(x, y):
    return F.mse_loss(x, y) + F.relu(x).sum() + torch.tanh(x).sum()


x = torch.linspace(-1, 1, 8)
print("swish", float(swish(x).sum()))
print("loss", float(scripted_loss(x, torch.zeros(8))))
"""


def test_torchscript_still_compiles_the_functions_the_doctor_wraps(tmp_path, capsys):
    # fastai compiles `x.mul(torch.sigmoid(x))` with torch.jit.script at import: under the doctor the
    # wrapped torch.sigmoid must still be TorchScript's builtin, and F.mse_loss still compile from source.
    script = tmp_path / "scripted.py"
    script.write_text(SCRIPTED)
    x = torch.linspace(-1, 1, 8)
    expected_swish = float((x * torch.sigmoid(x)).sum())
    expected_loss = float(F.mse_loss(x, torch.zeros(8)) + F.relu(x).sum() + torch.tanh(x).sum())
    watcher = PassiveWatcher(max_steps=None)
    outcome = run_script(script, [], watcher)
    assert outcome.error is None, outcome.error
    out = capsys.readouterr().out
    assert f"swish {expected_swish}" in out and f"loss {expected_loss}" in out
    # the wrappers are TorchScript builtins only while the session runs
    from torch.jit import _builtins

    assert _builtins._find_builtin(torch.sigmoid) == "aten::sigmoid"
    assert torch.sigmoid is torch._C._VariableFunctions.sigmoid
    assert F.mse_loss.__module__ == "torch.nn.functional" and not hasattr(F.mse_loss, "__wrapped__")


def test_leaves_created_in_forward_are_not_kept_alive(tmp_path):
    # The graph walk finds tensors created inside forward (they get a gradient no optimizer applies); it
    # must describe them without holding them: each is freed with its step's graph, as without the doctor.
    path = write(
        tmp_path,
        """
        import json, sys, weakref, torch
        from torch import nn
        torch.manual_seed(0)
        refs = []

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = nn.Linear(8, 24)

            def forward(self, x):
                scale = torch.ones(24, requires_grad=True)  # a leaf created in forward, trained by nobody
                refs.append(weakref.ref(scale))
                return self.inp(x) * scale

        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(32, 8)
        alive = []
        for step in range(6):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            del loss
            alive.append(refs[-1]() is not None)
        json.dump(alive, open(sys.argv[1], "w"))
    """,
    )
    out = tmp_path / "alive.json"
    watcher, outcome = watch(path, [str(out)])
    assert outcome.stopped == "finished" and watcher.step_count == 6
    assert json.loads(out.read_text()) == [False] * 6  # dead after every step, the walked ones included
    orphans = watcher.observations()["orphan_params"]
    assert [o["numel"] for o in orphans] == [24]  # still found, described and counted once
    assert "created during the forward pass" in orphans[0]["name"] and "[24]" in orphans[0]["name"]


@pytest.mark.parametrize(
    "holder",
    [
        "sched = {make}",
        "class Trainer: pass\ntrainer = Trainer()\ntrainer.sched = {make}",
        "keep = [{make}]\nsched = None",
        "def make():\n    s = {make}\n    return lambda: s.step()\nstep_sched = make()",
    ],
)
def test_schedulers_are_found_wherever_the_script_keeps_them(tmp_path, holder):
    # In the frames (a global, an object's attribute), else among the optimizer's referrers (a list, a closure).
    make = "torch.optim.lr_scheduler.StepLR(opt, 2)"
    step = (
        "step_sched()"
        if "step_sched" in holder
        else (
            "trainer.sched.step()"
            if "trainer" in holder
            else ("keep[0].step()" if "keep" in holder else "sched.step()")
        )
    )
    source = (
        "import torch\nmodel = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        + holder.format(make=make)
        + "\nfor i in range(6):\n"
        + f"    opt.zero_grad(); model(torch.ones(4, 3)).pow(2).mean().backward(); opt.step(); {step}\n"
    )
    watcher, outcome = watch(write(tmp_path, source))
    assert outcome.stopped == "finished"
    assert watcher.schedulers == {"StepLR": 5}  # read at each optimizer step: the last sched.step() comes after

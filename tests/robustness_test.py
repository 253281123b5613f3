"""Auditing never breaks training: faults are recorded, training goes on; bad arguments say the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import classification_loss, make_mlp
from torch import nn

import stepaudit


def test_nan_loss_is_recorded_and_training_continues(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = tiny_batch
    bad = (x * float("nan"), y)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "r") as audit:
        audit.step(bad)
        audit.step(tiny_batch)
    assert audit.records[0]["verdict"] == "nonfinite"
    assert audit.records[1]["step"] == 1  # training went on


def test_failing_reevaluation_is_an_error_record_not_a_crash(tiny_batch, tmp_path):
    calls = {"training": 0}

    def flaky(model, batch):
        if torch.is_grad_enabled():
            calls["training"] += 1
        elif calls["training"] == 1:  # the audit's re-evaluations during step 0
            raise RuntimeError("out of memory (simulated)")
        return classification_loss(model, batch)

    model = make_mlp()
    reference = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, flaky, run=tmp_path / "r") as audit:
        audit.step(tiny_batch)
        audit.step(tiny_batch)
    assert audit.records[0]["verdict"] == "error" and "out of memory" in audit.records[0]["error"]
    assert audit.records[1]["verdict"] in ("decrease", "increase", "flat")
    for _ in range(2):  # the same two steps without stepaudit
        ref_opt.zero_grad()
        classification_loss(reference, tiny_batch).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    stored = stepaudit.load(tmp_path / "r")
    assert list(stored["verdict"]) == ["error", audit.records[1]["verdict"]]


def test_strict_mode_raises(tiny_batch, tmp_path):
    def flaky(model, batch):
        if not torch.is_grad_enabled():  # every re-evaluation fails
            raise RuntimeError("boom")
        return classification_loss(model, batch)

    model = make_mlp()
    audit = stepaudit.Audit(model, torch.optim.SGD(model.parameters(), lr=0.1), flaky, run=tmp_path / "r", strict=True)
    with pytest.raises(stepaudit.AuditError, match="boom"):
        audit.step(tiny_batch)
    audit.close()


def test_parameters_without_grad_are_zero_gradient(tmp_path):
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, opt, lambda m, b: m["used"](b).pow(2).mean(), run=tmp_path / "r") as audit:
        audit.step(torch.randn(8, 3))
    rows = {r["name"]: r for r in audit.last["layers"] if r["kind"] == "module"}
    assert rows["unused"]["grad_norm"] == 0 and rows["unused"]["update_norm"] == 0
    assert audit.last["verdict"] in ("decrease", "flat")


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda m: dict(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), loss_fn="not callable"),
            "callable",
        ),
        (
            lambda m: dict(
                model=m, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), loss_fn=classification_loss
            ),
            "not in the model",
        ),
        (
            lambda m: dict(
                model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=classification_loss, every=0
            ),
            "every must be",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probes={"no_such_probe": 1},
            ),
            "known probes",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                precision="float16",
            ),
            "precision",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probe_options={"sharpnes": {}},
            ),
            r"unknown probe\(s\) sharpnes; known: .*curvature",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probes={"next_delta": 2},
            ),
            "every step",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                reference=(b for b in []),
            ),
            "one-shot",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probe_options={"curvature": {"max_hvps": 0}},
            ),
            "max_hvps",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probes=["sharpness"],
            ),
            r"probes must be a dict \{name: every\}.*probes=\{'sharpness': 1\}",
        ),
        (
            lambda m: dict(
                model=m,
                optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                loss_fn=classification_loss,
                probes="sharpness",
            ),
            r"probes=\{'sharpness': 1\}; got str",
        ),
        (
            lambda m: dict(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=lambda batch: batch),
            r"loss_fn\(model, batch\).*<lambda>\(batch\)",
        ),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(build, match, tmp_path):
    with pytest.raises((TypeError, ValueError), match=match):
        stepaudit.Audit(run=tmp_path / "r", **build(make_mlp()))


def test_probes_as_name_every_pairs_still_work(tmp_path):
    model = make_mlp()
    audit = stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        classification_loss,
        run=tmp_path / "r",
        probes=[("quadratic", 2)],
    )
    assert audit.probes == {"quadratic": 2}
    audit.close()


def test_model_without_trainable_parameters_is_refused(tmp_path):
    model = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        stepaudit.Audit(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, run=tmp_path / "r")


def test_orphan_parameters_warn_by_name(tmp_path):
    model = make_mlp()
    with pytest.warns(UserWarning, match=r"2\.weight"):
        stepaudit.Audit(
            model, torch.optim.SGD(model[0].parameters(), lr=0.1), classification_loss, run=tmp_path / "r"
        ).close()


def test_non_scalar_loss_and_one_shot_batch_are_refused(tiny_batch, tmp_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(
        model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), run=tmp_path / "a"
    ) as audit:
        with pytest.raises(ValueError, match="must return a scalar"):
            audit.step(tiny_batch)
    with stepaudit.Audit(model, opt, classification_loss, run=tmp_path / "b") as audit:
        with pytest.raises(TypeError, match="cannot be replayed"):
            audit.step(iter([tiny_batch]))


CHILD = textwrap.dedent(
    """
    import sys, torch
    import stepaudit
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    audit = stepaudit.Audit(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), run=sys.argv[1])
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    step = 0
    while True:
        audit.step((x, y))
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_loses_no_committed_record_and_runs_are_readable_while_written(tmp_path):
    run = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        printed = -1
        deadline = time.time() + 60
        while printed < 20 and time.time() < deadline:
            printed = int(child.stdout.readline())
        live = stepaudit.load(run)  # another process is still writing
        assert len(live) >= 20
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    records = stepaudit.load(run)
    # every step whose audit.step() returned (and printed) was committed before the kill
    assert len(records) >= printed + 1
    assert list(records["step"]) == list(range(len(records)))
    assert records["loss_after"].notna().all()


def test_closure_optimizer_audit_failure_is_recorded_not_raised(tiny_batch, tmp_path):
    def float32_only(model, batch):  # fine in training, fails on the float64 twin
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x.float()), y)

    model = make_mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    with stepaudit.Audit(model, optimizer, float32_only, run=tmp_path / "r", precision="float64") as audit:
        audit.step(tiny_batch)
        audit.step(tiny_batch)
    assert [r["verdict"] for r in audit.records] == ["error", "error"]
    assert "dtype" in audit.records[0]["error"]
    model = make_mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    with stepaudit.Audit(
        model, optimizer, float32_only, run=tmp_path / "strict2", precision="float64", strict=True
    ) as strict:
        with pytest.raises(stepaudit.AuditError, match="closure"):
            strict.step(tiny_batch)


def test_non_finite_first_step_does_not_poison_the_rounding_noise(tiny_batch, tmp_path):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    bad = tiny_batch[0].clone()
    bad[0, 0] = float("nan")
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r") as audit:
        with audit.watch((bad, tiny_batch[1])):  # a guard skips the update (the step is still called)
            optimizer.zero_grad()
            classification_loss(model, (bad, tiny_batch[1])).backward()
            optimizer.zero_grad()
            optimizer.step()
        audit.step(tiny_batch)
        audit.step(tiny_batch)
    assert audit.records[0]["verdict"] == "nonfinite"
    assert all(0 < r["rounding_noise"] < 1e-5 for r in audit.records[1:])
    assert audit.records[-1]["noise_method"] == "measured"


def test_closed_audit_watches_nothing_and_a_dropped_one_leaves_no_hooks(tiny_batch, tmp_path):
    import gc
    import warnings

    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "closed")
    audit.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no optimizer step happened" warning after close()
        with audit.watch(tiny_batch):
            optimizer.zero_grad()
            classification_loss(model, tiny_batch).backward()
            optimizer.step()
    assert audit.skipped_steps == 0 and audit.records == []
    for epoch in range(3):  # a new Audit per epoch, close() forgotten
        dropped = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / f"e{epoch}")
        dropped.step(tiny_batch)
    del dropped
    gc.collect()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_a_param_group_holding_a_stranger_is_an_error_record_not_a_crash(tiny_batch, tmp_path):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    temperature = torch.nn.Parameter(torch.tensor(1.0))  # a learnable loss temperature, not in the model
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r") as audit:
        audit.step(tiny_batch)
        optimizer.add_param_group({"params": [temperature]})
        audit.step(tiny_batch)
        audit.step(tiny_batch)
    assert [r["verdict"] for r in audit.records][1:] == ["error", "error"]
    assert "not in the model" in audit.records[1]["error"]
    strict_model = make_mlp()
    strict_optimizer = torch.optim.SGD(strict_model.parameters(), lr=0.1)
    with stepaudit.Audit(
        strict_model, strict_optimizer, classification_loss, run=tmp_path / "s", strict=True
    ) as strict:
        strict_optimizer.add_param_group({"params": [temperature]})
        with pytest.raises(stepaudit.AuditError, match="not in the model"):
            strict.step(tiny_batch)
        assert strict._pending is None and not strict_model._forward_hooks


def test_a_diverged_run_stops_copying_the_model_to_float64(tiny_batch, tmp_path, monkeypatch):
    from stepaudit import losses

    built = []
    original = losses.Float64Twin.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(losses.Float64Twin, "__init__", counting)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    broken = (tiny_batch[0] * float("nan"), tiny_batch[1])  # non-finite from the first step on
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r") as audit:
        for _ in range(12):
            audit.step(broken)
    assert len(built) == 3 and audit.last["noise_method"] == "roundoff"

"""fastai: AuditCallback on a real Learner, and the public step API with fastai's own optimizers.

Training is bit-identical with and without the callback; the numbers are checked against oracles: fastai's
own training loss, a fresh forward on a copy of the model, torch's Adam on the same steps, and a quadratic
that diverges just above the learning rate ``safe_lr`` reports.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import stepaudit

pytest.importorskip("fastai", reason="fastai is not installed (pip install --no-deps -r requirements-fastai.txt)")
from fastai.callback.core import Callback  # noqa: E402
from fastai.callback.training import GradientAccumulation  # noqa: E402
from fastai.optimizer import SGD, Adam, Lamb, OptimWrapper, RAdam  # noqa: E402
from fastai.tabular.all import (
    Categorify,
    CategoryBlock,
    Normalize,
    TabularDataLoaders,
    accuracy,  # noqa: E402
    set_seed,
    tabular_config,
    tabular_learner,
)
from support.identity import assert_same_rng, rng_state  # noqa: E402

from stepaudit.integrations.fastai import AuditCallback  # noqa: E402

OPTIMIZERS = {
    "adam": Adam,
    "sgd": partial(SGD, mom=0.9),
    "radam": RAdam,
    "lamb": Lamb,
    "wrapped_adamw": partial(OptimWrapper, opt=torch.optim.AdamW),
}


def make_learner(opt: str = "adam", cbs=(), ps: float = 0.2, n: int = 320):
    """A tabular Learner (embedding, BatchNorm, dropout) on generated data: 4 training batches per epoch."""
    set_seed(0, reproducible=True)
    rng = np.random.default_rng(0)
    df = pd_frame(rng, n)
    dls = TabularDataLoaders.from_df(
        df,
        y_names="label",
        cat_names=["colour"],
        cont_names=["a", "b"],
        procs=[Categorify, Normalize],
        y_block=CategoryBlock(),
        bs=64,
        valid_idx=list(range(n - 64, n)),
        num_workers=0,
    )
    return tabular_learner(
        dls, layers=[16], config=tabular_config(ps=ps), metrics=accuracy, opt_func=OPTIMIZERS[opt], cbs=list(cbs)
    )


def pd_frame(rng: np.random.Generator, n: int):
    import pandas as pd

    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "colour": rng.choice(["r", "g", "b"], n)})
    df["label"] = ((df.a + df.b + (df.colour == "r")) > 0.5).astype(int)
    return df


def fit(learn, schedule: str = "fit_one_cycle", epochs: int = 2) -> None:
    with learn.no_bar(), learn.no_logging():
        getattr(learn, schedule)(epochs, 1e-2)


def optimizer_state(opt) -> list:
    """Every state tensor/value of a fastai optimizer (or the torch optimizer an OptimWrapper holds), in order."""
    if isinstance(getattr(opt, "opt", None), torch.optim.Optimizer):
        return [sorted(s.items()) for s in opt.opt.state_dict()["state"].values()]
    return [sorted(opt.state[p].items()) for params in opt.param_lists for p in params]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    "opt,schedule,bf16",
    [
        ("adam", "fit_one_cycle", False),
        ("adam", "fit", False),
        ("sgd", "fit_one_cycle", False),
        ("radam", "fit_one_cycle", False),
        ("lamb", "fit", False),
        ("wrapped_adamw", "fit_one_cycle", False),
        ("adam", "fit_one_cycle", True),
    ],
)
def test_training_is_bit_identical_with_the_callback(tmp_path, opt, schedule, bf16):
    runs = []
    for audited in (False, True):
        cbs = [AuditCallback(run=tmp_path / "run", probes={"sharpness": 2, "precond_sharpness": 3})] if audited else []
        learn = make_learner(opt, cbs)
        if bf16:
            learn.to_bf16()
        fit(learn, schedule)
        runs.append((learn, rng_state()))
    (plain, rng_plain), (audited, rng_audited) = runs
    for a, b in zip(plain.model.state_dict().values(), audited.model.state_dict().values()):
        assert torch.equal(a, b)
    assert same(optimizer_state(plain.opt), optimizer_state(audited.opt))
    assert_same_rng(rng_plain, rng_audited)
    assert plain.recorder.values == audited.recorder.values  # losses and metrics
    records = audited.stepaudit.audit.records
    assert [r["step"] for r in records] == list(range(8))  # training batches only: 2 epochs × 4
    assert all(r["verdict"] in ("decrease", "increase", "flat") for r in records)


class LossOracle(Callback):
    """fastai's own training loss at each step, and the loss of a fresh copy of the model after the step."""

    order = 101  # after AuditCallback

    def before_fit(self):
        self.before, self.after = [], []

    def before_step(self):
        if self.training:
            self.before.append(float(self.learn.loss_grad.detach()))

    def after_step(self):
        twin = copy.deepcopy(self.learn.model)  # its BatchNorm statistics may move: it is thrown away
        with torch.no_grad():
            self.after.append(float(self.learn.loss_func(twin(*self.learn.xb), *self.learn.yb)))


def test_loss_before_and_after_match_fastais_own_forward(tmp_path):
    oracle = LossOracle()
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run"), oracle], ps=0.0)
    fit(learn)
    records = learn.stepaudit.audit.records
    assert len(records) == len(oracle.before) == 8
    for record, before, after in zip(records, oracle.before, oracle.after):
        assert record["loss_before"] == pytest.approx(before, rel=1e-6)
        assert record["loss_after"] == pytest.approx(after, rel=1e-5)


def test_dropout_masks_are_replayed(tmp_path):
    """With dropout, loss_before is a replayed forward: equal to fastai's own loss only if the masks are the same."""
    oracle = LossOracle()
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run"), oracle], ps=0.3)
    fit(learn, epochs=1)
    assert [r["loss_before"] for r in learn.stepaudit.audit.records] == pytest.approx(oracle.before, rel=1e-6)


def steps(model, opt, audit, batches, loss_fn, manual: bool) -> list[dict]:
    for batch in batches:
        audit.begin(batch)
        loss_fn(model, batch).backward()
        if manual:
            audit.before_update()
        opt.step()
        if manual:
            audit.after_update()
        opt.zero_grad()
        audit.end()
    audit.close()
    return audit.records


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("decoupled", [True, False])
def test_fastai_adam_reads_as_torch_adam(tmp_path, decoupled):
    """Oracle: torch's Adam with the same hyperparameters on the same steps gives the same update and the same
    preconditioned sharpness and bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    twin = copy.deepcopy(model)
    batches = [(torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)) for _ in range(4)]
    ours = Adam(list(model.parameters()), lr=1e-2, mom=0.8, sqr_mom=0.95, eps=1e-6, wd=0.05, decouple_wd=decoupled)
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    theirs = kind(twin.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    probes = {"precond_sharpness": 1}
    a = steps(model, ours, stepaudit.Audit(model, ours, mse, run=tmp_path / "a", probes=probes), batches, mse, True)
    b = steps(twin, theirs, stepaudit.Audit(twin, theirs, mse, run=tmp_path / "b", probes=probes), batches, mse, False)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    for x, y in zip(a, b):
        for field in ("loss_before", "loss_after", "first_order", "precond_sharpness", "precond_bound"):
            assert x[field] == pytest.approx(y[field], rel=1e-6), field
        assert x["lr"] == y["lr"]


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_fastai_sgd_safe_lr_is_where_a_quadratic_starts_to_diverge(tmp_path, wd):
    """Oracle: on loss h·w²/2, fastai's SGD (momentum 0.9, decoupled weight decay) converges just below the
    safe_lr the audit reports and diverges just above it."""
    h, beta = 3.0, 0.9

    def quadratic(model, batch):
        return 0.5 * h * (model.weight**2).sum()

    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.3]]))
    opt = SGD(list(model.parameters()), lr=0.1, mom=beta, wd=wd)
    audit = stepaudit.Audit(model, opt, quadratic, run=tmp_path / "run", probes={"sharpness": 1})
    record = steps(model, opt, audit, [torch.zeros(1)], quadratic, True)[0]
    assert record["sharpness"] == pytest.approx(h, rel=1e-6)
    safe = record["safe_lr"]
    assert safe == pytest.approx((2 + 2 * beta) / (h + (1 + beta) * wd), rel=1e-6)
    for factor, grows in ((0.97, False), (1.03, True)):
        w = nn.Parameter(torch.ones(1, dtype=torch.float64))
        sgd = SGD([w], lr=factor * safe, mom=beta, wd=wd)
        for _ in range(2000):
            (0.5 * h * w**2).sum().backward()
            sgd.step()
            sgd.zero_grad()
        assert (abs(float(w)) > 1) == grows


@pytest.mark.parametrize("name", ["radam", "lamb"])
def test_unmapped_optimizers_are_labelled_not_measured(tmp_path, name):
    model = nn.Linear(3, 1)
    opt = OPTIMIZERS[name](list(model.parameters()), lr=1e-2)
    audit = stepaudit.Audit(model, opt, mse, run=tmp_path / "run", probes={"sharpness": 1, "precond_sharpness": 1})
    record = steps(model, opt, audit, [(torch.randn(8, 3), torch.randn(8, 1))], mse, True)[0]
    assert record["verdict"] != "error" and np.isnan(record["safe_lr"]) and np.isnan(record["precond_sharpness"])
    assert "adaptive or unknown" in record["safe_lr_rule"]
    assert f"fastai {'RAdam' if name == 'radam' else 'Lamb'}" in record["precond_sharpness_note"]
    assert audit.store_meta()["optimizer"] == f"fastai {'RAdam' if name == 'radam' else 'Lamb'}"


def test_audit_step_drives_a_fastai_optimizer(tmp_path):
    model = nn.Linear(3, 1)
    opt = Adam(list(model.parameters()), lr=1e-2)
    with stepaudit.Audit(model, opt, mse, run=tmp_path / "run") as audit:
        for _ in range(3):
            audit.step((torch.randn(8, 3), torch.randn(8, 1)))
    assert [r["step"] for r in audit.records] == [0, 1, 2] and audit.records[0]["update_norm"] > 0


def test_public_step_api_on_a_torch_optimizer(tmp_path):
    """begin/end are watch(); the optimizer's hooks make before/after_update, which are refused."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, opt, mse, run=tmp_path / "run")
    audit.begin((torch.randn(8, 3), torch.randn(8, 1)))
    with pytest.raises(RuntimeError, match="call only audit.begin"):
        audit.before_update()
    audit.end(skipped=True)
    records = steps(model, opt, audit, [(torch.randn(8, 3), torch.randn(8, 1))] * 2, mse, False)
    assert [r["step"] for r in records] == [0, 1] and audit.skipped_steps == 0


def test_misuse_is_one_line_with_the_fix(tmp_path):
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="fastai Optimizer/OptimWrapper, or an object with param_groups"):
        stepaudit.Audit(model, object(), mse, run=tmp_path / "a")
    opt = Adam(list(model.parameters()), lr=1e-2)
    audit = stepaudit.Audit(model, opt, mse, run=tmp_path / "b")
    with pytest.raises(RuntimeError, match="call audit.begin"):
        audit.before_update()
    with pytest.raises(RuntimeError, match="without audit.begin"):
        audit.end()
    audit.begin((torch.randn(8, 3), torch.randn(8, 1)))
    audit.after_update()
    with pytest.raises(RuntimeError, match="already called"):
        audit.after_update()


def test_lr_find_is_not_audited_and_the_fit_after_it_is(tmp_path):
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run")])
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=6, show_plot=False)
    assert learn.stepaudit.audit is None
    fit(learn, epochs=1)
    assert len(learn.stepaudit.audit.records) == 4
    assert stepaudit.load(tmp_path / "run") is not None


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_lr_find_measured_by_the_callback_leaves_learn_as_fastai_does(tmp_path, opt):
    """Oracles: a twin Learner running the same lr_find without the callback (torch.equal on weights, optimizer
    state, RNGs, fastai's recorded curve and suggestions), and fastai's own suggestion functions on its curve."""
    from fastai.callback.schedule import steep, valley

    runs = []
    for measured in (False, True):
        cbs = [AuditCallback(run=tmp_path / "run", lr_find=True)] if measured else []
        learn = make_learner(opt, cbs, n=640)
        learn.path = tmp_path
        funcs = (valley, steep, learn.stepaudit.suggest) if measured else (valley, steep)
        with learn.no_bar(), learn.no_logging():
            suggested = learn.lr_find(num_it=40, show_plot=False, suggest_funcs=funcs)
        runs.append((learn, suggested, rng_state()))
    (plain, plain_lrs, plain_rng), (learn, lrs, rng) = runs
    for a, b in zip(plain.model.state_dict().values(), learn.model.state_dict().values()):
        assert torch.equal(a, b)
    assert same(optimizer_state(plain.opt), optimizer_state(learn.opt))
    assert_same_rng(plain_rng, rng)
    assert plain.recorder.lrs == learn.recorder.lrs and plain.recorder.losses == learn.recorder.losses
    assert (lrs.valley, lrs.steep) == (plain_lrs.valley, plain_lrs.steep)
    result = learn.stepaudit.lr_find_result
    assert lrs.stepaudit == result.suggestion and np.isfinite(result.suggestion)
    assert result.lrs.tolist() == pytest.approx(learn.recorder.lrs, rel=1e-12)  # fastai's own lrs, every step
    assert result.smooth_losses.tolist() == pytest.approx([float(v) for v in learn.recorder.losses], rel=1e-5)
    assert result.suggestions["valley"] == pytest.approx(lrs.valley, rel=1e-5)  # our rule = fastai's, on its curve
    assert result.suggestions["steep"] == pytest.approx(lrs.steep, rel=1e-5)
    assert np.isfinite(result.curvature.sharpness) and set(result.verdicts) <= {"decrease", "increase", "flat"}
    assert (result.curvature.precond is not None) == (opt == "adam")  # taken after the first tenth: 4 of 40 steps
    assert opt != "adam" or result.curvature.precond_where.startswith("after fastai's first 4 steps")
    assert (result.gain_train, result.momentum) == pytest.approx((10.0, 0.9) if opt == "sgd" else (1.0, 0.0))
    assert learn.stepaudit.audit is None and not (tmp_path / "run").exists()  # no run is written for a sweep
    fit(learn, epochs=1)
    assert [r["step"] for r in learn.stepaudit.audit.records] == list(range(9))  # 576 rows, batches of 64


def test_the_suggestion_function_needs_lr_find_true(tmp_path):
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run")])
    learn.path = tmp_path
    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match="lr_find=True"):
        learn.lr_find(num_it=6, show_plot=False, suggest_funcs=(learn.stepaudit.suggest,))
    assert learn.stepaudit.lr_find_result is None


def test_a_second_fit_writes_its_own_run_and_continues_the_count(tmp_path):
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run")])
    fit(learn, epochs=1)
    fit(learn, epochs=1)
    first, second = learn.stepaudit.audits
    assert [r["step"] for r in second.records] == [4, 5, 6, 7] and second.run == tmp_path / "run-fit2"
    assert first.closed and second.closed


def test_gradient_accumulation_is_refused_with_the_fix(tmp_path):
    learn = make_learner("adam", [AuditCallback(run=tmp_path / "run"), GradientAccumulation(128)])
    with pytest.raises(ValueError, match="remove GradientAccumulation"):
        fit(learn, epochs=1)


def test_an_optimizer_that_cannot_be_read_is_a_recorded_error_not_a_crash(tmp_path):
    model = nn.Linear(3, 1)
    opt = Adam(list(model.parameters()), lr=1e-2)
    audit = stepaudit.Audit(model, opt, mse, run=tmp_path / "run")
    before = [p.detach().clone() for p in model.parameters()]
    del opt.hypers[0]["sqr_mom"]  # what the mirror reads is gone; fastai's own step does not get that far
    audit.begin((torch.randn(8, 3), torch.randn(8, 1)))
    mse(model, (torch.randn(8, 3), torch.randn(8, 1))).backward()
    audit.before_update()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    record = audit.after_update()
    audit.end()
    assert record["verdict"] == "error" and "sqr_mom" in record["error"]
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class CpuBf16(Callback):
    """fastai's MixedPrecision recipe on the CPU (fastai's own turns autocast on only under CUDA)."""

    order = 10

    def before_batch(self):
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()

    def after_loss(self):
        self.autocast.__exit__(None, None, None)


def test_bf16_autocast_training_is_unchanged_and_re_evaluated_under_it(tmp_path):
    runs = []
    for audited in (False, True):
        oracle = LossOracle()
        cbs = [CpuBf16(), oracle] + ([AuditCallback(run=tmp_path / "run")] if audited else [])
        learn = make_learner("adam", cbs, ps=0.2)
        fit(learn)
        runs.append((learn, oracle))
    (plain, _), (audited, oracle) = runs
    for a, b in zip(plain.model.state_dict().values(), audited.model.state_dict().values()):
        assert torch.equal(a, b)
    assert plain.recorder.values == audited.recorder.values
    records = audited.stepaudit.audit.records
    assert [r["loss_before"] for r in records] == pytest.approx(oracle.before, rel=1e-6)


def test_fastai_and_the_callback_import_without_torchvision():
    """requirements-fastai.txt leaves torchvision out (the registry's is a CUDA build): nothing here needs it."""
    code = (
        "import sys; sys.modules['torchvision'] = None; import fastai.basics, fastai.tabular.all; "
        "import stepaudit.integrations.fastai; import torch; print(torch.__version__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().split("+")[0] == "2.13.0"

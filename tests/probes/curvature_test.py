"""Curvature probes against independent oracles: dense float64 Hessians, eigvalsh, finite differences,
the optimizer's own observed update, and the divergence of gradient descent itself."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from support.identity import assert_same_model, assert_same_optimizer, assert_same_rng, rng_state, seed_host
from torch import nn
from torch.func import functional_call

import stepaudit
from stepaudit.precision import TWIN_KEY, Float64Twin
from stepaudit.probes import curvature, register

F64 = torch.float64
CAPTURED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast alone and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mse_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class Net(nn.Module):
    """Two hidden tanh layers and a head: module paths body.0, body.2, head."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [nn.Tanh()]
        layers += [nn.Linear(5, 4), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


def net(seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    return Net(**kw).to(dtype)


def batch(n=24, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model, loss_fn, data, flat, train=True):
    """Independent oracle: torch.func.hessian of the loss as a function of one flat float64 vector."""
    model = copy.deepcopy(model).to(F64).train(train)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    x, y = data
    x = x.to(F64)

    def f(w):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = w[i : i + k].reshape(shape)
            i += k
        out = functional_call(model, {**params, **{n: b.clone() for n, b in buffers.items()}}, (x,))
        return F.mse_loss(out, y) if loss_fn is mse_loss else F.cross_entropy(out, y)

    return torch.func.hessian(f)(flat.to(F64).detach())


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def audit_one_step(model, opt, loss_fn, data, tmp_path, probes, configure=None, warmup=0, **kw):
    """Take ``warmup`` plain steps, then one audited step; return (record, w_before, w_after, audit)."""
    for _ in range(warmup):
        opt.zero_grad()
        loss_fn(model, data).backward()
        opt.step()
    audit = stepaudit.Audit(model, opt, loss_fn, run=tmp_path / "run", probes=probes, **kw)
    if configure:
        curvature.configure(audit, **configure)
    before = flat_params(model)
    audit.step(data)
    after = flat_params(model)
    audit.close()
    record = audit.records[-1]
    assert "probe_errors" not in record, record.get("probe_errors")
    return record, before, after, audit


def rel(a, b):
    return abs(a - b) / abs(b)


@register("_test_capture_hvp")
def _capture(ctx):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(ctx.flat_before.numel(), generator=g, dtype=ctx.flat_before.dtype)
    op = curvature.hessian(ctx)
    CAPTURED["v"], CAPTURED["hv"], CAPTURED["method"] = v, op(v), op.method
    return {}


# -- HVP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_hvp_at_old_weights_matches_dense_hessian(tmp_path, method):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    audit = stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "run", probes={"_test_capture_hvp": 1})
    if method != "auto":
        audit.memory["_hvp_method"] = {"method": method}
    before = flat_params(model)
    audit.step(data)
    audit.close()
    h = dense_hessian(model, ce_loss, data, before)
    expected = h @ CAPTURED["v"]
    assert torch.linalg.vector_norm(CAPTURED["hv"] - expected) / torch.linalg.vector_norm(expected) < 1e-10
    assert audit.records[0].get("probe_errors") is None


def test_hvp_with_dropout_and_batchnorm_matches_finite_difference_of_gradient(tmp_path):
    """Training-mode semantics: same dropout masks and BatchNorm batch statistics as the step's forward."""
    model, data = net(dropout=0.5, batchnorm=True), batch()
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "run", probes={"_test_capture_hvp": 1})
    torch.manual_seed(123)
    audit.step(data)
    audit.close()
    v, hv = CAPTURED["v"], CAPTURED["hv"]

    def grad_at(w, seed, train=True):
        m = copy.deepcopy(start).train(train)
        torch.nn.utils.vector_to_parameters(w, m.parameters())
        torch.manual_seed(seed)
        g = torch.autograd.grad(ce_loss(m, data), list(m.parameters()))
        return torch.cat([t.reshape(-1) for t in g])

    w0, eps = flat_params(start), 1e-5
    fd = (grad_at(w0 + eps * v, 123) - grad_at(w0 - eps * v, 123)) / (2 * eps)
    assert torch.linalg.vector_norm(hv - fd) / torch.linalg.vector_norm(fd) < 1e-6
    # The check is sensitive: other masks, or eval mode, give a clearly different H v.
    other = (grad_at(w0 + eps * v, 7) - grad_at(w0 - eps * v, 7)) / (2 * eps)
    evald = (grad_at(w0 + eps * v, 123, False) - grad_at(w0 - eps * v, 123, False)) / (2 * eps)
    for wrong in (other, evald):
        assert torch.linalg.vector_norm(hv - wrong) / torch.linalg.vector_norm(wrong) > 1e-2


# -- quadratic and interplay ------------------------------------------------------------------------
def test_quadratic_is_half_dw_h_dw_from_the_dense_hessian(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    record, before, after, _ = audit_one_step(model, opt, ce_loss, data, tmp_path, {"quadratic": 1}, warmup=2)
    dw = after - before
    expected = 0.5 * float(dw @ dense_hessian(model, ce_loss, data, before) @ dw)
    assert rel(record["quadratic"], expected) < 1e-10
    assert record["cubic_remainder"] == pytest.approx(record["delta"] - record["first_order"] - expected, abs=1e-14)
    assert record["hvp_method"] in ("forward-over-reverse", "reverse-over-reverse")


def test_cubic_remainder_vanishes_on_a_purely_quadratic_loss(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(F64)  # linear model + MSE: the loss is exactly quadratic in the weights
    x = torch.randn(32, 4, dtype=F64)
    data = (x, torch.randn(32, 3, dtype=F64))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    record, *_ = audit_one_step(model, opt, mse_loss, data, tmp_path, {"quadratic": 1})
    assert abs(record["quadratic"]) > 1e-3  # a real curvature term, not a trivial zero
    assert abs(record["cubic_remainder"]) < 1e-12


def test_interplay_matrix_is_the_dense_block_form_and_sums_to_quadratic(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    record, before, after, _ = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"quadratic": 1, "interplay_matrix": 1}, warmup=3
    )
    h, dw = dense_hessian(model, ce_loss, data, before), after - before
    # Oracle: layer (module) masks built from named_parameters, blocks of the dense Hessian.
    layer_of = []
    for name, p in model.named_parameters():
        layer_of += [name.rsplit(".", 1)[0]] * p.numel()
    layers = list(dict.fromkeys(layer_of))
    assert record["interplay_layers"] == layers == ["body.0", "body.2", "head"]
    masks = [torch.tensor([l == name for l in layer_of], dtype=F64) for name in layers]
    expected = torch.tensor([[0.5 * float((dw * a) @ h @ (dw * b)) for b in masks] for a in masks], dtype=F64)
    got = torch.tensor(record["interplay_matrix"], dtype=F64)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-14 * float(expected.abs().max()))
    assert rel(float(got.sum()), record["quadratic"]) < 1e-10
    assert rel(record["interplay"], float(expected.sum() - expected.diagonal().sum())) < 1e-9
    top = record["interplay_top"][0]
    i, j = layers.index(top["a"]), layers.index(top["b"])
    off = [(abs(2 * float(expected[a, b])), a, b) for a in range(3) for b in range(a + 1, 3)]
    assert (i, j) == max(off)[1:] and rel(top["value"], 2 * float(expected[i, j])) < 1e-9


# -- sharpness and safe learning rate ---------------------------------------------------------------
def test_sharpness_matches_eigvalsh_and_residual_bounds_the_error(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record, before, _, _ = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"sharpness": 1}, configure={"tol": 1e-10, "max_hvps": 200}
    )
    top = float(torch.linalg.eigvalsh(dense_hessian(model, ce_loss, data, before))[-1])
    assert rel(record["sharpness"], top) < 1e-6
    assert record["safe_lr"] == pytest.approx(2 / top, rel=1e-6) and record["lr_exceeds_safe"] is False
    # With the defaults (tol 1e-3): within 1e-3, and within its own honest residual, of the top eigenvalue;
    # with stop="residual" the residual itself is ≤ 1e-3·λ.
    for stop in ("eigenvalue", "residual"):
        model2 = net()
        record2, *_ = audit_one_step(
            model2,
            torch.optim.SGD(model2.parameters(), lr=0.1),
            ce_loss,
            data,
            tmp_path / stop,
            {"sharpness": 1},
            configure={"stop": stop},
        )
        assert abs(record2["sharpness"] - top) <= min(record2["sharpness_residual"], 1e-3 * top)
        assert record2["sharpness_hvps"] >= 2
    assert record2["sharpness_residual"] <= 1e-3 * top


@pytest.mark.parametrize("verify", [False, True])
def test_sharpness_residual_is_the_true_residual_of_the_returned_vector(tmp_path, verify):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record, before, _, audit = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"sharpness": 1}, configure={"verify": verify, "tol": 1e-2}
    )
    v = audit.probe_states["curvature"].vectors["sharpness:batch"].to(F64)
    hv = dense_hessian(model, ce_loss, data, before) @ v
    assert float(v @ v) == pytest.approx(1.0, rel=1e-12)
    assert record["sharpness"] == pytest.approx(float(v @ hv), rel=1e-8)
    assert record["sharpness_residual"] == pytest.approx(
        float(torch.linalg.vector_norm(hv - record["sharpness"] * v)), rel=1e-6
    )


def test_sharpness_on_a_fixed_reference_batch_in_eval_mode(tmp_path):
    model, data, ref = net(dropout=0.3), batch(), batch(n=40, seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record, before, _, _ = audit_one_step(
        model,
        opt,
        ce_loss,
        data,
        tmp_path,
        {"sharpness": 1},
        configure={"sharpness_on": ref, "tol": 1e-10, "max_hvps": 200},
    )
    top = float(torch.linalg.eigvalsh(dense_hessian(model, ce_loss, ref, before, train=False))[-1])
    assert record["sharpness_on"] == "reference" and rel(record["sharpness"], top) < 1e-6


def test_warm_start_tracks_with_fewer_hvps(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    audit = stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "run", probes={"sharpness": 1})
    for _ in range(3):
        audit.step(data)
    audit.close()
    hvps = [r["sharpness_hvps"] for r in audit.records]
    assert hvps[1] < hvps[0] and hvps[2] < hvps[0] and hvps[2] <= 4


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_safe_lr_is_where_gradient_descent_starts_to_diverge(tmp_path, momentum, nesterov):
    """Oracle: the dynamics. On an exactly quadratic loss, lr just below safe_lr converges, just above diverges."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, dtype=F64)
    data = (x, torch.randn(64, 2, dtype=F64))
    results = {}
    for factor in (0.97, 1.03):
        torch.manual_seed(1)
        model = nn.Linear(4, 2).to(F64)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=momentum, nesterov=nesterov)
        audit = stepaudit.Audit(model, opt, mse_loss, run=tmp_path / f"run{factor}", probes={"sharpness": 1000})
        curvature.configure(audit, tol=1e-10, max_hvps=100)
        audit.step(data)  # step 0 measures sharpness (a constant here); then run at factor × safe_lr
        safe = audit.records[0]["safe_lr"]
        for group in opt.param_groups:
            group["lr"] = factor * safe
        losses = [float(audit.step(data)) for _ in range(600)]
        audit.close()
        results[factor] = losses
    # Closed-form minimum of the least-squares loss (bias as a column of ones).
    design = torch.cat([x, torch.ones(64, 1, dtype=F64)], dim=1)
    solution = torch.linalg.lstsq(design, data[1]).solution
    minimum = float(F.mse_loss(design @ solution, data[1]))
    assert results[0.97][-1] - minimum < 1e-8 * (results[0.97][0] - minimum)
    assert results[1.03][-1] > 1e3 * results[1.03][0]


def test_lr_exceeds_safe_is_flagged(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    record, *_ = audit_one_step(model, opt, ce_loss, data, tmp_path, {"sharpness": 1})
    assert record["lr_exceeds_safe"] is True and record["safe_lr"] < 100.0


# -- preconditioned sharpness ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adam", "adamw", "rmsprop"])
def test_precond_sharpness_matches_dense_p_inverse_h(tmp_path, kind):
    """Oracle P from the update the optimizer actually made: Δw = −η P⁻¹ m (Adam) or −η P⁻¹ g (RMSprop)."""
    model, data = net(), batch()
    lr = 0.01
    opt = {
        "adam": lambda p: torch.optim.Adam(p, lr=lr),
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr),
    }[kind](model.parameters())
    record, before, after, _ = audit_one_step(
        model,
        opt,
        ce_loss,
        data,
        tmp_path,
        {"precond_sharpness": 1},
        configure={"tol": 1e-10, "max_hvps": 200},
        warmup=3,
    )
    dw = after - before
    if kind == "adamw":
        dw = dw + lr * 0.1 * before  # undo the decoupled decay w ← w(1−ηλ)
    if kind == "rmsprop":
        old = _at(model, before)
        m = torch.autograd.grad(ce_loss(old, data), list(old.parameters()))
        m = torch.cat([t.reshape(-1) for t in m])
    else:
        m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    p_diag = -lr * m / dw
    h = dense_hessian(model, ce_loss, data, before)
    expected = float(torch.linalg.eigvals(h / p_diag[:, None]).real.max())
    assert rel(record["precond_sharpness"], expected) < 1e-6
    bound = (2 + 2 * 0.9) / (lr * (1 - 0.9)) if kind != "rmsprop" else 2 / lr
    assert record["precond_bound"] == pytest.approx(bound)


def _at(model, flat):
    m = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(flat, m.parameters())
    return m


def test_precond_sharpness_explains_itself_for_sgd(tmp_path):
    model, data = net(), batch()
    record, *_ = audit_one_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, data, tmp_path, {"precond_sharpness": 1}
    )
    assert math.isnan(record["precond_sharpness"]) and "SGD" in record["precond_sharpness_note"]


# -- trace, float64 option, robustness, identity ---------------------------------------------------------
def test_hessian_trace_is_unbiased_with_the_rademacher_standard_error(tmp_path):
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record, before, _, _ = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"hessian_trace": 1}, configure={"trace_samples": 400}
    )
    h = dense_hessian(model, ce_loss, data, before)
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z (Hutchinson 1989).
    sigma = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / 400)
    assert record["hessian_trace_stderr"] == pytest.approx(sigma, rel=0.25)
    assert abs(record["hessian_trace"] - float(h.trace())) < 4 * sigma


def test_float64_option_evaluates_curvature_on_a_float64_twin(tmp_path):
    model, data = net(dtype=torch.float32), batch(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    record, before, after, _ = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"quadratic": 1}, precision="float64", warmup=1
    )
    dw = after.double() - before.double()
    expected = 0.5 * float(dw @ dense_hessian(model, ce_loss, data, before.double()) @ dw)
    assert rel(record["quadratic"], expected) < 1e-10


def test_float64_curvature_and_losses_share_the_audits_one_float64_copy_of_the_model(tmp_path, monkeypatch):
    """precision="float64" with curvature probes: one float64 twin per audit, built once, used by the loss
    evaluator and the HVPs alike, and still exact at a later step (each user loads it before use)."""
    built = []
    init = Float64Twin.__init__

    def counted(self, model):
        built.append(self)
        init(self, model)

    monkeypatch.setattr(Float64Twin, "__init__", counted)
    model, data = net(dtype=torch.float32), batch(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    probes = {"quadratic": 1, "sharpness": 1, "hessian_trace": 1}
    audit = stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "run", probes=probes, precision="float64")
    for _ in range(2):
        before = flat_params(model)
        audit.step(data)
    after = flat_params(model)
    audit.close()
    record = audit.records[-1]
    assert "probe_errors" not in record, record.get("probe_errors")
    assert record["noise_method"] == "float64" and math.isfinite(record["sharpness"])
    assert len(built) == 1 and audit.probe_states[TWIN_KEY] is built[0]  # one copy, the shared one
    kept = [vars(s) for s in audit.probe_states.values() if hasattr(s, "__dict__")]
    assert not any(isinstance(v, Float64Twin) for state in kept for v in state.values())  # no private copy
    dw = after.double() - before.double()  # the second step: the twin reloaded after the first step's uses
    expected = 0.5 * float(dw @ dense_hessian(model, ce_loss, data, before.double()) @ dw)
    assert rel(record["quadratic"], expected) < 1e-10


def test_diverged_weights_give_nan_sharpness_with_a_reason(tmp_path):
    model, data = net(), batch()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    record, *_ = audit_one_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, data, tmp_path, {"sharpness": 1, "quadratic": 1}
    )
    assert math.isnan(record["sharpness"]) and "non-finite" in record["sharpness_note"]


def test_unknown_probe_and_bad_settings_are_refused_with_the_fix(tmp_path):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sharpness"):
        stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "a", probes={"sharpnes": 1})
    audit = stepaudit.Audit(model, opt, ce_loss, run=tmp_path / "b", probes={"sharpness": 1})
    with pytest.raises(ValueError, match="reference"):
        curvature.configure(audit, sharpness_on="reference")
    with pytest.raises(ValueError, match="known"):
        curvature.configure(audit, tolerance=1e-3)
    audit.close()


ALL = {"quadratic": 1, "interplay_matrix": 1, "sharpness": 1, "precond_sharpness": 1, "hessian_trace": 2}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_training_is_bit_identical_with_every_curvature_probe_on(tmp_path, kind):
    def run(audited):
        model = net(dropout=0.3, batchnorm=True, dtype=torch.float32)
        make = {
            "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        }[kind]
        opt = make(model.parameters())
        audit = None
        if audited:
            audit = stepaudit.Audit(
                model,
                opt,
                ce_loss,
                run=tmp_path / f"run-{kind}",
                probes=ALL,
                precision="float64" if kind == "adam" else None,
            )
            reference = batch(n=16, seed=4, dtype=torch.float32)
            curvature.configure(audit, sharpness_on=reference if kind == "sgd" else "batch")
        torch.manual_seed(99)
        seed_host()
        losses = []
        for i in range(4):
            data = batch(seed=10 + i, dtype=torch.float32)
            if audit is not None:
                losses.append(float(audit.step(data)))
            else:
                opt.zero_grad()
                loss = ce_loss(model, data)
                loss.backward()
                opt.step()
                losses.append(float(loss))
        if audit is not None:
            audit.close()
            assert all("probe_errors" not in r for r in audit.records), audit.records[0].get("probe_errors")
            first = audit.records[0]
            wanted = ["quadratic", "interplay", "sharpness", "hessian_trace"] + (
                ["precond_sharpness"] if kind == "adam" else []
            )
            assert all(math.isfinite(first[k]) for k in wanted), first
        return model, opt, rng_state(), losses

    (m1, o1, r1, l1), (m2, o2, r2, l2) = run(False), run(True)
    assert l1 == l2
    assert_same_rng(r1, r2)
    assert_same_model(m1, m2)
    assert_same_optimizer(o1, o2)


def test_hvp_through_attention_matches_finite_difference_of_gradient(tmp_path):
    """Fused attention kernels lack double-backward; HVPs run on the math backend and still match."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(F64)
    x = torch.randn(4, 5, 8, dtype=F64)
    data = (x, torch.randn(4, 5, 8, dtype=F64))
    start = copy.deepcopy(model)
    audit = stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        mse_loss,
        run=tmp_path / "run",
        probes={"_test_capture_hvp": 1, "sharpness": 1},
    )
    audit.step(data)
    audit.close()
    assert "probe_errors" not in audit.records[0] and math.isfinite(audit.records[0]["sharpness"])
    v, hv = CAPTURED["v"], CAPTURED["hv"]

    def grad_at(w):
        m = copy.deepcopy(start)
        torch.nn.utils.vector_to_parameters(w, m.parameters())
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(mse_loss(m, data), list(m.parameters()))])

    w0, eps = flat_params(start), 1e-5
    fd = (grad_at(w0 + eps * v) - grad_at(w0 - eps * v)) / (2 * eps)
    assert torch.linalg.vector_norm(hv - fd) / torch.linalg.vector_norm(fd) < 1e-6


def test_lanczos_eigenvalue_stop_meets_its_target_with_fewer_calls():
    """Oracle: a dense symmetric matrix with a known spectrum (a decaying one, like a network Hessian's)."""
    from stepaudit.linalg import lanczos

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=F64))
    spectrum = torch.cat([torch.tensor([10.0, 8.0], dtype=F64), 5 * torch.rand(298, generator=g, dtype=F64) ** 4])
    a = (q * spectrum) @ q.T
    for tol in (1e-3, 1e-6):
        by_value = lanczos(
            lambda v: a @ v, 300, iterations=100, tol=tol, stop="eigenvalue", generator=gen_(1), dtype=F64
        )
        by_residual = lanczos(
            lambda v: a @ v, 300, iterations=100, tol=tol, stop="residual", generator=gen_(1), dtype=F64
        )
        assert abs(by_value.eigenvalue - 10.0) <= tol * 10.0
        assert abs(by_value.eigenvalue - 10.0) <= by_value.residual  # the reported residual stays honest
        assert by_value.iterations < by_residual.iterations
    with pytest.raises(ValueError, match="stop"):
        lanczos(lambda v: a @ v, 300, stop="fast")


def gen_(seed):
    return torch.Generator().manual_seed(seed)


# -- 16-bit models ----------------------------------------------------------------------------------
def promoted_mse(model, batch):
    """MSE with the output promoted to at least float32 (as a mixed-precision loss would)."""
    x, y = batch
    out = model(x)
    return F.mse_loss(out.to(torch.promote_types(out.dtype, torch.float32)), y)


def wide_linear_problem(dtype):
    """nn.Linear(127, 130): 16 640 parameters, more than 1/eps² of bfloat16; MSE makes H independent of w."""
    torch.manual_seed(0)
    model = nn.Linear(127, 130).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 127, generator=g) + torch.linspace(-1, 2, 127)).to(dtype)
    return model, (x, torch.randn(64, 130, generator=g))


def linear_mse_block(x, outputs):
    """Closed form: H = I_out ⊗ A with A = 2/(n·out) [x 1]ᵀ[x 1] over each output's (weight row, bias)."""
    xa = torch.cat([x.to(F64), torch.ones(len(x), 1, dtype=F64)], dim=1)
    return 2 / (len(x) * outputs) * xa.T @ xa


def test_sharpness_of_a_bf16_model_matches_the_closed_form_hessian(tmp_path):
    model, data = wide_linear_problem(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record, *_ = audit_one_step(model, opt, promoted_mse, data, tmp_path, {"sharpness": 1})
    top = float(torch.linalg.eigvalsh(linear_mse_block(data[0], 130))[-1])
    assert rel(record["sharpness"], top) < 2e-2  # bf16 HVPs: each product rounded to 8 significant bits
    assert record["sharpness_hvps"] > 2


def _folded_p_inverse_sqrt(opt, params):
    """Oracle P⁻¹ᐟ² straight from Adam's state: P = (1−β₁ᵗ)(√(v/(1−β₂ᵗ)) + ε), one group."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    pieces = []
    for p in params:
        state = opt.state[p]
        t = float(state["step"])
        v = state["exp_avg_sq"].to(F64).reshape(-1)
        pieces.append(((1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + group["eps"])).rsqrt())
    return torch.cat(pieces)


@pytest.mark.parametrize("precision", [None, "float64"])
def test_precond_sharpness_of_a_bf16_model_matches_the_dense_oracle(tmp_path, precision):
    model, data = wide_linear_problem(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    record, *_ = audit_one_step(
        model,
        opt,
        promoted_mse,
        data,
        tmp_path,
        {"precond_sharpness": 1},
        configure={"tol": 1e-10, "max_hvps": 60} if precision else None,
        warmup=3,
        precision=precision,
    )
    d = _folded_p_inverse_sqrt(opt, list(model.parameters()))
    # D H D is block diagonal, one (weight row, bias) block per output: D_j A D_j.
    rows = torch.cat([d[: 127 * 130].reshape(130, 127), d[127 * 130 :, None]], dim=1)
    a = linear_mse_block(data[0], 130)
    top = float(torch.linalg.eigvalsh(rows[:, :, None] * a * rows[:, None, :])[:, -1].max())
    assert rel(record["precond_sharpness"], top) < (1e-8 if precision else 2e-2)


# -- RNG, zero learning rate, dampening, L2 weight decay --------------------------------------------
def test_reference_batch_rng_comes_from_private_generators(tmp_path, monkeypatch):
    """Seeding the global generators would reseed every CUDA device too (or queue it for lazy CUDA init)."""
    model, data, ref = net(dropout=0.3), batch(), batch(n=40, seed=9)
    plain = copy.deepcopy(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a global generator was seeded")

    for owner in (torch, torch.random, torch.cuda):
        for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, refuse)
    state = torch.get_rng_state()
    torch.optim.SGD(plain.parameters(), lr=0.1).step(lambda: ce_loss(plain, data).backward())
    expected_state = torch.get_rng_state()
    torch.set_rng_state(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record, *_, audit = audit_one_step(
        model, opt, ce_loss, data, tmp_path, {"sharpness": 1}, configure={"sharpness_on": ref}
    )
    assert math.isfinite(record["sharpness"]) and record["sharpness_on"] == "reference"
    assert torch.equal(torch.get_rng_state(), expected_state)  # the training stream, exactly as unaudited
    reference = audit.probe_states["curvature"].reference_rng
    assert torch.equal(reference.cpu, torch.Generator().manual_seed(0).get_state()) and reference.cuda == {}


@pytest.mark.parametrize("kind", ["adamw", "rmsprop"])
def test_precond_sharpness_at_zero_learning_rate_has_no_bound(tmp_path, kind):
    """A warm-up start (η = 0): no step, so no stability bound; λ(P⁻¹H) is still measured (P unfolded)."""
    model, data = net(), batch()
    make = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[kind]
    opt = make(model.parameters(), lr=0.0)
    record, before, after, _ = audit_one_step(
        model,
        opt,
        ce_loss,
        data,
        tmp_path,
        {"precond_sharpness": 1},
        configure={"tol": 1e-10, "max_hvps": 200},
        warmup=2,
    )
    assert torch.equal(before, after)
    assert record["precond_bound"] == math.inf and record["precond_exceeds"] is False
    if kind == "adamw":
        d = _folded_p_inverse_sqrt(opt, list(model.parameters()))
    else:
        group = opt.param_groups[0]
        v = torch.cat([opt.state[p]["square_avg"].reshape(-1) for p in model.parameters()])
        d = (v.sqrt() + group["eps"]).rsqrt()
    h = dense_hessian(model, ce_loss, data, before)
    assert rel(record["precond_sharpness"], float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])) < 1e-6


def test_full_dampening_has_no_stable_learning_rate_limit(tmp_path):
    """dampening = 1: after the first step no gradient enters the momentum buffer, so no lr diverges."""
    model, data = net(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=1.0)
    record, *_ = audit_one_step(model, opt, ce_loss, data, tmp_path, {"sharpness": 1})
    assert math.isfinite(record["sharpness"]) and record["sharpness"] > 0
    assert record["safe_lr"] == math.inf and "no gradient" in record["safe_lr_rule"]
    assert record["lr_exceeds_safe"] is False
    # Oracle: the dynamics. On ½λw² with λ = 3, lr = 100 (far above 2/λ) stays bounded.
    w = nn.Parameter(torch.ones(1, dtype=F64))
    sgd = torch.optim.SGD([w], lr=100.0, momentum=0.9, dampening=1.0)
    for _ in range(300):
        sgd.zero_grad()
        (1.5 * w * w).sum().backward()
        sgd.step()
    assert abs(float(w)) < 1e4


class Quadratic(nn.Module):
    """Two parameter tensors under the loss ½ wᵀ A w (w their concatenation): H = A exactly."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.first = nn.Parameter(torch.randn(4, generator=g, dtype=F64))
        self.second = nn.Parameter(torch.randn(3, generator=g, dtype=F64))


def quadratic_matrix():
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=F64))
    return (q * torch.linspace(0.2, 2.0, 7, dtype=F64)) @ q.T


def quadratic_loss(model, batch):
    w = torch.cat([model.first, model.second])
    return 0.5 * w @ quadratic_matrix() @ w


@pytest.mark.parametrize("kind", ["adam", "adam_decoupled", "adamw", "rmsprop"])
def test_precond_sharpness_includes_l2_weight_decay(tmp_path, kind):
    """Adam (coupled) and RMSprop precondition g + wd·w: the operator is P⁻¹(H + wd·I) per group; AdamW's P⁻¹H.

    Oracle: P from the update the optimizer made (Δw = −η_g P_g⁻¹ m, folded to the first group's η), then
    eigvalsh of D(A + diag(wd))D with the closed-form Hessian A.
    """
    if kind == "adam_decoupled" and "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters:
        pytest.skip("this torch's Adam has no decoupled_weight_decay")
    model = Quadratic()
    lrs, wds = (0.01, 0.003), (0.5, 0.2)
    groups = [
        {"params": [model.first], "lr": lrs[0], "weight_decay": wds[0]},
        {"params": [model.second], "lr": lrs[1], "weight_decay": wds[1]},
    ]
    make = {
        "adam": lambda: torch.optim.Adam(groups),
        "adam_decoupled": lambda: torch.optim.Adam(groups, decoupled_weight_decay=True),
        "adamw": lambda: torch.optim.AdamW(groups),
        "rmsprop": lambda: torch.optim.RMSprop(groups),
    }
    opt = make[kind]()
    record, before, after, _ = audit_one_step(
        model,
        opt,
        quadratic_loss,
        torch.zeros(1),
        tmp_path,
        {"precond_sharpness": 1},
        configure={"tol": 1e-12, "max_hvps": 50},
        warmup=5,
    )
    a = quadratic_matrix()
    lr_of = torch.tensor([lrs[0]] * 4 + [lrs[1]] * 3, dtype=F64)
    wd_of = torch.tensor([wds[0]] * 4 + [wds[1]] * 3, dtype=F64)
    coupled = kind in ("adam", "rmsprop")
    dw = after - before
    if not coupled:
        dw = dw + lr_of * wd_of * before  # undo the decoupled decay w ← w(1 − η_g·wd_g)
    if kind == "rmsprop":
        m = a @ before + wd_of * before  # the L2-augmented gradient at the old weights
    else:
        m = torch.cat([opt.state[p]["exp_avg"] for p in model.parameters()])
    p_diag = -lrs[0] * m / dw  # = P_g·η/η_g: P_g folded to the first group's η
    d = p_diag.rsqrt()
    operator = a + torch.diag(wd_of) if coupled else a
    expected = float(torch.linalg.eigvalsh(d[:, None] * operator * d[None, :])[-1])
    assert rel(record["precond_sharpness"], expected) < 1e-8

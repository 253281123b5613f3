"""Two processes (gloo, CPU, fork): the audited objective is the global one and training stays bit-identical."""

from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable

import pytest
import torch
from torch import nn

import stepaudit

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
STEPS = 6
TIMEOUT_S = 60


def _data(rank: int, step: int, rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's batch at step t, the same in every process (its own generator)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(rows, 5, generator=g)
    return x, x[:, :3].argmax(1)  # a label the inputs carry: the ranks' gradients share a direction


def _model(batchnorm: bool) -> nn.Module:
    """With BatchNorm also dropout (the bit-identity test); without, a deterministic MLP (the oracle test)."""
    torch.manual_seed(0)
    if batchnorm:
        return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _wrap(model: nn.Module, wrap: str) -> tuple[nn.Module, nn.Module]:
    """(what the loop calls, the module holding the parameters): DDP, or FSDP2's fully_shard per layer."""
    if wrap == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        return ddp, ddp.module
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model, model


def _train(
    rank: int,
    folder: str,
    audited: bool,
    batchnorm: bool,
    optimizer: str,
    probes: dict | None,
    wrap: str = "ddp",
    probe_options: dict | list | None = None,
    forward_hvps: bool = False,
    use_step: bool = False,
    clip: float | None = None,
) -> dict:
    """One rank's run: DDP (or FSDP2) over gloo, SGD-momentum or Adam, dropout; what it ends with.

    ``probe_options``: one dict for all ranks or a list (rank r's at index r); ``forward_hvps``: the
    HVP method forced to forward-over-reverse (the audit's measured choice preset)."""
    ddp, inner = _wrap(_model(batchnorm), wrap)
    opt = (
        torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(ddp.parameters(), lr=1e-2)
    )
    options = probe_options[rank] if isinstance(probe_options, list) else probe_options
    audit = (
        stepaudit.Audit(ddp, opt, loss_fn, run=os.path.join(folder, "run"), probes=probes, probe_options=options)
        if audited
        else None
    )
    if forward_hvps:
        audit.memory["_hvp_method"] = {"method": "forward"}
    torch.manual_seed(100 + rank)
    weights = []
    for step in range(STEPS):
        batch = _data(rank, step)
        weights.append([_full(p.detach()).clone() for p in inner.parameters()])
        if audited and use_step:  # audit.step trains through the DDP wrapper as the user's own loop does
            audit.step(batch)
            continue
        with audit.watch(batch) if audited else _Nothing():
            opt.zero_grad()
            loss_fn(ddp, batch).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
            opt.step()
    weights.append([_full(p.detach()).clone() for p in inner.parameters()])
    records = []
    if audit is not None:
        records = [{k: v for k, v in r.items() if k != "layers"} for r in audit.records]
        audit.close()
    return {
        "params": [_full(p.detach()).clone() for p in ddp.parameters()],
        "buffers": [_full(b).clone() for b in ddp.buffers()],
        "state": [
            {k: _full(v).clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for s in opt.state.values()
        ],
        "rng": torch.get_rng_state(),
        "weights": weights,
        "records": records,
    }


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _worker(rank: int, folder: str, queue, kwargs: dict) -> None:
    try:
        timeout = datetime.timedelta(seconds=kwargs.pop("timeout_s", TIMEOUT_S))
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD, timeout=timeout
        )
        torch.set_num_threads(1)
        result = _train(rank, folder, **kwargs)
        torch.distributed.destroy_process_group()
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
        queue.put((rank, None))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def run_ranks(tmp_path, **kwargs) -> list[dict]:
    """Both ranks' results; a rank that fails or hangs fails the test with its traceback."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(tmp_path), queue, kwargs)) for r in range(WORLD)]
    for p in procs:
        p.start()
    errors = []
    try:
        for _ in range(WORLD):
            rank, error = queue.get(timeout=TIMEOUT_S + 30)
            if error:
                errors.append(f"rank {rank}:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Callable[[str, str], list[dict]]:
    """The unaudited BatchNorm + dropout run of (optimizer, wrap), made once per module and shared by the tests."""
    runs: dict = {}

    def run(optimizer: str, wrap: str) -> list[dict]:
        if (optimizer, wrap) not in runs:
            folder = tmp_path_factory.mktemp(f"plain-{optimizer}-{wrap}")
            runs[optimizer, wrap] = run_ranks(
                folder, audited=False, batchnorm=True, optimizer=optimizer, probes=None, wrap=wrap
            )
        return runs[optimizer, wrap]

    return run


@pytest.mark.parametrize(
    "optimizer, wrap, probes, use_step",
    [
        ("sgd", "ddp", {"sharpness": 2, "noise": 3}, False),
        ("adam", "ddp", None, True),
        ("adam", "fsdp2", {"sharpness": 2}, False),
    ],
)
def test_batchnorm_and_dropout_train_bit_identically_under_the_audit(
    tmp_path, plain_run, optimizer, wrap, probes, use_step
):
    """Weights, buffers, optimizer state and RNG after the audited run equal the plain run's on every rank;
    probes run on each rank's batch under DDP (labelled), and are recorded as not measured under FSDP2."""
    plain = plain_run(optimizer, wrap)
    audited = run_ranks(
        tmp_path / "audited",
        audited=True,
        batchnorm=True,
        optimizer=optimizer,
        probes=probes,
        wrap=wrap,
        use_step=use_step,
    )
    for rank in range(WORLD):
        a, b = plain[rank], audited[rank]
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), f"rank {rank}: weights differ"
        assert all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"])), f"rank {rank}: buffers differ"
        for sa, sb in zip(a["state"], b["state"]):
            assert sa.keys() == sb.keys() and all(
                torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa
            )
        assert torch.equal(a["rng"], b["rng"]), f"rank {rank}: the RNG stream moved"
    assert len(audited[0]["records"]) == STEPS
    for rank in range(WORLD):
        records = audited[rank]["records"]
        assert not [r for r in records if r["verdict"] == "error"], records[0].get("error")
        if probes and wrap == "ddp":
            assert all(math.isfinite(r["sharpness"]) and r["probe_scope"] == "rank" for r in records[::2])
            assert not any(r.get("probe_errors") for r in records)
        elif probes:
            assert all(
                "FSDP2" in r["probe_errors"]["sharpness"]
                and "DistributedDataParallel" in r["probe_errors"]["sharpness"]
                for r in records[::2]
            )


def _oracle(weights: list[torch.Tensor], rank: int, step: int) -> tuple[float, list[torch.Tensor]]:
    """Rank r's batch loss and its gradient at the given weights, on a fresh float64 copy of the model."""
    model = _model(batchnorm=False).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w.double())
    x, y = _data(rank, step)
    loss = loss_fn(model, (x.double(), y))
    return float(loss.detach()), list(torch.autograd.grad(loss, list(model.parameters())))


def _dense_sharpness(weights: list[torch.Tensor], step: int, ranks: list[int]) -> float:
    """λ_max of the float64 Hessian of the mean loss over the given ranks' batches (eigvalsh of the dense matrix)."""
    model = _model(batchnorm=False).double()
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([w.double().reshape(-1) for w in weights])

    def mean_loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, [w.numel() for w in weights])
        params = {n: p.reshape(w.shape) for n, p, w in zip(names, pieces, weights)}
        call = lambda x: torch.func.functional_call(model, params, (x,))  # noqa: E731
        return sum(loss_fn(call, (_data(r, step)[0].double(), _data(r, step)[1])) for r in ranks) / len(ranks)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, flat))[-1])


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_records_describe_the_global_objective_on_every_rank(tmp_path, wrap):
    """loss before/after = the mean of the ranks' batch losses and first_order = ḡ·Δw, all recomputed in
    float64 from the saved weights; identical on both ranks; each rank keeps its own values as local_*.
    Under FSDP2 each rank holds half of each layer: the sums over shards are completed across ranks.
    Under DDP, global sharpness = λ_max of the dense float64 Hessian of the mean loss over both batches."""
    probes, options = (
        ({"sharpness": 2}, {"sharpness": {"scope": "global", "tol": 1e-6}}) if wrap == "ddp" else (None, None)
    )
    ranks = run_ranks(
        tmp_path, audited=True, batchnorm=False, optimizer="sgd", probes=probes, wrap=wrap, probe_options=options
    )
    r0, r1 = (r["records"] for r in ranks)
    weights = ranks[0]["weights"]
    assert len(r0) == len(r1) == STEPS
    for step, (a, b) in enumerate(zip(r0, r1)):
        assert a["world_size"] == b["world_size"] == WORLD and (a["rank"], b["rank"]) == (0, 1)
        for key in ("loss_before", "loss_after", "delta", "first_order", "remainder", "verdict", "alpha"):
            assert a.get(key) == b.get(key), f"step {step}: {key} differs between ranks"
        before = [_oracle(weights[step], r, step) for r in range(WORLD)]
        after = [_oracle(weights[step + 1], r, step)[0] for r in range(WORLD)]
        assert a["loss_before"] == pytest.approx(sum(v for v, _ in before) / WORLD, rel=1e-5)
        assert a["loss_after"] == pytest.approx(sum(after) / WORLD, rel=1e-5)
        assert (a["local_loss_before"], b["local_loss_before"]) == pytest.approx([v for v, _ in before], rel=1e-5)
        mean_grad = [(g0 + g1) / WORLD for g0, g1 in zip(before[0][1], before[1][1])]
        promise = sum(
            float((g * (w1.double() - w0.double())).sum())
            for g, w0, w1 in zip(mean_grad, weights[step], weights[step + 1])
        )
        assert a["first_order"] == pytest.approx(promise, rel=1e-4)
        assert a["delta"] == pytest.approx(a["loss_after"] - a["loss_before"], rel=1e-9, abs=1e-12)
        norm = math.sqrt(
            sum(float(((w1.double() - w0.double()) ** 2).sum()) for w0, w1 in zip(weights[step], weights[step + 1]))
        )
        assert a["update_norm"] == pytest.approx(norm, rel=1e-4) and a["update_norm"] == b["update_norm"]
        assert a["global_batch"] == b["global_batch"] == 2 * 12
        if wrap == "ddp":  # the post-accumulate-grad hook saw this rank's own gradient, not DDP's average
            for record, (_, grads) in zip((a, b), before):
                local = math.sqrt(sum(float((g * g).sum()) for g in grads))
                assert record["local_grad_norm"] == pytest.approx(local, rel=1e-5)
            assert a["local_grad_norm"] != pytest.approx(b["local_grad_norm"], rel=1e-3)
            _check_noise_scale_ranks(a, b)
            if step % 2 == 0:
                _check_global_sharpness(a, b, weights[step], step)
        else:  # FSDP2 shards the gradient: no local gradient is read, no field is written
            assert "noise_scale_ranks" not in a and "local_grad_norm" not in a
    for w0, w1 in zip(ranks[0]["weights"][-1], ranks[1]["weights"][-1]):
        assert torch.equal(w0, w1)  # DDP kept the replicas equal


def _check_global_sharpness(a: dict, b: dict, weights: list[torch.Tensor], step: int) -> None:
    """The same λ_max on both ranks, of the global-batch Hessian and not of either rank's own."""
    assert a["sharpness_scope"] == b["sharpness_scope"] == "global" and not a.get("probe_errors")
    assert a["sharpness"] == b["sharpness"] and a["sharpness_hvps"] == b["sharpness_hvps"]
    expected = _dense_sharpness(weights, step, [0, 1])
    assert a["sharpness"] == pytest.approx(expected, rel=1e-4)
    for rank in range(WORLD):  # the test can tell the global Hessian from a rank's own
        assert _dense_sharpness(weights, step, [rank]) != pytest.approx(expected, rel=1e-3)


def test_global_sharpness_with_batchnorm_forward_hvps_and_disagreeing_ranks_never_deadlocks(tmp_path, plain_run):
    """Forward-over-reverse HVPs through BatchNorm, and ranks whose own stopping tests disagree (tol 1e-1 on
    rank 0, 1e-9 on rank 1): the agreed stop keeps them in lockstep under a 10 s process-group timeout,
    and training stays bit-identical to the unaudited run."""
    options = [{"sharpness": {"scope": "global", "tol": tol}} for tol in (1e-1, 1e-9)]
    plain = plain_run("sgd", "ddp")
    audited = run_ranks(
        tmp_path,
        audited=True,
        batchnorm=True,
        optimizer="sgd",
        probes={"sharpness": 1},
        probe_options=options,
        forward_hvps=True,
        timeout_s=10,
    )
    for a, b in zip(plain, audited):
        assert all(torch.equal(x, y) for x, y in zip(a["params"] + a["buffers"], b["params"] + b["buffers"]))
        assert torch.equal(a["rng"], b["rng"])
    r0, r1 = (r["records"] for r in audited)
    for a, b in zip(r0, r1):
        assert a["hvp_method"] == b["hvp_method"] == "forward-over-reverse", a.get("probe_errors")
        assert a["sharpness"] == b["sharpness"] and math.isfinite(a["sharpness"])
        assert a["sharpness_hvps"] == b["sharpness_hvps"] < 40  # rank 0's test stopped both


def _check_noise_scale_ranks(a: dict, b: dict) -> None:
    """B_simple of the two-batch estimator written out here: small batch 12 (each rank), big batch 24 (ḡ)."""
    assert a["noise_scale_ranks"] == b["noise_scale_ranks"] and math.isfinite(a["noise_scale_ranks"])
    assert a["noise_scale_ranks_stderr"] == b["noise_scale_ranks_stderr"]
    small = (a["local_grad_norm"] ** 2 + b["local_grad_norm"] ** 2) / 2
    big = a["grad_norm"] ** 2
    signal = (24 * big - 12 * small) / (24 - 12)
    trace = (small - big) / (1 / 12 - 1 / 24)
    assert a["noise_signal_ranks"] == pytest.approx(signal, rel=1e-6)
    assert a["noise_trace_ranks"] == pytest.approx(trace, rel=1e-6)
    assert a["noise_scale_ranks"] == pytest.approx(trace / signal, rel=1e-6)


def test_an_accelerate_prepared_optimizer_is_audited_and_training_unchanged(tmp_path):
    """Accelerate's AcceleratedOptimizer (one process): audited through the torch optimizer it wraps."""
    accelerate = pytest.importorskip("accelerate")

    def fit(audited: bool):
        accelerator = accelerate.Accelerator(cpu=True)
        model = _model(batchnorm=True)
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        assert type(opt).__name__ == "AcceleratedOptimizer"
        audit = stepaudit.Audit(model, opt, loss_fn, run=tmp_path / f"run{audited}") if audited else None
        torch.manual_seed(5)
        for step in range(4):
            batch = _data(0, step)
            with audit.watch(batch) if audited else _Nothing():
                opt.zero_grad()
                accelerator.backward(loss_fn(model, batch))
                opt.step()
        records = list(audit.records) if audited else []
        if audited:
            audit.close()
        return [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()], records

    plain_w, plain_b, _ = fit(False)
    audited_w, audited_b, records = fit(True)
    assert type(records) is list and len(records) == 4 and all(r["verdict"] != "error" for r in records)
    assert all(torch.equal(a, b) for a, b in zip(plain_w + plain_b, audited_w + audited_b))


def _fsdp1_messages(folder: str, queue) -> None:
    """In a child process (a process group in the test process would be inherited by later forks): the
    messages Audit gives for FSDP1, outermost and nested."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist = torch.distributed
    messages = []
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        cpu = torch.device("cpu")  # FSDP1 wants an accelerator unless told the device
        for model in (
            FullyShardedDataParallel(_model(False), device_id=cpu),
            nn.Sequential(FullyShardedDataParallel(nn.Linear(5, 3), device_id=cpu)),
        ):
            try:
                stepaudit.Audit(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, run=f"{folder}/run")
                messages.append(None)
            except ValueError as error:
                messages.append(str(error))
        dist.destroy_process_group()
        queue.put(messages)
    except BaseException:
        queue.put([traceback.format_exc()])


def test_fsdp1_is_refused_up_front_naming_what_works(tmp_path):
    """FullyShardedDataParallel (FSDP1), outermost or nested: a one-line ValueError naming fully_shard and DDP."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_fsdp1_messages, args=(str(tmp_path), queue))
    child.start()
    try:
        messages = queue.get(timeout=TIMEOUT_S)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert len(messages) == 2, messages
    for message in messages:
        assert message is not None and "FSDP1" in message, message
        assert "\n" not in message and "fully_shard" in message and "DistributedDataParallel" in message


def test_noise_scale_ranks_reads_the_gradient_before_clipping_changes_it(tmp_path):
    """With clip_grad_norm_ between backward and step, B_simple still comes from the gradients the backward made:
    at step 0 it equals the two-batch formula on each rank's float64 gradient recomputed from the start weights."""
    ranks = run_ranks(tmp_path, audited=True, batchnorm=False, optimizer="sgd", probes=None, clip=0.01)
    record = ranks[0]["records"][0]
    assert record["grad_norm"] == pytest.approx(0.01, rel=1e-4)  # the optimizer did get the clipped gradient
    grads = [_oracle(ranks[0]["weights"][0], r, 0)[1] for r in range(WORLD)]
    small = sum(sum(float((g * g).sum()) for g in rank) for rank in grads) / WORLD
    big = sum(float((((a + b) / 2) ** 2).sum()) for a, b in zip(*grads))
    signal = (24 * big - 12 * small) / (24 - 12)
    trace = (small - big) / (1 / 12 - 1 / 24)
    assert record["noise_scale_ranks"] == pytest.approx(trace / signal, rel=1e-4)
    assert ranks[1]["records"][0]["noise_scale_ranks"] == record["noise_scale_ranks"]

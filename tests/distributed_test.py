"""Two processes (gloo, CPU, fork): the audited objective is the global one and training stays bit-identical."""
from __future__ import annotations

import math
import multiprocessing
import os
import sys
import traceback

import pytest
import torch
from torch import nn

import stepaudit

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                                reason="fork-started gloo process groups need Linux and torch.distributed")
WORLD = 2
STEPS = 6
TIMEOUT_S = 60


def _data(rank: int, step: int, rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's batch at step t, the same in every process (its own generator)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, 5, generator=g), torch.randint(0, 3, (rows,), generator=g)


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


def _train(rank: int, folder: str, audited: bool, batchnorm: bool, optimizer: str, probes: dict | None,
           wrap: str = "ddp") -> dict:
    """One rank's run: DDP (or FSDP2) over gloo, SGD-momentum or Adam, dropout; what it ends with."""
    ddp, inner = _wrap(_model(batchnorm), wrap)
    opt = (torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(ddp.parameters(), lr=1e-2))
    audit = stepaudit.Audit(ddp, opt, loss_fn, run=os.path.join(folder, "run"), probes=probes) if audited else None
    torch.manual_seed(100 + rank)
    weights = []
    for step in range(STEPS):
        batch = _data(rank, step)
        weights.append([_full(p.detach()).clone() for p in inner.parameters()])
        block = audit.watch(batch) if audited else _Nothing()
        with block:
            opt.zero_grad()
            loss_fn(ddp, batch).backward()
            opt.step()
    weights.append([_full(p.detach()).clone() for p in inner.parameters()])
    records = []
    if audit is not None:
        records = [{k: v for k, v in r.items() if k != "layers"} for r in audit.records]
        audit.close()
    return {"params": [_full(p.detach()).clone() for p in ddp.parameters()],
            "buffers": [_full(b).clone() for b in ddp.buffers()],
            "state": [{k: _full(v).clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for s in opt.state.values()],
            "rng": torch.get_rng_state(), "weights": weights, "records": records}


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _worker(rank: int, folder: str, queue, kwargs: dict) -> None:
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                                             world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=TIMEOUT_S))
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


@pytest.mark.parametrize("optimizer, wrap, probes", [
    ("sgd", "ddp", {"sharpness": 2, "noise": 3}), ("adam", "ddp", None), ("adam", "fsdp2", {"sharpness": 2})])
def test_batchnorm_and_dropout_train_bit_identically_under_the_audit(tmp_path, optimizer, wrap, probes):
    """Weights, buffers, optimizer state and RNG after the audited run equal the plain run's on every rank;
    probes run on each rank's batch under DDP (labelled), and are recorded as not measured under FSDP2."""
    plain = run_ranks(tmp_path / "plain", audited=False, batchnorm=True, optimizer=optimizer, probes=None, wrap=wrap)
    audited = run_ranks(tmp_path / "audited", audited=True, batchnorm=True, optimizer=optimizer, probes=probes,
                        wrap=wrap)
    for rank in range(WORLD):
        a, b = plain[rank], audited[rank]
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), f"rank {rank}: weights differ"
        assert all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"])), f"rank {rank}: buffers differ"
        for sa, sb in zip(a["state"], b["state"]):
            assert sa.keys() == sb.keys() and all(
                torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
        assert torch.equal(a["rng"], b["rng"]), f"rank {rank}: the RNG stream moved"
    assert len(audited[0]["records"]) == STEPS
    for rank in range(WORLD):
        records = audited[rank]["records"]
        assert not [r for r in records if r["verdict"] == "error"], records[0].get("error")
        if probes and wrap == "ddp":
            assert all(math.isfinite(r["sharpness"]) and r["probe_scope"] == "rank" for r in records[::2])
            assert not any(r.get("probe_errors") for r in records)
        elif probes:
            assert all("FSDP2" in r["probe_errors"]["sharpness"] for r in records[::2])


def _oracle(weights: list[torch.Tensor], rank: int, step: int) -> tuple[float, list[torch.Tensor]]:
    """Rank r's batch loss and its gradient at the given weights, on a fresh float64 copy of the model."""
    model = _model(batchnorm=False).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w.double())
    x, y = _data(rank, step)
    loss = loss_fn(model, (x.double(), y))
    return float(loss.detach()), list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_records_describe_the_global_objective_on_every_rank(tmp_path, wrap):
    """loss before/after = the mean of the ranks' batch losses and first_order = ḡ·Δw, all recomputed in
    float64 from the saved weights; identical on both ranks; each rank keeps its own values as local_*.
    Under FSDP2 each rank holds half of each layer: the sums over shards are completed across ranks."""
    ranks = run_ranks(tmp_path, audited=True, batchnorm=False, optimizer="sgd", probes=None, wrap=wrap)
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
        promise = sum(float((g * (w1.double() - w0.double())).sum())
                      for g, w0, w1 in zip(mean_grad, weights[step], weights[step + 1]))
        assert a["first_order"] == pytest.approx(promise, rel=1e-4)
        assert a["delta"] == pytest.approx(a["loss_after"] - a["loss_before"], rel=1e-9, abs=1e-12)
        norm = math.sqrt(sum(float(((w1.double() - w0.double()) ** 2).sum())
                             for w0, w1 in zip(weights[step], weights[step + 1])))
        assert a["update_norm"] == pytest.approx(norm, rel=1e-4) and a["update_norm"] == b["update_norm"]
    for w0, w1 in zip(ranks[0]["weights"][-1], ranks[1]["weights"][-1]):
        assert torch.equal(w0, w1)  # DDP kept the replicas equal


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

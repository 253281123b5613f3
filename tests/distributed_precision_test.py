"""Two processes (gloo, CPU, fork): ``precision="float64"`` is exact under DDP and refused up front under FSDP2."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import traceback

import pytest
import torch
from torch import nn

import stepaudit
from stepaudit.precision import refuse_float64_sharded

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
STEPS = 3
TIMEOUT_S = 20


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(12, 5, generator=g)
    return x, x[:, :3].argmax(1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _wrapped(wrap: str) -> nn.Module:
    model = _model()
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def _run(rank: int, folder: str, wrap: str) -> dict:
    """What ``precision="float64"`` does with this wrapper: the refusal, or the records and the weights."""
    model = _wrapped(wrap)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outcome: dict = {"function": None, "construction": None, "records": [], "weights": []}
    try:
        refuse_float64_sharded(model, "float64")
    except ValueError as error:
        outcome["function"] = str(error)
    try:
        audit = stepaudit.Audit(model, opt, loss_fn, run=os.path.join(folder, wrap), precision="float64")
    except ValueError as error:
        outcome["construction"] = str(error)
        return outcome
    inner = model.module if wrap == "ddp" else model
    for step in range(STEPS):
        outcome["weights"].append([p.detach().clone() for p in inner.parameters()] if wrap == "ddp" else [])
        audit.step(_data(rank, step))
    outcome["weights"].append([p.detach().clone() for p in inner.parameters()] if wrap == "ddp" else [])
    outcome["records"] = [{k: v for k, v in r.items() if k != "layers"} for r in audit.records]
    audit.close()
    return outcome


def _worker(rank: int, folder: str, queue) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        torch.set_num_threads(1)
        outcomes = {wrap: _run(rank, folder, wrap) for wrap in ("fsdp2", "ddp")}
        torch.distributed.destroy_process_group()
        torch.save(outcomes, os.path.join(folder, f"outcome{rank}.pt"))
        queue.put((rank, None))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
    """Each rank's outcome under FSDP2 and under DDP (one pair of processes; a hang fails at the timeout)."""
    folder = tmp_path_factory.mktemp("precision")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(folder), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    errors = []
    try:
        for _ in range(WORLD):
            rank, error = queue.get(timeout=TIMEOUT_S * 3)
            if error:
                errors.append(f"rank {rank}:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return [torch.load(folder / f"outcome{r}.pt", weights_only=False) for r in range(WORLD)]


def _one_line_naming_what_works(message: str | None) -> None:
    assert message is not None and "\n" not in message, message
    for words in ("float64", "fully_shard", "precision=None", "DistributedDataParallel"):
        assert words in message, message


def test_refusal_names_what_works_and_spares_ddp(outcomes):
    """``refuse_float64_sharded``: a one-line ValueError for an FSDP2 model on each rank, nothing for DDP."""
    for rank in outcomes:
        _one_line_naming_what_works(rank["fsdp2"]["function"])
        assert rank["ddp"]["function"] is None


def test_fsdp2_float64_never_hangs_and_fails_in_one_line(outcomes):
    """Refused at construction, or (until audit.py calls the refusal) every step an error record of one line on
    both ranks; either way both processes finished under the process-group timeout."""
    for rank in outcomes:
        fsdp2 = rank["fsdp2"]
        if fsdp2["construction"] is None:
            assert len(fsdp2["records"]) == STEPS
            assert all(r["verdict"] == "error" and "\n" not in r["error"] for r in fsdp2["records"])


def test_fsdp2_float64_is_refused_at_construction(outcomes):
    """``Audit(fully_shard model, precision="float64")`` raises the one-line message on every rank."""
    for rank in outcomes:
        _one_line_naming_what_works(rank["fsdp2"]["construction"])


def _float64_loss(weights: list[torch.Tensor], step: int) -> float:
    """The mean over both ranks of the batch loss at ``weights``, all in float64 on a fresh copy of the model."""
    model = _model().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w.double())
    with torch.no_grad():
        losses = [float(loss_fn(model, (_data(r, step)[0].double(), _data(r, step)[1]))) for r in range(WORLD)]
    return sum(losses) / WORLD


def test_float64_under_ddp_gives_the_float64_global_losses(outcomes):
    """DDP, the wrapper the refusal points to: loss_before/after equal the float64 mean of the ranks' losses at the
    saved weights to 1e-12, on both ranks (a float32 evaluation would be off by ~1e-7)."""
    r0, r1 = (rank["ddp"] for rank in outcomes)
    assert r0["construction"] is None and len(r0["records"]) == len(r1["records"]) == STEPS
    for step, (a, b) in enumerate(zip(r0["records"], r1["records"])):
        assert a["noise_method"] == "float64" and a["verdict"] != "error", a.get("error")
        assert (a["loss_before"], a["loss_after"]) == (b["loss_before"], b["loss_after"])
        before = _float64_loss(r0["weights"][step], step)
        after = _float64_loss(r0["weights"][step + 1], step)
        assert a["loss_before"] == pytest.approx(before, rel=1e-12, abs=0)
        assert a["loss_after"] == pytest.approx(after, rel=1e-12, abs=0)

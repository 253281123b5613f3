"""Two processes (gloo, CPU, fork): the per-sample noise probe reads DDP's training pass and stays exact."""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import os
import sys
import traceback

import pytest
import torch
from torch import nn

import stepaudit

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
STEPS = 3
ROWS = 12
GROUPS = 8  # the probe's default jackknife groups
TIMEOUT_S = 20


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(ROWS, 5, generator=g)
    return x, x[:, :3].argmax(1)


def _model() -> nn.Module:
    """Linear, eval-mode BatchNorm (buffers DDP broadcasts, a per-example identity of its own), Tanh, Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model[1].eval()
    return model


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _run(rank: int, folder: str, name: str, audited: bool, bucket_view: bool, scaled: bool = False) -> dict:
    """STEPS DDP steps with SGD-momentum: the end state, the weights before each step, the records."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    audit = stepaudit.Audit(ddp, opt, loss_fn, run=os.path.join(folder, name), probes={"noise": 1}) if audited else None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    torch.manual_seed(100 + rank)
    weights = []
    for step in range(STEPS):
        weights.append([p.detach().clone() for p in model.parameters()])
        batch = _data(rank, step)
        with audit.watch(batch) if audit is not None else contextlib.nullcontext():
            opt.zero_grad()
            loss = loss_fn(ddp, batch)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    records = []
    if audit is not None:
        records = [{k: v for k, v in r.items() if k != "layers"} for r in audit.records]
        audit.close()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "state": [{k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()],
        "rng": torch.get_rng_state(),
        "weights": weights,
        "records": records,
    }


def _worker(rank: int, folder: str, queue, bucket_view: bool) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        torch.set_num_threads(1)
        runs = {
            "plain": _run(rank, folder, "plain", False, bucket_view),
            "audited": _run(rank, folder, "audited", True, bucket_view),
            "scaled": _run(rank, folder, "scaled", True, bucket_view, scaled=True),
        }
        torch.distributed.destroy_process_group()
        torch.save(runs, os.path.join(folder, f"runs{rank}.pt"))
        queue.put((rank, None))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module", params=[False, True], ids=["grad_copy", "bucket_view"])
def ranks(tmp_path_factory, request) -> list[dict]:
    """Each rank's plain, audited and GradScaler runs (one pair of processes), with DDP's gradient_as_bucket_view
    off and on (on, .grad is a view of the bucket that DDP's all-reduce overwrites)."""
    folder = tmp_path_factory.mktemp("persample")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(folder), queue, request.param)) for r in range(WORLD)]
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
    return [torch.load(folder / f"runs{r}.pt", weights_only=False) for r in range(WORLD)]


def _per_example_gradients(weights: list[torch.Tensor], rank: int, step: int) -> torch.Tensor:
    """[B, D]: each example's gradient of its own loss, one backward per example on a float64 copy of the model."""
    model = _model().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w.double())
    x, y = _data(rank, step)
    rows = []
    for i in range(ROWS):
        loss = loss_fn(model, (x[i : i + 1].double(), y[i : i + 1]))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def _statistics(g: torch.Tensor) -> tuple[float, float]:
    """(tr Σ̂, ‖G‖²̂) of per-example gradients: the unbiased sample trace and |mean|² − tr Σ̂/B."""
    size = g.shape[0]
    mean = g.mean(0)
    trace = float(((g - mean) ** 2).sum()) / (size - 1)
    return trace, float(mean @ mean) - trace / size


def _expected(g: torch.Tensor) -> dict:
    """Point estimates and delete-one-group jackknife errors over GROUPS consecutive groups of examples."""
    trace, signal = _statistics(g)
    group_of = torch.arange(ROWS) * GROUPS // ROWS
    leave_out = [_statistics(g[group_of != k]) for k in range(GROUPS)]
    errors = []
    for column in zip(*leave_out):
        values = torch.tensor(column, dtype=torch.float64)
        errors.append(math.sqrt((GROUPS - 1) / GROUPS * float(((values - values.mean()) ** 2).sum())))
    return {
        "trace_sigma": trace,
        "grad_sq_norm": signal,
        "noise_scale": trace / signal,
        "grad_snr": ROWS * signal / trace,
        "trace_sigma_stderr": errors[0],
        "grad_sq_norm_stderr": errors[1],
    }


def test_ddp_noise_probe_reads_the_training_pass_and_matches_a_per_example_loop(ranks):
    """noise_pass "training" on every step of both ranks; each rank's fields are those of its own batch's
    per-example gradients (float64 loop at the saved weights), not of the other rank's batch."""
    for rank, runs in enumerate(ranks):
        for step, record in enumerate(runs["audited"]["records"]):
            assert record["noise_pass"] == "training" and record["noise_engine"] == "hooks", record
            assert record["probe_scope"] == "rank" and not record.get("probe_errors")
            expected = _expected(_per_example_gradients(runs["audited"]["weights"][step], rank, step))
            for key, value in expected.items():
                assert record[key] == pytest.approx(value, rel=1e-4), f"rank {rank}, step {step}: {key}"
            other = _expected(_per_example_gradients(runs["audited"]["weights"][step], 1 - rank, step))
            assert record["trace_sigma"] != pytest.approx(other["trace_sigma"], rel=1e-3)


def test_ddp_noise_probe_leaves_training_bit_identical(ranks):
    """Weights, buffers, momentum and the RNG after the audited run equal the plain run's on both ranks."""
    for runs in ranks:
        plain, audited = runs["plain"], runs["audited"]
        assert all(torch.equal(a, b) for a, b in zip(plain["params"], audited["params"]))
        assert all(torch.equal(a, b) for a, b in zip(plain["buffers"], audited["buffers"]))
        for a, b in zip(plain["state"], audited["state"]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(plain["rng"], audited["rng"])


def test_loss_scaling_under_ddp_replays_and_stays_exact(ranks):
    """GradScaler (scale 1024): the backward left 1024·g_r, and the optimizer receives ḡ unscaled, so |ḡ|² at the
    end of the backward is not |grad|²: the probe replays the pass (noise_pass "replay"), and its fields are those
    of the unscaled per-example gradients (read off the scaled pass they would be 1024² times too large)."""
    for rank, runs in enumerate(ranks):
        for step, record in enumerate(runs["scaled"]["records"]):
            assert record["noise_pass"] == "replay" and record["verdict"] != "error", record
            expected = _expected(_per_example_gradients(runs["scaled"]["weights"][step], rank, step))
            assert record["trace_sigma"] == pytest.approx(expected["trace_sigma"], rel=1e-4)
            assert record["grad_sq_norm"] == pytest.approx(expected["grad_sq_norm"], rel=1e-4)

"""``strict=True`` under two processes (gloo, CPU, fork): an audit failure on one rank raises on every rank, no hang."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import time
import traceback

import pytest
import torch
from torch import nn

import stepaudit
from stepaudit import capture as capture_module
from stepaudit.faults import AuditError

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
FAILING_RANK, FAILING_STEP = 1, 2
PG_TIMEOUT_S = 10  # a rank left waiting in a collective would fail here, not hang the suite


def _loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _worker(rank: int, folder: str, where: str, queue) -> None:
    """Train 5 DDP steps with strict=True; rank 1's audit fails at step 2 (``where``: before or after the update)."""
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
        )
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        current = {"step": 0, "calls": 0}

        def failing_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
            """The audit's own evaluations of a step after the first: the loss before (1st call), after (2nd)."""
            current["calls"] += 1
            nth = {"before": 1, "after": 2}.get(where)
            if rank == FAILING_RANK and current["step"] == FAILING_STEP and current["calls"] == nth:
                raise RuntimeError(f"injected failure {where} the update")
            return _loss(model, batch)

        probes = None
        if where == "capture":  # a probe's capture of the training pass fails to start (in begin, before the forward)
            start_for = capture_module.probe_registry.capture_for

            def failing_capture_for(name: str):
                start = start_for(name)

                def failing_start(*args, **kwargs):
                    if rank == FAILING_RANK and current["step"] == FAILING_STEP:
                        raise RuntimeError("injected failure starting a capture")
                    return start(*args, **kwargs) if start is not None else None

                return failing_start

            capture_module.probe_registry.capture_for = failing_capture_for  # this forked child's only
            probes = {"noise": 1}
        audit = stepaudit.Audit(
            ddp, optimizer, failing_loss, run=os.path.join(folder, "run"), strict=True, probes=probes
        )
        if where == "sink":  # a sink (TensorBoard, a full disk) fails after the step's all-reduce

            def failing_sink(record: dict) -> None:
                if rank == FAILING_RANK and record["step"] == FAILING_STEP:
                    raise OSError("injected failure writing")

            audit.add_sink(failing_sink)
        g = torch.Generator().manual_seed(rank)
        raised, started = None, time.monotonic()
        for step in range(5):
            x = torch.randn(6, 4, generator=g)
            batch = (x, x[:, :3].argmax(1))
            current.update(step=step, calls=0)
            try:
                with audit.watch(batch):
                    optimizer.zero_grad()
                    _loss(ddp, batch).backward()
                    optimizer.step()
            except AuditError as error:
                raised = (step, str(error))
                break
        records = [(r["step"], r["verdict"], r.get("error")) for r in audit.records]
        audit.close()
        torch.distributed.destroy_process_group()
        queue.put((rank, {"raised": raised, "records": records, "seconds": time.monotonic() - started}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def _run(tmp_path, where: str) -> dict:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(tmp_path), where, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(WORLD):
            rank, result = queue.get(timeout=PG_TIMEOUT_S + 40)
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, result in results.items():
        assert isinstance(result, dict), f"rank {rank}:\n{result}"
    return results


@pytest.mark.parametrize("where", ["before", "after", "capture", "sink"])
def test_a_failure_on_one_rank_raises_on_every_rank_at_the_same_step(tmp_path, where):
    """Both ranks raise AuditError at the same step, well inside the process-group timeout: at step 2 for a
    failure before or after the update or starting a capture; at step 3 for a failed write of step 2 (it
    happens after step 2's all-reduce). The failing rank's message names its own error, the other's says how
    many ranks failed; every step up to the raising one is kept."""
    results = _run(tmp_path, where)
    at = FAILING_STEP + 1 if where == "sink" else FAILING_STEP
    own = {
        "before": "injected failure before the update",
        "after": "injected failure after the update",
        "capture": "injected failure starting a capture",
        "sink": "writing step 2 failed: injected failure writing",
    }[where]
    for rank in range(WORLD):
        raised, records = results[rank]["raised"], results[rank]["records"]
        assert raised is not None and raised[0] == at, f"rank {rank} did not raise at step {at}: {raised}"
        assert results[rank]["seconds"] < PG_TIMEOUT_S  # nobody waited for a peer that had left
        assert [s for s, _, _ in records] == list(range(at + 1))
        assert [v == "error" for _, v, _ in records] == [False] * at + [True]
        expected = own if rank == FAILING_RANK else "failed on 1 of 2 ranks"
        assert expected in raised[1] and "\n" not in raised[1]

"""One run folder per training run under two gloo processes (fork): rank 0 writes ``run``, rank 1 ``run/rank1``;
listings, ``stepaudit report``/``compare`` and ``open_run`` read that layout; the integrations' adapter places it."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import stepaudit
from stepaudit.distributed import rank_folder
from stepaudit.integrations.adapter import Adapter, run_folder
from stepaudit.report.cli import compare_main, main
from stepaudit.store import iter_runs

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD, STEPS, TIMEOUT_S = 2, 3, 60
GLOBAL = ("loss_before", "loss_after", "delta", "first_order", "verdict", "world_size", "global_batch")


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _steps(audit: stepaudit.Audit, ddp: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    for step in range(STEPS):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + rank))
        with audit.watch((x, x[:, :3].argmax(1))):
            opt.zero_grad()
            loss_fn(ddp, (x, x[:, :3].argmax(1))).backward()
            opt.step()
    audit.close()


def _worker(rank: int, folder: str, queue) -> None:
    """Rank r: a plain Audit, the adapter with the Trainer's rank, and the adapter with run=None (cwd: folder)."""
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        runs = {}
        audit = stepaudit.Audit(ddp, opt, loss_fn, run=Path(folder) / "runs" / "plain")
        _steps(audit, ddp, opt, rank)
        runs["plain"] = str(audit.run)
        adapter = Adapter({"run": Path(folder) / "runs" / "adapter", "every": 2})
        audit = adapter.start(ddp, opt, loss_fn, first_step=4, rank=rank, world_size=WORLD)
        _steps(audit, ddp, opt, rank)
        runs["adapter"] = str(audit.run)
        runs["steps"] = [r["step"] for r in audit.records]
        audit = Adapter({"name": "shared"}).start(ddp, opt, loss_fn, rank=rank, world_size=WORLD)
        _steps(audit, ddp, opt, rank)
        runs["new"] = str(audit.run)
        torch.distributed.destroy_process_group()
        queue.put((rank, runs))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict]:
    """Both ranks' run paths, made once (a folder under the module's tmp path, also their working directory)."""
    folder = tmp_path_factory.mktemp("ranks")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    here = os.getcwd()
    os.chdir(folder)  # run=None makes stepaudit-runs/<name> in the working directory the children inherit
    try:
        procs = [context.Process(target=_worker, args=(r, str(folder), queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=TIMEOUT_S + 30) for _ in range(WORLD))
    finally:
        os.chdir(here)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{v}" for r, v in results.items() if isinstance(v, str)]
    assert not errors, "\n".join(errors)
    return folder, results


def test_rank_folder_is_the_run_for_rank_0_and_a_folder_inside_it_for_the_others(tmp_path):
    assert rank_folder(tmp_path / "run", 0, 1) == rank_folder(tmp_path / "run", 0, 4) == tmp_path / "run"
    assert rank_folder(tmp_path / "run", 3, 4) == tmp_path / "run" / "rank3"
    assert run_folder(tmp_path / "run", 1, 2) == tmp_path / "run" / "rank1"  # no process group: the Trainer's rank
    assert run_folder(tmp_path / "run", 0, 2) == tmp_path / "run"
    assert run_folder(None, 1, 2) is None and run_folder(tmp_path / "run", 0, 1) == tmp_path / "run"


def test_one_run_folder_per_training_run_with_rank_1_inside_it(two_ranks):
    """Plain Audit and the adapter alike (no second suffix): rank 0's store is ``run``, rank 1's ``run/rank1``."""
    folder, results = two_ranks
    runs = folder / "runs"
    for key in ("plain", "adapter"):
        assert results[0][key] == str(runs / key) and results[1][key] == str(runs / key / "rank1")
    assert results[0]["steps"] == results[1]["steps"] == [4, 6]  # first_step from the framework, every=2
    assert sorted(p.name for p in runs.iterdir()) == ["adapter", "plain"]  # no run-rank<i> next to the run
    shared = Path(results[0]["new"])  # run=None: rank 0's new folder (in the working directory), told to rank 1
    assert shared == Path("stepaudit-runs", "shared") and Path(results[1]["new"]) == shared / "rank1"
    assert [p.name for p in (folder / "stepaudit-runs").iterdir()] == ["shared"]


def test_rank_0_holds_the_global_records_and_rank_1_the_same_with_its_own_local_fields(two_ranks):
    folder, _ = two_ranks
    run = folder / "runs" / "plain"
    r0 = stepaudit.load(run).to_dict("records")
    r1 = stepaudit.load(run / "rank1").to_dict("records")
    assert len(r0) == len(r1) == STEPS
    for a, b in zip(r0, r1):
        assert (a["rank"], b["rank"]) == (0, 1) and a["world_size"] == 2
        assert all(a[k] == b[k] for k in GLOBAL), [(k, a[k], b[k]) for k in GLOBAL if a[k] != b[k]]
        assert a["local_loss_before"] != b["local_loss_before"]
        assert a["loss_before"] == pytest.approx((a["local_loss_before"] + b["local_loss_before"]) / 2, rel=1e-6)


def test_listings_report_compare_and_open_run_read_the_layout(two_ranks, capsys):
    """A folder of runs lists each training run once (its rank folders are inside it, not runs of their own);
    report, compare and open_run take the run folder, or a rank's folder."""
    folder, _ = two_ranks
    runs = folder / "runs"
    assert iter_runs([runs]) == [runs / "adapter", runs / "plain"]
    assert iter_runs([runs / "plain"]) == [runs / "plain"]
    assert iter_runs([runs / "plain" / "rank1"]) == [runs / "plain" / "rank1"]
    assert main([str(runs / "plain")]) == 0 and (runs / "plain" / "report.html").exists()
    assert main([str(runs / "plain" / "rank1"), "--terminal"]) == 0
    capsys.readouterr()
    assert compare_main([str(runs), "-o", str(folder / "compare.html")]) == 0
    table = capsys.readouterr().out
    assert "adapter" in table and "plain" in table and "rank1" not in table
    assert compare_main([str(runs / "plain"), str(runs / "plain" / "rank1"), "--no-html"]) == 0
    opened = stepaudit.open_run(runs / "plain")
    assert len(opened.steps) == STEPS and opened.steps[0]["world_size"] == 2
    assert stepaudit.open_run(runs / "plain" / "rank1").steps[0]["rank"] == 1

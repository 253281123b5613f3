"""Two processes (gloo, CPU, fork): ``distributed.shared_new_run`` gives every rank the same new run folder."""

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
from stepaudit.distributed import shared_new_run

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
TIMEOUT_S = 20


def _shared_runs(folder: str) -> list[str]:
    return [str(shared_new_run("ddp", root=Path(folder) / "runs")) for _ in range(2)]


def _unwritable_root(folder: str) -> dict:
    """``shared_new_run`` whose root is a file: rank 0 cannot make the folder; what each rank raises."""
    (Path(folder) / "a-file").write_text("")
    try:
        shared_new_run("ddp", root=Path(folder) / "a-file")
    except OSError as error:
        return {"raised": f"OSError: {error}"}
    return {"raised": None}


def _audit_run_none(folder: str) -> dict:
    """``Audit(ddp, ..., run=None)`` in ``folder``: its run and the broadcasts its construction issued."""
    os.chdir(folder)  # this child's working directory: stepaudit-runs/ lands in the test's folder
    calls = []
    broadcast = torch.distributed.broadcast_object_list

    def counted(*args, **kwargs):
        calls.append(1)
        return broadcast(*args, **kwargs)

    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.distributed.broadcast_object_list = counted
    try:
        audit = stepaudit.Audit(ddp, opt, lambda m, b: m(b).square().mean())
    finally:
        torch.distributed.broadcast_object_list = broadcast
    audit.step(torch.ones(4, 3))
    audit.close()
    return {"run": str(audit.run), "broadcasts": len(calls)}


def _worker(rank: int, folder: str, queue, job) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        answer = job(folder)
        torch.distributed.destroy_process_group()
        queue.put((rank, answer))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def _on_two_ranks(tmp_path, job) -> dict:
    """Each rank's answer of ``job(folder)``; a rank that fails or hangs fails the test."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(tmp_path), queue, job)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        answers = dict(queue.get(timeout=TIMEOUT_S + 30) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not any(isinstance(a, str) for a in answers.values()), answers
    return answers


def test_ranks_get_one_new_folder_made_by_rank_zero(tmp_path):
    """Both ranks get the same path, which exists; a second call gives a second folder (``ddp-2``); one folder
    per call under the root, none made by rank 1."""
    answers = _on_two_ranks(tmp_path, _shared_runs)
    assert answers[0] == answers[1], answers
    root = tmp_path / "runs"
    assert answers[0] == [str(root / "ddp"), str(root / "ddp-2")]
    assert sorted(p.name for p in root.iterdir()) == ["ddp", "ddp-2"]


def test_a_folder_rank_zero_cannot_make_raises_on_every_rank_without_waiting(tmp_path):
    """Rank 0's failure travels with the broadcast: both ranks raise the same one-line OSError naming run=."""
    answers = _on_two_ranks(tmp_path, _unwritable_root)
    raised = answers[0]["raised"]
    assert answers[1]["raised"] == raised and raised.startswith("OSError: rank 0 could not make the run folder")
    assert "run=" in raised and "\n" not in raised


def test_audit_run_none_under_a_process_group_makes_one_run_folder(tmp_path):
    """``Audit(run=None)`` on two ranks: rank 0 in one new folder, rank 1 in its ``rank1`` folder; one
    ``broadcast_object_list`` at construction on each rank, and no other folder."""
    answers = _on_two_ranks(tmp_path, _audit_run_none)
    run = Path(answers[0]["run"])
    assert Path(answers[1]["run"]) == run / "rank1"
    assert [p.name for p in (tmp_path / "stepaudit-runs").iterdir()] == [run.name]
    assert answers[0]["broadcasts"] == answers[1]["broadcasts"] == 1


def test_without_a_process_group_it_is_a_new_folder(tmp_path):
    """One process: the folder ``store.new_run_dir`` would make, no collective."""
    assert shared_new_run("solo", root=tmp_path) == tmp_path / "solo"
    assert shared_new_run("solo", root=tmp_path) == tmp_path / "solo-2"

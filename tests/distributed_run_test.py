"""Two processes (gloo, CPU, fork): ``distributed.shared_new_run`` gives every rank the same new run folder."""

from __future__ import annotations

import datetime
import multiprocessing
import sys
import traceback
from pathlib import Path

import pytest
import torch

from stepaudit.distributed import shared_new_run

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not torch.distributed.is_available(),
    reason="fork-started gloo process groups need Linux and torch.distributed",
)
WORLD = 2
TIMEOUT_S = 20


def _worker(rank: int, folder: str, queue) -> None:
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        runs = [str(shared_new_run("ddp", root=Path(folder) / "runs")) for _ in range(2)]
        torch.distributed.destroy_process_group()
        queue.put((rank, runs))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def test_ranks_get_one_new_folder_made_by_rank_zero(tmp_path):
    """Both ranks get the same path, which exists; a second call gives a second folder (``ddp-2``); one folder
    per call under the root, none made by rank 1."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(tmp_path), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        answers = dict(queue.get(timeout=TIMEOUT_S + 30) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(isinstance(a, list) for a in answers.values()), answers
    assert answers[0] == answers[1], answers
    root = tmp_path / "runs"
    assert answers[0] == [str(root / "ddp"), str(root / "ddp-2")]
    assert sorted(p.name for p in root.iterdir()) == ["ddp", "ddp-2"]


def test_without_a_process_group_it_is_a_new_folder(tmp_path):
    """One process: the folder ``store.new_run_dir`` would make, no collective."""
    assert shared_new_run("solo", root=tmp_path) == tmp_path / "solo"
    assert shared_new_run("solo", root=tmp_path) == tmp_path / "solo-2"

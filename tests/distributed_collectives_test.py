"""Two processes (gloo, CPU, fork): the audit adds exactly one collective per audited DDP step, and no other.

Every collective issued through ``torch.distributed`` is counted on each rank (the functions of
``distributed_c10d`` and their aliases in ``torch.distributed``, plus DDP's ``_broadcast_coalesced`` of
buffers), phase by phase: the DDP wrapper's construction, the ``Audit``'s, each step, ``close``. An
audited run and a plain run of the same steps must differ by one ``all_reduce`` per audited step.
"""

from __future__ import annotations

import collections
import datetime
import functools
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
STEPS = 4
TIMEOUT_S = 30
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "broadcast_object_list",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_coalesced",
    "_all_gather_base",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "send_object_list",
    "recv_object_list",
    "_broadcast_coalesced",  # DDP's buffer and parameter broadcasts (a forward through the wrapper)
)
# Audit construction issues no collective when it is given its run folder (run=None under a process group
# would add one broadcast_object_list: distributed.shared_new_run).
CONSTRUCTION = collections.Counter()
SCENARIOS = {
    "plain": None,
    "every1": {"every": 1},
    "every2": {"every": 2},
    "rank_probes": {"every": 1, "probes": {"sharpness": 1, "noise": 1}},  # probe_scope "rank": no collective
    "global_sharpness": {"every": 1, "probes": {"sharpness": 2}, "probe_options": {"sharpness": {"scope": "global"}}},
}


class Counts:
    """Calls of each collective, by phase; a collective called inside another (all_gather_object's all_gather)
    counts once, as the outer call."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.by_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._depth = 0

    def wrap(self, name: str, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.by_phase[self.phase][name] += 1
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def install(self) -> None:
        """Replace each collective in ``distributed_c10d`` and ``torch.distributed`` by a counting wrapper."""
        from torch.distributed import distributed_c10d

        for name in COLLECTIVES:
            for namespace in (distributed_c10d, torch.distributed):
                function = getattr(namespace, name, None)
                if function is not None:
                    setattr(namespace, name, self.wrap(name, function))


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(12, 5, generator=g)
    return x, x[:, :3].argmax(1)


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _scenario(rank: int, folder: str, name: str, options: dict | None, counts: Counts) -> dict:
    """One run of STEPS DDP steps (BatchNorm, dropout, SGD-momentum), audited with ``options`` or plain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    counts.phase = "ddp"
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    counts.phase = "construction"
    audit = None if options is None else stepaudit.Audit(ddp, opt, loss_fn, run=os.path.join(folder, name), **options)
    torch.manual_seed(100 + rank)
    for step in range(STEPS):
        counts.phase = step
        batch = _data(rank, step)
        if audit is not None:
            audit.step(batch)
            continue
        opt.zero_grad()
        loss_fn(ddp, batch).backward()
        opt.step()
    counts.phase = "close"
    errors = []
    if audit is not None:
        errors = [
            r.get("error") or r.get("probe_errors") for r in audit.records if r.get("error") or r.get("probe_errors")
        ]
        audit.close()
    counts.phase = "after"
    return {"errors": errors, "params": [p.detach().clone() for p in model.parameters()]}


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
        results = {}
        for name, options in SCENARIOS.items():
            counts = Counts()
            counts.install()
            try:
                result = _scenario(rank, folder, name, options, counts)
            finally:
                _uninstall()
            results[name] = {**result, "counts": {k: dict(v) for k, v in counts.by_phase.items()}}
        torch.distributed.destroy_process_group()
        torch.save(results, os.path.join(folder, f"counts{rank}.pt"))
        queue.put((rank, None))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


_ORIGINALS: dict = {}


def _uninstall() -> None:
    for (namespace, name), function in _ORIGINALS.items():
        setattr(namespace, name, function)


def _remember_originals() -> None:
    from torch.distributed import distributed_c10d

    for name in COLLECTIVES:
        for namespace in (distributed_c10d, torch.distributed):
            if hasattr(namespace, name):
                _ORIGINALS[namespace, name] = getattr(namespace, name)


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> list[dict]:
    """Each rank's collective counts per scenario and phase (one pair of processes runs every scenario)."""
    folder = tmp_path_factory.mktemp("collectives")
    _remember_originals()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, str(folder), queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    errors = []
    try:
        for _ in range(WORLD):
            rank, error = queue.get(timeout=TIMEOUT_S * 4)
            if error:
                errors.append(f"rank {rank}:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return [torch.load(folder / f"counts{r}.pt", weights_only=False) for r in range(WORLD)]


def _added(audited: dict, plain: dict, phase) -> dict:
    """Collectives of ``phase`` in the audited run minus those of the plain run (non-zero differences only)."""
    a, p = collections.Counter(audited.get(phase, {})), collections.Counter(plain.get(phase, {}))
    return {k: a[k] - p[k] for k in a.keys() | p.keys() if a[k] != p[k]}


@pytest.mark.parametrize("scenario, audited_every", [("every1", 1), ("every2", 2), ("rank_probes", 1)])
def test_one_all_reduce_per_audited_step_and_no_other_collective(counted, scenario, audited_every):
    """Audited minus plain: one all_reduce on each audited step, none on the others, none at construction
    or close; DDP's own collectives (its construction, its buffer broadcasts, the reducer) are unchanged."""
    for rank, runs in enumerate(counted):
        plain, audited = runs["plain"], runs[scenario]
        assert not audited["errors"], audited["errors"]
        assert plain["counts"]["ddp"] == audited["counts"]["ddp"] and plain["counts"]["ddp"]  # the counter sees DDP
        assert plain["counts"].get(0), "the counter saw no collective in a plain DDP step (buffer broadcasts)"
        assert _added(audited["counts"], plain["counts"], "construction") == dict(CONSTRUCTION)
        for step in range(STEPS):
            expected = {"all_reduce": 1} if step % audited_every == 0 else {}
            assert _added(audited["counts"], plain["counts"], step) == expected, f"rank {rank}, step {step}"
        assert _added(audited["counts"], plain["counts"], "close") == {}
    for a, b in zip(counted[0][scenario]["params"], counted[1][scenario]["params"]):
        assert torch.equal(a, b)  # both ranks finished the same steps


def test_global_sharpness_collectives_are_in_lockstep(counted):
    """scope="global": each rank issues the same collectives on every step; a sharpness step adds the packed
    all_reduce plus the probe's own (its HVP averages and agreed stops), the other steps only the packed one."""
    runs = [r["global_sharpness"] for r in counted]
    plains = [r["plain"] for r in counted]
    assert not runs[0]["errors"] and not runs[1]["errors"], runs[0]["errors"] or runs[1]["errors"]
    for step in range(STEPS):
        added = [_added(run["counts"], plain["counts"], step) for run, plain in zip(runs, plains)]
        assert added[0] == added[1], f"step {step}: ranks disagree {added}"
        if step % 2:
            assert added[0] == {"all_reduce": 1}
        else:
            assert set(added[0]) == {"all_reduce"} and added[0]["all_reduce"] > 3, added[0]

"""Cost of auditing under two processes on CPU (gloo): DDP and FSDP2, plain and audited at every=1 and every=16.

The digits MLP (64-256-256-10, ``stepaudit.workloads.mlp``) with SGD; each rank draws its own batches of
64 digits. Both ranks run every arm in one process group, interleaved: each repetition runs every arm for
the same number of steps, in an order that rotates, so drifts of the machine hit all arms alike. Each arm
trains its own copy of the model. Rank 0's times are reported (DDP and FSDP2 keep the ranks in step):
the median time per step and the median ratio to the plain arm of the same wrapper in the same repetition.
A single-process pair (plain, audited every=1), timed in the parent before the ranks start, gives the
audit's own overhead without any process group, for the target "every=1 at most 0.15 of a step above it".

    OMP_NUM_THREADS=1 python bench/distributed.py [--steps 32] [--repeats 7] [--batch 64]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit import Audit  # noqa: E402
from stepaudit.workloads import classification_loss, load_digits, minibatches, mlp  # noqa: E402

WORLD = 2
ARMS = ("plain", "every=1", "every=16")


def _batches(rank: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """32 batches of this rank's digits (drawn once: data loading is not timed)."""
    x, y, _, _ = load_digits()
    stream = minibatches(x, y, size, seed=rank)
    return [next(stream) for _ in range(32)]


def _stepper(wrap: str, arm: str, folder: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """(one optimizer step on a batch, close) for a fresh model under ``wrap`` ("single", "ddp" or "fsdp2")."""
    torch.manual_seed(0)
    model = mlp()
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if arm == "plain":

        def plain(batch: Any) -> None:
            optimizer.zero_grad()
            classification_loss(model, batch).backward()
            optimizer.step()

        return plain, lambda: None
    every = int(arm.split("=")[1])
    audit = Audit(model, optimizer, classification_loss, run=os.path.join(folder, f"{wrap}-{arm}"), every=every)
    return audit.step, audit.close


def _time_arms(wraps: tuple[str, ...], rank: int, folder: str, steps: int, repeats: int, batch: int) -> dict:
    """{(wrap, arm): [seconds per step, one per repetition]}, arms interleaved in a rotating order."""
    batches = _batches(rank, batch)
    arms = [(w, a) for w in wraps for a in ARMS]
    steppers = {key: _stepper(*key, folder) for key in arms}
    for step, _ in steppers.values():  # warm-up: allocations, first audited step, DDP bucket rebuild
        for b in batches[:4]:
            step(b)
    times: dict = {key: [] for key in arms}
    distributed = torch.distributed.is_initialized()
    for rep in range(repeats):
        for key in arms[rep % len(arms) :] + arms[: rep % len(arms)]:
            step = steppers[key][0]
            if distributed:
                torch.distributed.barrier()
            start = time.perf_counter()
            for i in range(steps):
                step(batches[i % len(batches)])
            times[key].append((time.perf_counter() - start) / steps)
    for _, close in steppers.values():
        close()
    return times


def _all_reduce_seconds(calls: int = 200) -> float:
    """Median seconds of one all-reduce of nine float64s (the audit's packed one) in this process group."""
    tensor, times = torch.zeros(9, dtype=torch.float64), []
    for _ in range(calls):
        start = time.perf_counter()
        torch.distributed.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank: int, folder: str, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        times = _time_arms(("ddp", "fsdp2"), rank, folder, args.steps, args.repeats, args.batch)
        times["all_reduce"] = _all_reduce_seconds()
    finally:
        torch.distributed.destroy_process_group()
    queue.put((rank, times))


def _summary(times: dict) -> dict:
    """{(wrap, arm): (median ms per step, median ratio to the plain arm of the same repetition)}."""
    out = {}
    for (wrap, arm), values in times.items():
        plain = times[(wrap, "plain")]
        out[(wrap, arm)] = (1e3 * statistics.median(values), statistics.median(v / p for v, p in zip(values, plain)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        single = _summary(_time_arms(("single",), 0, folder, args.steps, args.repeats, args.batch))
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        procs = [context.Process(target=_rank, args=(r, folder, args, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in range(WORLD))
        for p in procs:
            p.join()
    reduce_ms = 1e3 * results[0].pop("all_reduce")
    ranks = _summary(results[0])
    print(
        f"two processes, gloo, CPU, {torch.get_num_threads()} thread each; digits MLP, batch {args.batch} per rank; "
        f"{args.repeats} repetitions of {args.steps} steps; torch {torch.__version__}\n"
    )
    print("| wrapper | plain ms/step | every=1 ms/step | every=1 ratio | every=16 ms/step | every=16 ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for wrap, summary in (("one process", single), ("DDP", ranks), ("FSDP2", ranks)):
        key = {"one process": "single", "DDP": "ddp", "FSDP2": "fsdp2"}[wrap]
        cells = [summary.get((key, arm)) for arm in ARMS]
        row = [f"{cells[0][0]:.2f}"]
        for cell in cells[1:]:
            row += ["—", "—"] if cell is None else [f"{cell[0]:.2f}", f"{cell[1]:.2f}×"]
        print(f"| {wrap} | " + " | ".join(row) + " |")
    base = single[("single", "every=1")]
    added = base[0] - single[("single", "plain")][0]
    for wrap in ("ddp", "fsdp2"):
        extra = ranks[(wrap, "every=1")][0] - ranks[(wrap, "plain")][0]
        print(
            f"\n{wrap}: every=1 ratio {ranks[(wrap, 'every=1')][1] - base[1]:+.2f} against the one-process audit's "
            f"(target ≤ +0.15); it adds {extra:.2f} ms per step (one process: {added:.2f} ms); "
            f"every=16 {ranks[(wrap, 'every=16')][1]:.2f}× (target ≤ 1.08×)",
            end="",
        )
    print(
        f"\none all-reduce of nine float64s (the audit's packed one), alone: {reduce_ms:.3f} ms; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()

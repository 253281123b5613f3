"""Cost of passive watching (``stepaudit doctor``) against the same script run plainly, side by side.

Each workload is a small training script written to a temporary file, run in this process with
``runpy`` (plain) and under ``PassiveWatcher`` (watched), alternating, several repetitions; the
table reports median wall times, the overhead (ratio of the medians) and the median of the
per-repetition ratios ("paired": each watched run against the plain run just before it, so a slow
minute of a shared machine cancels). The issue's budget: at most +15%.

    python bench/doctor_overhead.py [--steps 300] [--repeats 5] [--clock wall|cpu] [--workloads mlp cnn lm]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import runpy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stepaudit.doctor.passive import PassiveWatcher
from stepaudit.doctor.runner import run_script

HEADER = """
import torch, sys
from stepaudit.workloads import WORKLOADS
torch.manual_seed(0)
w = WORKLOADS[{name!r}]({kwargs})
batches = w.batches()
data = [next(batches) for _ in range({steps})]
"""
LOOPS = {
    "mlp": ("mlp", "batch_size=64", "torch.optim.Adam(w.model.parameters(), 1e-3)"),
    "cnn": ("cnn", "batch_size=64", "torch.optim.SGD(w.model.parameters(), 0.05, momentum=0.9)"),
    "lm": ("lm", "batch_size=16", "torch.optim.AdamW(w.model.parameters(), 3e-3)"),
}
BODY = """
opt = {optimizer}
for batch in data:
    opt.zero_grad()
    loss = w.loss_fn(w.model, batch)
    loss.backward()
    opt.step()
"""


def script(name: str, steps: int) -> str:
    workload, kwargs, optimizer = LOOPS[name]
    return HEADER.format(name=workload, kwargs=kwargs, steps=steps) + BODY.format(optimizer=optimizer)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time, blind to other load)


def timed_plain(path: Path) -> float:
    start = CLOCK()
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(str(path), run_name="__main__")
    return CLOCK() - start


def timed_watched(path: Path, steps: int) -> float:
    watcher = PassiveWatcher(max_steps=steps + 1)
    start = CLOCK()
    with contextlib.redirect_stdout(io.StringIO()):
        outcome = run_script(path, [], watcher)
    elapsed = CLOCK() - start
    assert outcome.stopped == "finished", outcome
    assert watcher.step_count == steps
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = steadier timings)")
    parser.add_argument("--workloads", nargs="*", default=list(LOOPS))
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; 1 thread)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(
        f"passive watching overhead: {args.steps} steps, median of {args.repeats} alternating runs, "
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} logical cores, {args.clock} time"
    )
    start_load = _load()
    print(f"{'workload':10s} {'plain s':>9s} {'watched s':>10s} {'overhead':>9s} {'paired':>8s}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.workloads:
            path = Path(folder) / f"train_{name}.py"
            path.write_text(script(name, args.steps))
            timed_plain(path)  # warm-up: imports, data, allocator
            plain, watched = [], []
            for _ in range(args.repeats):
                plain.append(timed_plain(path))
                watched.append(timed_watched(path, args.steps))
            p, w = statistics.median(plain), statistics.median(watched)
            paired = statistics.median(b / a for a, b in zip(plain, watched))  # per repetition: a slow minute cancels
            print(f"{name:10s} {p:9.3f} {w:10.3f} {100 * (w / p - 1):+8.1f}% {100 * (paired - 1):+7.1f}%")
    print(
        f"1-minute load average: {start_load} at start, {_load()} at end (a shared machine: read the numbers "
        "with it in mind)"
    )


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


if __name__ == "__main__":
    main()

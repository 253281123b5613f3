"""Time per optimizer step of a plain loop, of the audited loop (every=1, every=16) and of Cockpit "economy".

A "floor" arm runs the plain step plus one gradient-free loss evaluation at the new weights on the same
batch: the least an exact own-batch audit can cost, since ``loss_after`` is that evaluation.

All arms of a workload run in one process, interleaved: each repetition runs every arm for the same
number of steps, in an order that rotates from one repetition to the next, so drifts of the machine
(other processes, thermal state) hit all arms alike. Each arm trains its own copy of the same model
with plain SGD on the same batch sequence. Reported per arm: the median time per step, and the
median and interquartile range of the per-repetition ratio to the plain loop of the same repetition;
for the audited arms also the audit's own work above the floor per audited step, in plain steps, and,
apart from that steady state, the one-time set-up: building the Audit and its first audited step.

    python bench/overhead.py [--steps 64] [--repeats 11] [--workloads mlp cnn lm] [--threads N]
                             [--json FILE] [--markdown]

Cockpit (``cockpit-for-pytorch``, with BackPACK) runs when importable: build ``bench/.venv-anchors``
with ``bash bench/anchors.sh`` and run this script with ``bench/.venv-anchors/bin/python``. Elsewhere
its column reads "not installed"; on models BackPACK cannot extend it reads "unsupported: <reason>".
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from stepaudit import Audit  # noqa: E402
from stepaudit.workloads import WORKLOADS, Workload  # noqa: E402

LEARNING_RATE = 0.05
DISTINCT_BATCHES = 32  # batches drawn once per workload and cycled, so data loading is not timed
AUDIT_SPARSE_EVERY = 16


@dataclass
class Arm:
    """One way of training: ``step(batch)`` does a full optimizer step (and whatever it audits)."""

    name: str
    step: Callable[[Any], None] | None
    steps: int  # steps per repetition
    status: str = "ok"  # or "not installed", "unsupported: …", "failed: …"
    note: str = ""  # a caveat the tool itself warned about (e.g. BatchNorm mixing samples)
    times: list[float] = field(default_factory=list)  # seconds per step, one per repetition
    close: Callable[[], None] = lambda: None
    position: int = 0  # index into the batch cycle
    construction_s: float = 0.0  # building the arm's tool (the Audit), once
    first_step_s: float = math.nan  # the arm's first step (the audit measures the rounding noise there)

    def run(self, batches: list) -> float:
        """Time ``steps`` optimizer steps; return seconds per step."""
        start = time.perf_counter()
        for _ in range(self.steps):
            self.step(batches[self.position % len(batches)])
            self.position += 1
        return (time.perf_counter() - start) / self.steps


# -- arms -------------------------------------------------------------------------------------------
def plain_arm(workload: Workload, steps: int, floor: bool = False) -> Arm:
    """zero_grad, forward, backward, optimizer step: the loop without any instrumentation.

    ``floor``: then one gradient-free loss evaluation at the new weights on the same batch — what any
    exact own-batch audit must pay at least (the audit adds its records and the RNG replay).
    """
    model = copy.deepcopy(workload.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = workload.loss_fn

    def step(batch):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        if floor:
            with torch.no_grad():
                float(loss_fn(model, batch))

    return Arm("floor" if floor else "plain", step, steps)


def audited_arm(workload: Workload, steps: int, every: int, folder: Path) -> Arm:
    """The same loop through ``audit.step(batch)``, auditing every ``every``-th step."""
    model = copy.deepcopy(workload.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    started = time.perf_counter()
    audit = Audit(model, optimizer, workload.loss_fn, run=folder / f"{workload.name}-every{every}", every=every)
    built = time.perf_counter() - started
    return Arm(f"every={every}", audit.step, steps, close=audit.close, construction_s=built)


def _outputs_and_targets(workload: Workload) -> Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Split a workload's loss into (logits, integer targets) for a cross-entropy criterion module."""
    if workload.name == "lm":

        def split(model, batch):
            logits = model(batch[:, :-1])
            return logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    else:

        def split(model, batch):
            inputs, labels = batch
            return model(inputs), labels

    return split


def cockpit_arm(workload: Workload, steps: int) -> Arm:
    """Cockpit's "economy" configuration on a BackPACK-extended copy of the model, tracked every step."""
    try:
        from backpack import extend
        from backpack.extensions import BatchGrad
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration
    except Exception as error:  # ImportError, or pkg_resources missing with setuptools>=70
        return Arm("cockpit", None, steps, status=f"not installed ({type(error).__name__})")
    # Economy's per-sample quantities need BackPACK's BatchGrad on every module that owns parameters.
    supported = set(getattr(BatchGrad(), "_BackpropExtension__module_extensions", {}) or ())
    missing = sorted(
        {
            type(m).__name__
            for m in workload.model.modules()
            if any(True for _ in m.parameters(recurse=False)) and type(m) not in supported
        }
    )
    if supported and missing:
        return Arm(
            "cockpit", None, steps, status="unsupported: BackPACK has no per-sample gradients for " + ", ".join(missing)
        )
    model = extend(copy.deepcopy(workload.model))
    criterion = extend(nn.CrossEntropyLoss())
    individual = nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)  # Alpha needs default-kwargs SGD
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
    split = _outputs_and_targets(workload)
    counter = [0]

    def step(batch):
        global_step = counter[0]
        counter[0] += 1
        optimizer.zero_grad()
        outputs, targets = split(model, batch)
        loss = criterion(outputs, targets)
        losses = individual(outputs, targets)
        info = {"batch_size": outputs.shape[0], "individual_losses": losses, "loss": loss, "optimizer": optimizer}
        with cockpit(global_step, info=info):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        optimizer.step()

    return Arm("cockpit", step, steps)


def check_runs(arm: Arm, batches: list) -> None:
    """Take two steps outside the clock; an arm that raises is marked unsupported and skipped."""
    if arm.step is None:
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            arm.step(batches[0])
            arm.first_step_s = time.perf_counter() - started
            arm.step(batches[1])
        arm.position = 2
        if arm.name == "cockpit":  # keep what BackPACK/Cockpit warn about the validity of their numbers
            notes = {
                str(w.message).split(". ")[0] for w in caught if "backpack" in w.filename or "cockpit" in w.filename
            }
            arm.note = "; ".join(sorted(notes))
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        arm.status = f"unsupported: {type(error).__name__}: {message}"[:160]
        arm.step = None


# -- measurement ------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) with linear interpolation; a single value gives it three times."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return q25, q50, q75


def measure(workload: Workload, args: argparse.Namespace, folder: Path) -> dict:
    """Interleaved repetitions of all arms of one workload; medians and ratio spreads."""
    stream = workload.batches()
    batches = [next(stream) for _ in range(DISTINCT_BATCHES)]
    arms = [
        plain_arm(workload, args.steps),
        plain_arm(workload, args.steps, floor=True),
        audited_arm(workload, args.steps, 1, folder),
        audited_arm(workload, args.steps, AUDIT_SPARSE_EVERY, folder),
    ]
    if not args.no_cockpit:
        arms.append(cockpit_arm(workload, args.cockpit_steps))
    for arm in arms:
        check_runs(arm, batches)
    live = [arm for arm in arms if arm.step is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Cockpit/BackPACK chatter; the audit warns on nothing here
        for arm in live:  # warm-up: first audited step measures rounding once, allocators settle
            arm.run(batches)
        for repetition in range(args.repeats):
            shift = repetition % len(live)
            for arm in live[shift:] + live[:shift]:
                gc.collect()
                try:
                    arm.times.append(arm.run(batches))
                except Exception as error:  # a comparison tool failing mid-run must not sink the table
                    arm.status, arm.step = f"failed: {type(error).__name__}: {error}"[:160], None
                    live = [a for a in live if a is not arm]
                    break
    for arm in arms:
        arm.close()
    plain, floor = arms[0].times, arms[1].times
    result = {"workload": workload.name, "description": workload.description, "arms": {}}
    for arm in arms:
        entry: dict[str, Any] = {"status": arm.status, "note": arm.note, "steps_per_repetition": arm.steps}
        if arm.status == "ok" and arm.times:
            paired = min(len(arm.times), len(plain))
            ratios = [a / p for a, p in zip(arm.times[:paired], plain[:paired])]
            q25, q50, q75 = quartiles(ratios)
            entry.update(
                ms_per_step=1e3 * statistics.median(arm.times),
                times_s=arm.times,
                ratio=q50,
                ratio_q25=q25,
                ratio_q75=q75,
                ratios=ratios,
            )
        if arm.status == "ok" and arm.name.startswith("every=") and arm.times and floor:
            # the audit's own work above the floor per audited step, in plain steps of the same repetition:
            # ((audited − plain) × every − (floor − plain)) / plain, which is (audited − floor) / plain at every=1
            every = int(arm.name.split("=")[1])
            paired = min(len(arm.times), len(plain), len(floor))
            above = [
                ((a - p) * every - (f - p)) / p for a, f, p in zip(arm.times[:paired], floor[:paired], plain[:paired])
            ]
            q25, q50, q75 = quartiles(above)
            entry.update(above_floor_steps=q50, above_floor_q25=q25, above_floor_q75=q75, above_floor=above)
        if arm.status == "ok":
            entry.update(construction_ms=1e3 * arm.construction_s, first_step_ms=1e3 * arm.first_step_s)
        result["arms"][arm.name] = entry
    return result


# -- machine and reporting ----------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its widest vector extension, else platform's."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    vector = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "")
    return f"{name or platform.machine()}{f' ({vector})' if vector else ''}"


def machine() -> dict:
    """What the numbers were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min_at_start": load[0] if load else None,
    }


def cell(entry: dict, plain: bool = False) -> str:
    if entry["status"] != "ok":
        return entry["status"]
    if plain:
        return f"{entry['ms_per_step']:.2f} ms"
    return (
        f"{entry['ms_per_step']:.2f} ms · ×{entry['ratio']:.2f} "
        f"({entry['ratio_q25']:.2f}–{entry['ratio_q75']:.2f})" + (" †" if entry.get("note") else "")
    )


def above_cell(entry: dict) -> str:
    if "above_floor_steps" not in entry:
        return entry["status"]
    return f"{entry['above_floor_steps']:.2f} ({entry['above_floor_q25']:.2f}–{entry['above_floor_q75']:.2f})"


def setup_cell(entry: dict) -> str:
    if "construction_ms" not in entry:
        return entry["status"]
    total = entry["construction_ms"] + entry["first_step_ms"]
    return f"{total:.1f} ms ({entry['construction_ms']:.1f} + {entry['first_step_ms']:.1f})"


def markdown(results: list[dict], info: dict, args: argparse.Namespace) -> str:
    """The results as a markdown table, with the machine and settings underneath."""
    lines = [
        "| workload | plain | plain + one forward (the floor) | audited, every=1 | audited, every=16 "
        "| Cockpit economy |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        arms = result["arms"]
        cockpit = arms.get("cockpit", {"status": "not run (--no-cockpit)"})
        lines.append(
            f"| {result['description']} | {cell(arms['plain'], plain=True)} | {cell(arms['floor'])} "
            f"| {cell(arms['every=1'])} "
            f"| {cell(arms['every=16'])} | {cell(cockpit)} |"
        )
    lines += [
        "",
        "| workload | above the floor, every=1 | above the floor, every=16 | set-up, every=1 | set-up, every=16 "
        "| plain loop's first step |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        arms = result["arms"]
        lines.append(
            f"| {result['description']} | {above_cell(arms['every=1'])} | {above_cell(arms['every=16'])} "
            f"| {setup_cell(arms['every=1'])} | {setup_cell(arms['every=16'])} "
            f"| {arms['plain'].get('first_step_ms', math.nan):.1f} ms |"
        )
    notes = sorted({r["arms"][a]["note"] for r in results for a in r["arms"] if r["arms"][a].get("note")})
    if notes:
        lines += [""] + [f"† the tool warned: {note}." for note in notes]
    lines += [
        "",
        "Cells: median time per step · median ratio to the plain loop (interquartile range of the "
        f"per-repetition ratio). {args.repeats} interleaved repetitions of {args.steps} steps "
        f"(Cockpit: {args.cockpit_steps} steps), SGD lr {LEARNING_RATE}. Above the floor: the audit's own "
        "work per audited step, ((audited − plain) × every − (floor − plain)) / plain per repetition, in plain "
        "steps, median (interquartile range); steady state, after warm-up. "
        "Set-up (not in the steady state): building the Audit + its first audited step, timed once.",
        "",
        f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
        f"with {info['torch_threads']} thread(s), Python {info['python']}, {info['platform']}; "
        f"1-min load average {info['load_average_1min_at_start']:.2f} at start, "
        f"{info.get('load_average_1min_at_end', float('nan')):.2f} at end.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=64, help="optimizer steps per arm and repetition (a multiple of 16, default 64)"
    )
    parser.add_argument("--repeats", type=int, default=11, help="interleaved repetitions (default 11)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOADS),
        choices=list(WORKLOADS),
        help="which workloads (default: all)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--cockpit-steps",
        type=int,
        default=None,
        help="Cockpit steps per repetition (default: min(steps, 8); it is ~100× slower)",
    )
    parser.add_argument("--no-cockpit", action="store_true", help="skip Cockpit even where it is installed")
    parser.add_argument("--json", metavar="FILE", help="also write all timings and the machine to FILE")
    parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")
    if args.steps % AUDIT_SPARSE_EVERY:
        parser.error(
            f"--steps must be a multiple of {AUDIT_SPARSE_EVERY}, so each repetition of every=16 "
            "audits the same number of steps"
        )
    if args.cockpit_steps is None:
        args.cockpit_steps = min(args.steps, 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    if not args.markdown:
        print(
            f"# {info['cpu']} · {info['logical_cores']} cores · torch {info['torch']} · "
            f"{info['torch_threads']} thread(s)",
            flush=True,
        )
    results = []
    with tempfile.TemporaryDirectory(prefix="stepaudit-bench-") as folder:
        for name in args.workloads:
            started = time.perf_counter()
            result = measure(WORKLOADS[name](), args, Path(folder))
            results.append(result)
            if not args.markdown:
                arms = result["arms"]
                summary = ", ".join(f"{k} {cell(v, plain=(k == 'plain'))}" for k, v in arms.items())
                print(f"{name}: {summary}  [{time.perf_counter() - started:.0f} s]", flush=True)
    info["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = markdown(results, info, args)
    print(("" if args.markdown else "\n") + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "settings": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

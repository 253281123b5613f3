"""``stepaudit demo``: can a small step always reduce the loss? SGD, momentum and Adam on digits, audited.

Each optimizer trains the same MLP from the same initialisation on the same batch order; every
step is audited. The table answers the seed question on real data: plain SGD with a small step
lowers its own batch's loss (descent lemma); momentum and Adam carry no such guarantee.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .audit import Audit
from .store import new_run_dir
from .workloads import classification_loss, load_digits, minibatches, mlp

OPTIMIZERS: dict[str, tuple[Callable, float]] = {
    "sgd": (lambda params, lr: torch.optim.SGD(params, lr=lr), 0.1),
    "momentum": (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), 0.1),
    "adam": (lambda params, lr: torch.optim.Adam(params, lr=lr), 3e-3),
}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct argmax predictions, in eval mode, without touching the RNG or grads."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


def _progress(label: str, total: int, quiet: bool):
    """A rich progress bar when available and wanted, else a no-op callable."""
    if quiet or not sys.stderr.isatty():  # a bar redrawn into a file or pipe is only blank lines
        return None, lambda: None
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            transient=True,
            console=_console(),
        )
        progress.start()
        task = progress.add_task(label, total=total)
        return progress, lambda: progress.advance(task)
    except ImportError:
        return None, lambda: None


def _console():
    from rich.console import Console

    return Console(stderr=True)


def train_one(name: str, lr: float, steps: int, batch_size: int, seed: int, runs: Path, quiet: bool) -> dict:
    """Train one optimizer with every step audited; returns its summary row."""
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    torch.manual_seed(seed)
    model = mlp((64, 128, 128, 10))
    build, _ = OPTIMIZERS[name]
    optimizer = build(model.parameters(), lr)
    run = new_run_dir(runs, name)
    batches = minibatches(x_train, y_train, batch_size, seed)
    progress, advance = _progress(name, steps, quiet)
    started = time.perf_counter()
    try:
        with Audit(model, optimizer, classification_loss, run=run, name=f"demo-{name}") as audit:
            for step in range(steps):
                audit.step(next(batches))
                if (step + 1) % 25 == 0 or step + 1 == steps:  # charted in the report beside the audit
                    audit.log("test_accuracy", accuracy(model, x_test, y_test))
                advance()
            summary = audit.summary()
            audit.store.update_meta(
                train_accuracy=accuracy(model, x_train, y_train), test_accuracy=accuracy(model, x_test, y_test)
            )
    finally:
        if progress is not None:
            progress.stop()
    return {
        "optimizer": name,
        "lr": lr,
        "steps": steps,
        "run": str(run),
        "share_increase": summary["share_increase"],
        "share_flat": summary["share_flat"],
        "median_alpha": summary["median_alpha"],
        "median_delta_over_first_order": summary["median_delta_over_first_order"],
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "seconds": time.perf_counter() - started,
    }


def table(rows: list[dict]) -> str:
    """The comparison as an aligned plain-text table."""
    head = ["optimizer", "lr", "raised own-batch loss", "median alpha", "median Δ/first_order", "train acc", "test acc"]
    body = [
        [
            r["optimizer"],
            f"{r['lr']:g}",
            f"{100 * r['share_increase']:.1f}% of steps",
            f"{r['median_alpha']:+.2f}",
            f"{r['median_delta_over_first_order']:.2f}",
            f"{100 * r['train_accuracy']:.1f}%",
            f"{100 * r['test_accuracy']:.1f}%",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(
        str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def explain_rows(rows: list[dict]) -> str:
    """Two sentences reading the table."""
    parts = []
    for r in rows:
        parts.append(
            f"{r['optimizer']}: {100 * r['share_increase']:.0f}% of steps raised the loss of the very batch "
            f"they were computed on; the median step delivered {r['median_delta_over_first_order']:.2f}× "
            "its first-order promise g·Δw."
        )
    return "\n".join(parts) + (
        "\nalpha: −1 = barely moved, 0 = landed on the valley floor along the step, "
        "+1 = jumped to the opposite wall, >1 = overshoot."
    )


def _reports(rows: list[dict], runs: Path, quiet: bool) -> list[str]:
    """HTML report per run plus a comparison page, when the report module is available."""
    try:
        from .report.html import write_compare, write_report
    except ImportError:
        return []
    paths = []
    for r in rows:
        paths.append(str(write_report(r["run"], Path(r["run"]) / "report.html")))
    paths.append(str(write_compare([r["run"] for r in rows], runs / "compare.html")))
    return paths


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stepaudit demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per optimizer (default 300)")
    parser.add_argument("--optimizers", default="sgd,momentum,adam", help="comma list from: " + ", ".join(OPTIMIZERS))
    parser.add_argument("--lr", default=None, help="one learning rate for all, or a comma list matching --optimizers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs", default="stepaudit-runs", help="folder for the run folders (default ./stepaudit-runs)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML reports")
    parser.add_argument(
        "--eos",
        action="store_true",
        help="the edge-of-stability experiment instead; --steps, --seed, --runs and --quiet apply to it "
        "too, its other options: stepaudit demo --eos --help",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints the table (or JSON) and where the runs were written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--eos" in argv:
        from . import eos

        return eos.main([a for a in argv if a != "--eos"])
    args = parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        print(f"stepaudit demo: unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}", file=sys.stderr)
        return 2
    lrs = [OPTIMIZERS[n][1] for n in names]
    if args.lr is not None:
        given = [float(v) for v in args.lr.split(",")]
        if len(given) not in (1, len(names)):
            print("stepaudit demo: --lr takes one value or one per optimizer", file=sys.stderr)
            return 2
        lrs = given * len(names) if len(given) == 1 else given
    if args.steps < 1 or args.batch_size < 1:
        print("stepaudit demo: --steps and --batch-size must be positive", file=sys.stderr)
        return 2
    runs = Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S")
    rows = [
        train_one(n, lr, args.steps, args.batch_size, args.seed, runs, args.quiet or args.json)
        for n, lr in zip(names, lrs)
    ]
    reports = [] if args.no_report else _reports(rows, runs, args.quiet)
    if args.json:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
        print(json.dumps({"runs": [{k: clean(v) for k, v in r.items()} for r in rows], "reports": reports}, indent=2))
        return 0
    print(f"Digits MLP 64-128-128-10, batch {args.batch_size}, {args.steps} steps per optimizer, every step audited.\n")
    print(table(rows))
    print()
    print(explain_rows(rows))
    print(f"\nRun folders: {runs}")
    for path in reports:
        print(f"  report: {path}")
    return 0

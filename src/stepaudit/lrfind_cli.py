"""``stepaudit lr-find --demo`` or ``stepaudit lr-find script.py [args…]``: the audited learning-rate range test,
on a built-in workload or on an unchanged training script's own model, optimizer and batches; summary and SVG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .workloads import WORKLOADS

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="stepaudit lr-find",
        description="The audited learning-rate range test on a built-in workload (--demo) or on an unchanged "
        "training script: run to its first optimizer.step(), keep its next batches, test from that step.",
    )
    parser.add_argument("--demo", action="store_true", help="run on a built-in workload (default the digits MLP)")
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS), help="built-in workload (default mlp)")
    parser.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS), help="optimizer (default sgd)")
    parser.add_argument("--start-lr", type=float, default=1e-7)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--num", type=int, default=100, help="learning rates tried (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed; with a script, Lanczos' start")
    parser.add_argument(
        "--time-limit", type=float, default=None, metavar="S", help="with a script: stop collecting batches after S s"
    )
    parser.add_argument("-o", "--output", default=None, help="write the chart as an SVG file here (e.g. lr_find.svg)")
    parser.add_argument("script", nargs="?", help="a training script, run unchanged as __main__ (options go before it)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the range test and print its summary; errors are one line on stderr."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.script is not None:
        if args.demo:
            print("stepaudit lr-find: give --demo or a script, not both", file=sys.stderr)
            return 2
        return _script(args)
    if not args.demo:
        print(
            "stepaudit lr-find: nothing to run; give a training script or --demo (see stepaudit lr-find --help)",
            file=sys.stderr,
        )
        return 2
    from .lrfind import lr_find

    workload = WORKLOADS[args.workload](seed=args.seed)
    optimizer = OPTIMIZERS[args.optimizer](workload.model.parameters())
    try:
        result = lr_find(
            workload.model,
            optimizer,
            workload.loss_fn,
            workload.batches(),
            start_lr=args.start_lr,
            end_lr=args.end_lr,
            num=args.num,
        )
    except ValueError as error:
        print(f"stepaudit lr-find: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"{workload.description}, {type(optimizer).__name__}\n")
    _show(result, args.output)
    return 0


def _show(result, output: str | None) -> None:
    print(result)
    if output:
        path = Path(output)
        path.write_text(result.plot_svg(), encoding="utf-8")
        print(f"\nchart: {path}")


def _script(args: argparse.Namespace) -> int:
    """The range test on the script's own model, optimizer and batches (``lrfind_script``)."""
    from .cli import debug
    from .lrfind_script import ScriptError, find_in_script, header

    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    try:
        run = find_in_script(
            args.script,
            script_args,
            start_lr=args.start_lr,
            end_lr=args.end_lr,
            num=args.num,
            seed=args.seed,
            time_limit=args.time_limit,
        )
    except ScriptError as error:
        if debug():
            raise
        print(f"stepaudit lr-find: {' '.join(str(error).split())}", file=sys.stderr)
        return error.status
    print(f"\n{header(args.script, run)}\n")
    _show(run.result, args.output)
    return 0

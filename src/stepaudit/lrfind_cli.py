"""``stepaudit lr-find --demo``: the audited learning-rate range test on a built-in workload, summary and SVG."""

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
    parser = argparse.ArgumentParser(prog="stepaudit lr-find", description=__doc__.split("\n")[0])
    parser.add_argument(
        "script", nargs="?", help="a training script (not supported yet: use --demo or stepaudit.lr_find)"
    )
    parser.add_argument("--demo", action="store_true", help="run on a built-in workload (default the digits MLP)")
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS), help="built-in workload (default mlp)")
    parser.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZERS), help="optimizer (default sgd)")
    parser.add_argument("--start-lr", type=float, default=1e-7)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--num", type=int, default=100, help="learning rates tried (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=None, help="write the chart as an SVG file here (e.g. lr_find.svg)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the range test and print its summary; errors are one line on stderr."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.script is not None:
        print(
            f"stepaudit lr-find: running a script ({args.script}) is not supported yet; use --demo, or call "
            "stepaudit.lr_find(model, optimizer, loss_fn, batches) in the script",
            file=sys.stderr,
        )
        return 2
    if not args.demo:
        print("stepaudit lr-find: nothing to run; use --demo (see stepaudit lr-find --help)", file=sys.stderr)
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
    print(result)
    if args.output:
        path = Path(args.output)
        path.write_text(result.plot_svg(), encoding="utf-8")
        print(f"\nchart: {path}")
    return 0

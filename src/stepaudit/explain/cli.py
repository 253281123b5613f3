"""`stepaudit explain [EXPR] [--at x=-2,y=5,z=-4] [--lr LR] [--target T] [--json] [--svg FILE]`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .parse import ExplainError
from .render import print_lines, render
from .result import DEFAULT_EXPR, explain
from .svg import circuit_svg

DESCRIPTION = """Backprop on a small expression, drawn as a circuit, then one gradient step:
simultaneous versus one weight at a time, the Hessian (interplay between weights), and the
exact set of learning rates for which the step still goes downhill.  With no arguments it
explains f = (x + y) * z at x = -2, y = 5, z = -4.  Variables you do not set with --at take
x = -2, y = 5, z = -4; any other variable must be given."""
EPILOG = """allowed: numbers, variable names, + - * / **, unary minus, parentheses, and the functions
exp log sqrt abs sin cos tanh sigmoid relu max min.  Nothing is ever evaluated as Python.
examples:
  stepaudit explain
  stepaudit explain "max(x, y) * z" --lr 0.5
  stepaudit explain "(x + y) * z" --target 0 --svg circuit.svg
  stepaudit explain "sigmoid(w*x + b)" --at w=2,x=-1,b=-3 --json"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ExplainError(f"{message} (see stepaudit explain --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="stepaudit explain",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("expr", nargs="?", metavar="EXPR", help=f'the expression (default "{DEFAULT_EXPR}")')
    p.add_argument(
        "--at",
        action="append",
        default=[],
        metavar="x=-2,y=5,...",
        help="the point: comma-separated name=value pairs (repeatable)",
    )
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the step (default 0.1)")
    p.add_argument("--target", type=float, default=None, metavar="T", help="minimise 1/2*(EXPR - T)^2 instead of EXPR")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--svg", metavar="FILE", help="also write the circuit as SVG ('-' for stdout)")
    return p


def parse_at(items: list[str]) -> dict[str, float]:
    """Parse ``["x=-2,y=5", "z=-4"]`` into a name -> value mapping."""
    point: dict[str, float] = {}
    for item in items:
        for pair in filter(None, (p.strip() for p in item.split(","))):
            name, eq, raw = pair.partition("=")
            name = name.strip()
            if not eq or not name.isidentifier():
                raise ExplainError(f"--at expects name=value pairs, got {pair!r}")
            try:
                value = float(raw)
            except ValueError:
                raise ExplainError(f"--at {name}: {raw.strip()!r} is not a number") from None
            if not math.isfinite(value):
                raise ExplainError(f"--at {name}: the value must be finite, got {raw.strip()!r}")
            point[name] = value
    return point


def main(argv: list[str] | None = None) -> int:
    """Run the command; ``argv`` excludes the word "explain".  Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = _parser().parse_known_args(argv)
        if len(extra) == 1 and args.expr is None and not extra[0].startswith("--"):
            args.expr = extra[0]  # an expression starting with '-', like "-x*y"
        elif extra:
            raise ExplainError(f"unrecognized arguments: {' '.join(extra)}")
        result = explain(
            args.expr if args.expr is not None else DEFAULT_EXPR, parse_at(args.at) or None, args.lr, args.target
        )
        if args.svg:
            svg = circuit_svg(result)
            if args.svg == "-":
                sys.stdout.write(svg)
                return 0
            with open(args.svg, "w", encoding="utf-8") as fh:
                fh.write(svg)
    except ExplainError as e:
        print(f"explain: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"explain: cannot write {args.svg!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(result, indent=2, allow_nan=False))
        else:
            print_lines(render(result))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.svg:
        print(f"explain: wrote the circuit to {args.svg}", file=sys.stderr)
    return 0

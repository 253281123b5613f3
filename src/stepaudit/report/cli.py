"""``stepaudit report RUN`` and ``stepaudit compare RUN_A RUN_B …``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..store import iter_runs
from .compare import render_compare
from .data import load_run
from .html import render_report
from .terminal import print_compare, print_run


def main(argv: list[str] | None = None) -> int:
    """Write a run's self-contained HTML report (default ``RUN/report.html``), or print a summary."""
    parser = argparse.ArgumentParser(
        prog="stepaudit report",
        description="Write one self-contained HTML file (works offline) with the run's charts, findings and metadata.")
    parser.add_argument("run", help="run folder (the one holding stepaudit.sqlite)")
    parser.add_argument("-o", "--output", help="HTML file to write (default: RUN/report.html)")
    parser.add_argument("--terminal", action="store_true",
                        help="print a summary in the terminal instead (with -o, write the HTML as well)")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run)
    except FileNotFoundError as error:
        print(f"stepaudit report: {error}", file=sys.stderr)
        return 2
    if args.terminal:
        print_run(run)
        if not args.output:
            return 0
    out = Path(args.output) if args.output else Path(args.run) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run), encoding="utf-8")
    print(out)
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """Overlay several runs in one HTML page and print their summaries side by side."""
    parser = argparse.ArgumentParser(
        prog="stepaudit compare",
        description="Overlay runs (e.g. SGD vs momentum vs Adam) in one self-contained HTML page and print a table.")
    parser.add_argument("runs", nargs="+", help="run folders, or a folder of run folders")
    parser.add_argument("-o", "--output", default="compare.html", help="HTML file to write (default: compare.html)")
    parser.add_argument("--no-html", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not iter_runs([r])]
    if missing:
        print(f"stepaudit compare: no stepaudit run in {', '.join(missing)} (expected a folder with stepaudit.sqlite)",
              file=sys.stderr)
        return 2
    runs = [load_run(path) for path in iter_runs(args.runs)]
    print_compare(runs)
    if not args.no_html:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_compare(runs), encoding="utf-8")
        print(out)
    return 0

"""``stepaudit report RUN`` and ``stepaudit compare RUN_A RUN_B …``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import fail
from ..store import RunStoreError, iter_runs, output_file, run_folder
from .compare import render_compare
from .data import load_run
from .html import render_report
from .terminal import print_compare, print_run


def main(argv: list[str] | None = None) -> int:
    """Write a run's self-contained HTML report (default ``RUN/report.html``), or print a summary."""
    parser = argparse.ArgumentParser(
        prog="stepaudit report",
        description="Write one self-contained HTML file (works offline) with the run's charts, findings and metadata.",
    )
    parser.add_argument("run", help="run folder (the one holding stepaudit.sqlite), or that .sqlite file")
    parser.add_argument(
        "-o",
        "--output",
        help="HTML file to write (default: RUN/report.html); "
        "a folder (existing, or ending in /) gets report.html inside it",
    )
    parser.add_argument(
        "--terminal",
        action="store_true",
        help="print a summary in the terminal instead (with -o, write the HTML as well)",
    )
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run)
    except FileNotFoundError as error:
        return fail("stepaudit report", error, 2)
    except RunStoreError as error:
        return fail("stepaudit report", error, 1)
    if args.terminal:
        print_run(run)
        if not args.output:
            return 0
    out = output_file(args.output, "report.html") if args.output else run_folder(args.run) / "report.html"
    try:
        _write(out, render_report(run))
    except OSError as error:
        return fail("stepaudit report", error, 1)
    print(out)
    return 0


def _write(out: Path, text: str) -> None:
    """Write an HTML page, creating its folder; an unwritable place is one clear ``OSError``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"cannot write {out}: {reason}; pass -o with a file in a writable folder") from error


def compare_main(argv: list[str] | None = None) -> int:
    """Overlay several runs in one HTML page and print their summaries side by side."""
    parser = argparse.ArgumentParser(
        prog="stepaudit compare",
        description="Overlay runs (e.g. SGD vs momentum vs Adam) in one self-contained HTML page and print a table.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (or their .sqlite files), or a folder of run folders")
    parser.add_argument(
        "-o",
        "--output",
        default="compare.html",
        help="HTML file to write (default: compare.html); "
        "a folder (existing, or ending in /) gets compare.html inside it",
    )
    parser.add_argument("--no-html", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not iter_runs([r])]
    if missing:
        print(
            f"stepaudit compare: no stepaudit run in {', '.join(missing)} (expected a folder with stepaudit.sqlite)",
            file=sys.stderr,
        )
        return 2
    try:
        runs = [load_run(path) for path in iter_runs(args.runs)]
    except RunStoreError as error:
        return fail("stepaudit compare", error, 1)
    print_compare(runs)
    if not args.no_html:
        out = output_file(args.output, "compare.html")
        try:
            _write(out, render_compare(runs))
        except OSError as error:
            return fail("stepaudit compare", error, 1)
        print(out)
    return 0

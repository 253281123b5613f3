"""``stepaudit`` command line: each subcommand lives in its own module with a ``main(argv) -> int``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("stepaudit.demo", "main", "train SGD / momentum / Adam on digits, audit every step, compare"),
    "explain": ("stepaudit.explain.cli", "main", "backprop on a small expression, and the largest step that goes downhill"),
    "doctor": ("stepaudit.doctor.cli", "main", "run an unchanged training script and diagnose why it (doesn't) train"),
    "report": ("stepaudit.report.cli", "main", "write a self-contained HTML report of a run (or --terminal)"),
    "compare": ("stepaudit.report.cli", "compare_main", "overlay several runs in one HTML page and a table"),
    "export": ("stepaudit.export", "main", "export a run to TensorBoard, CSV or Parquet"),
}


def usage() -> str:
    """The help text listing every subcommand."""
    width = max(map(len, COMMANDS))
    lines = ["usage: stepaudit <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'stepaudit <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's own ``main``; unknown commands print the list and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"stepaudit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"stepaudit: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

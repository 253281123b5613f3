"""``stepaudit`` command line: each subcommand lives in its own module with a ``main(argv) -> int``.

Errors are one line on stderr naming the problem and the fix; the exit status is 2 for usage errors
(wrong arguments, no run where one was named) and 1 for failures. ``STEPAUDIT_DEBUG=1`` shows the
traceback instead. Piping into ``head`` ends quietly with exit status 0 (as ``stepaudit explain`` does).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

COMMANDS = {
    "demo": ("stepaudit.demo", "main", "train SGD / momentum / Adam on digits, audit every step, compare"),
    "explain": (
        "stepaudit.explain.cli",
        "main",
        "backprop on a small expression, and the largest step that goes downhill",
    ),
    "doctor": ("stepaudit.doctor.cli", "main", "run an unchanged training script and diagnose why it (doesn't) train"),
    "report": ("stepaudit.report.cli", "main", "write a self-contained HTML report of a run (or --terminal)"),
    "compare": ("stepaudit.report.cli", "compare_main", "overlay several runs in one HTML page and a table"),
    "export": ("stepaudit.export", "main", "export a run to TensorBoard, CSV or Parquet"),
    "lr-find": (
        "stepaudit.lrfind_cli",
        "main",
        "learning-rate range test that also measures overshoot and 2/λ_max (--demo)",
    ),
}


def usage() -> str:
    """The help text listing every subcommand."""
    width = max(map(len, COMMANDS))
    lines = ["usage: stepaudit <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'stepaudit <command> --help' for a command's options."]
    return "\n".join(lines)


def debug() -> bool:
    """Whether ``STEPAUDIT_DEBUG=1`` asks for tracebacks instead of one-line errors."""
    return os.environ.get("STEPAUDIT_DEBUG", "") not in ("", "0")


def fail(prog: str, error: BaseException, status: int = 1) -> int:
    """Print ``prog: error`` as one line on stderr and return ``status``; re-raise under ``STEPAUDIT_DEBUG=1``.

    Call it inside the ``except`` block that caught ``error``.
    """
    if debug():
        raise error
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def rich_console(**kwargs):
    """A ``rich.console.Console`` that lets a closed pipe raise ``BrokenPipeError`` (rich itself exits 1).

    ``main`` then ends quietly with 0, as for plain ``print``. Needs rich installed.
    """
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError("stdout was closed by its reader")

    return _Console(**kwargs)


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``| head``): drop what is left unwritten and exit quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then goes nowhere
    except (OSError, ValueError):
        pass
    return 0  # what was wanted was read; `stepaudit explain` ends the same way


@contextlib.contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """stepaudit's own warnings as one line each ("stepaudit doctor: warning: …"), not file:line and source;
    warnings raised elsewhere (the user's script under the doctor, torch) keep Python's format."""
    package = str(Path(__file__).resolve().parent)
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            print(f"{prog}: warning: {message}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = original


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; errors become one line on stderr (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"stepaudit {argv[0]}" if argv and argv[0] in COMMANDS else "stepaudit"
    try:
        with warnings_as_lines(prog):
            status = dispatch(argv)
        sys.stdout.flush()  # a broken pipe surfaces here, not in the interpreter's shutdown
        return status
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        if debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug():
            raise
        detail = " ".join(str(error).split())
        print(
            f"{prog}: {type(error).__name__}{': ' + detail if detail else ''} "
            "(set STEPAUDIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def dispatch(argv: list[str]) -> int:
    """Dispatch to the subcommand's own ``main``; no command or an unknown one prints the list and exits 2."""
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
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

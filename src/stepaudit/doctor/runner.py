"""Run a training script in-process as ``__main__`` (like ``python -m cProfile script.py``) under a watcher.

The script sees the ``sys.argv`` it expects and its own folder first on ``sys.path``. It is stopped by
``StopRun`` (a ``BaseException``) raised from a hook after ``--max-steps`` optimizer steps or
``--time-limit`` seconds; an alarm backstops the time limit for scripts stuck outside any hook. In JSON
mode the script's stdout goes to stderr (file descriptor 1 too), so stdout carries one JSON object.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .passive import PassiveWatcher, StopRun


@dataclass
class Outcome:
    """How the script ended: ``finished``, ``max_steps``, ``time_limit`` or ``error`` (with its traceback).

    ``exit_status`` is the status the script itself would have exited with (0 for a normal end and for a
    stop the doctor asked for; the ``sys.exit`` code; 1 for an uncaught exception). ``failure`` locates
    the error: ``{"type", "message", "file", "line"}`` (the innermost frame of the script), else None.
    ``after_stop`` marks an error raised while the script was unwinding from the doctor's own stop.
    """

    stopped: str
    error: str | None = None
    exit_code: int | None = None
    exit_status: int = 0
    failure: dict | None = None
    after_stop: bool = False


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python and file descriptor 1) to stderr, then restore."""
    sys.stdout.flush()
    saved_fd = None
    try:
        out_fd, err_fd = sys.__stdout__.fileno(), sys.__stderr__.fileno()
        saved_fd = os.dup(out_fd)
        os.dup2(err_fd, out_fd)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        saved_fd = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        if saved_fd is not None:
            os.dup2(saved_fd, sys.__stdout__.fileno())
            os.close(saved_fd)


@contextlib.contextmanager
def _script_environment(path: Path, args: list[str]) -> Iterator[None]:
    """``sys.argv`` as the script expects and its folder first on ``sys.path``, restored afterwards."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        yield
    finally:
        sys.argv[:] = saved_argv
        sys.path[:] = saved_path


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Backstop for the time limit: raise StopRun from a SIGALRM if no hook got the chance to."""
    usable = (
        seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise StopRun("time_limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _script_traceback(error: BaseException, path: Path) -> str:
    """The traceback from the script's own frames on (runpy and stepaudit frames dropped)."""
    exc = traceback.TracebackException.from_exception(error)
    frames = list(exc.stack)
    target = str(path.resolve())
    for i, frame in enumerate(frames):
        if os.path.abspath(frame.filename) == target:
            exc.stack = traceback.StackSummary.from_list(frames[i:])
            break
    else:  # no frame of the script (a SyntaxError in it, say): drop the doctor's and runpy's frames
        exc.stack = traceback.StackSummary.from_list([f for f in frames if not _own_frame(f.filename)])
    return "".join(exc.format()).rstrip()


_OWN_DIRS = tuple(
    os.path.dirname(os.path.realpath(m.__file__)) + os.sep
    for m in (sys.modules[__package__.rsplit(".", 1)[0]], sys.modules.get("torch"))
    if m is not None
)


def _frame_location(error: BaseException, path: Path) -> tuple[str | None, int | None]:
    """file:line of the innermost frame of the script in the traceback; else the innermost frame outside
    stepaudit, torch, runpy and frozen modules (a helper module of the user's)."""
    if isinstance(error, SyntaxError) and error.filename:  # raised while compiling: no frame of the file
        return error.filename, error.lineno
    frames = traceback.extract_tb(error.__traceback__)
    target = os.path.realpath(path)
    for frame in reversed(frames):
        if os.path.realpath(frame.filename) == target:
            return frame.filename, frame.lineno
    for frame in reversed(frames):
        if not _own_frame(frame.filename):
            return frame.filename, frame.lineno
    return None, None


def _own_frame(filename: str) -> bool:
    """A frame of stepaudit, torch, runpy or a frozen module (not the user's code)."""
    real = os.path.realpath(filename)
    return filename.startswith("<") or real.startswith(_OWN_DIRS) or os.path.basename(real) == "runpy.py"


def _failure(error: BaseException, path: Path, message: str | None = None) -> dict:
    """``{"type", "message", "file", "line"}`` of the script's failure."""
    file, line = _frame_location(error, path)
    if message is None:
        message = error.msg if isinstance(error, SyntaxError) and error.msg else str(error)
    return {"type": type(error).__name__, "message": message, "file": file, "line": line}


def _exit_status(code) -> int:
    """The status ``sys.exit(code)`` gives the interpreter: None → 0, an int as is, anything else → 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code % 256
    return 1


def run_script(
    path: str | os.PathLike, args: list[str], watcher: PassiveWatcher, quiet_stdout: bool = False
) -> Outcome:
    """Run ``path`` as ``__main__`` with ``args`` while ``watcher`` is installed; always uninstall it."""
    script = Path(path)
    if not script.is_file():
        raise FileNotFoundError(f"no such script: {script}; pass the path of a Python training script")
    grace = None if watcher.time_limit is None else watcher.time_limit + max(2.0, 0.1 * watcher.time_limit)
    redirect = stdout_to_stderr() if quiet_stdout else contextlib.nullcontext()
    outcome = Outcome("finished")
    with redirect, _script_environment(script, args):
        watcher.install()
        try:
            with _alarm(grace):
                runpy.run_path(str(script), run_name="__main__")
        except StopRun as stop:
            outcome = Outcome(stop.reason)
        except SystemExit as exit_:
            status = _exit_status(exit_.code)
            if status != 0:
                shown = exit_.code if isinstance(exit_.code, int) else repr(exit_.code)
                outcome = Outcome(
                    "error",
                    error=f"the script exited with status {shown}",
                    exit_code=status,
                    exit_status=status,
                    failure=_failure(exit_, script, f"exit status {shown}"),
                )
        except KeyboardInterrupt as error:
            outcome = Outcome(
                "error",
                error=_script_traceback(error, script) or "KeyboardInterrupt",
                exit_status=130,
                failure=_failure(error, script),
            )
        except BaseException as error:  # the script's own failure: report it, still diagnose
            outcome = Outcome(
                "error", error=_script_traceback(error, script), exit_status=1, failure=_failure(error, script)
            )
        finally:
            watcher.close()
    if watcher.stopping is not None and outcome.stopped in ("finished", "error"):
        # The doctor asked the script to stop and it did not end through StopRun: it caught StopRun and
        # returned, or failed while unwinding from it. Either way the stop was the doctor's: a normal end.
        outcome.after_stop = outcome.stopped == "error"
        outcome.stopped, outcome.exit_status, outcome.exit_code = watcher.stopping, 0, None
    return outcome

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .passive import PassiveWatcher, StopRun


@dataclass
class Outcome:
    """How the script ended: ``finished``, ``max_steps``, ``time_limit`` or ``error`` (with its traceback)."""

    stopped: str
    error: str | None = None
    exit_code: int | None = None


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
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
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
    return "".join(exc.format()).rstrip()


def run_script(path: str | os.PathLike, args: list[str], watcher: PassiveWatcher,
               quiet_stdout: bool = False) -> Outcome:
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
            code = exit_.code
            if code not in (None, 0):
                outcome = Outcome("error", error=f"the script exited with status {code!r}",
                                  exit_code=code if isinstance(code, int) else 1)
        except KeyboardInterrupt as error:
            outcome = Outcome("error", error=_script_traceback(error, script) or "KeyboardInterrupt")
        except BaseException as error:  # the script's own failure: report it, still diagnose
            outcome = Outcome("error", error=_script_traceback(error, script))
        finally:
            watcher.close()
    if outcome.stopped == "finished" and watcher.stopping is not None:
        outcome.stopped = watcher.stopping  # the script caught StopRun itself and then returned
    return outcome

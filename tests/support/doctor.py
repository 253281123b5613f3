"""Run a script under the passive doctor in this process and diagnose it (the tests' shortcut to `stepaudit doctor`)."""

from __future__ import annotations

from pathlib import Path

from stepaudit.doctor import diagnose_facts
from stepaudit.doctor.facts import Facts
from stepaudit.doctor.passive import PassiveWatcher
from stepaudit.doctor.runner import run_script


def watch_script(path: Path, max_steps: int = 300) -> PassiveWatcher:
    """The finished watcher of ``path`` run as a script (the script must not raise)."""
    watcher = PassiveWatcher(max_steps=max_steps)
    outcome = run_script(path, [], watcher)
    assert outcome.error is None, outcome.error
    watcher.finish()
    return watcher


def diagnose_script(path: Path, max_steps: int = 300) -> list[dict]:
    """The doctor's diagnoses of ``path`` run as a script."""
    watcher = watch_script(path, max_steps)
    return diagnose_facts(Facts(watcher.records, {}, watcher.observations()))

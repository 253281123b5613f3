"""Run a script under the passive doctor in this process and diagnose it (the tests' shortcut to `stepaudit doctor`)."""

from __future__ import annotations

import textwrap
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


TOY_CLASSES = """
import torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(512, 8, generator=g)
y = (X @ torch.randn(8, 3, generator=g)).argmax(1)
"""


def toy_script(tmp_path: Path, body: str) -> Path:
    """``train.py`` in ``tmp_path``: a 3-class linear toy problem (``X``, ``y``; ``TOY_CLASSES``), then ``body``."""
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(TOY_CLASSES) + textwrap.dedent(body))
    return path

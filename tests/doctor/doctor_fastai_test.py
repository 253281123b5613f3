"""The doctor on an unchanged fastai script (Learner, fastai's Adam, fit_one_cycle): healthy is healthy, lr 10 is lr_too_high."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastai.tabular.all")
CASE = Path(__file__).parent / "cases" / "c77_fastai_tabular.py"


def doctor(script: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--json", "--no-store", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("lr, expected", [(None, "healthy"), (10.0, "lr_too_high")])
def test_fastai_learner_diagnosed(tmp_path, lr, expected):
    source = CASE.read_text()
    if lr is not None:
        assert "learn.fit_one_cycle(4, 1e-2)" in source
        source = source.replace("learn.fit_one_cycle(4, 1e-2)", f"learn.fit_one_cycle(4, {lr})")
    script = tmp_path / "train.py"
    script.write_text(source)
    found = doctor(script)["diagnoses"]
    assert found[0]["code"] == expected, found
    if expected == "healthy":
        assert all(d["severity"] == "info" for d in found)

"""The README's first Python example runs as written (in a scratch folder)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert len(namespace["frame"]) == 100
    assert (tmp_path / "runs" / "momentum" / "stepaudit.sqlite").exists()
    assert capsys.readouterr().out.strip()

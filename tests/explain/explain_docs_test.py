"""The documented output is the real output: every block marked `<!-- explain-output: ARGS -->`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stepaudit.explain import main

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- explain-output: (.*?) -->\s*```text\n(.*?)\n```", re.S)


def documented_blocks() -> list[tuple[str, str, str]]:
    found = []
    for name in ("docs/explain.md", "README.md"):
        path = ROOT / name
        if path.exists():
            found += [(name, args, text) for args, text in BLOCK.findall(path.read_text(encoding="utf-8"))]
    return found


def test_the_docs_have_the_default_output():
    assert any(args == "(default)" for _, args, _ in documented_blocks())


@pytest.mark.parametrize("where, args, text", documented_blocks(), ids=lambda v: str(v)[:20])
def test_documented_output_matches(capsys, where, args, text):
    argv = [] if args == "(default)" else shlex.split(args)
    assert main(argv) == 0
    out = capsys.readouterr().out.rstrip("\n")
    if args == "(default)":
        assert out == text, f"{where}: paste the output of `stepaudit explain` again"
    else:
        assert text in out, f"{where}: the excerpt for `stepaudit explain {args}` is out of date"

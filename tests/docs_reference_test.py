"""The reference pages match the code: every diagnosis code, CLI command and probe is documented."""

from __future__ import annotations

import re
from pathlib import Path

import stepaudit.probes as probes
from stepaudit.cli import COMMANDS
from stepaudit.doctor import CODES

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_diagnosis_code_has_a_row_in_the_doctor_reference():
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", (DOCS / "doctor.md").read_text(), flags=re.M))
    missing = [code for code in CODES if code != "healthy" and code not in rows]
    assert not missing, f"docs/doctor.md has no row for {missing}"


def test_every_command_is_documented():
    text = "".join(p.read_text() for p in DOCS.glob("*.md")) + (DOCS.parent / "README.md").read_text()
    missing = [name for name in COMMANDS if f"stepaudit {name}" not in text]
    assert not missing, f"no page shows `stepaudit {missing}`"


def test_every_probe_is_documented():
    text = (DOCS / "probes.md").read_text()
    missing = [name for name in probes.builtin() if f"`{name}`" not in text and f'"{name}":' not in text]
    assert not missing, f"docs/probes.md does not name {missing}"

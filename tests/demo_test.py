"""The demo and the CLI entry points run end to end on built-in data."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

import stepaudit
from stepaudit import cli, demo


def test_demo_json_trains_each_optimizer_and_writes_runs(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "12", "--json", "--no-report", "--runs", str(tmp_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["runs"]
    assert [r["optimizer"] for r in rows] == ["sgd", "momentum", "adam"]
    for row in rows:
        records = stepaudit.load(row["run"])
        assert len(records) == 12  # every step audited
        assert row["share_increase"] == (records["verdict"] == "increase").mean()
        assert 0.0 <= row["test_accuracy"] <= 1.0


def test_demo_rejects_unknown_optimizer(capsys):
    assert cli.main(["demo", "--optimizers", "lion"]) == 2
    assert "unknown optimizer" in capsys.readouterr().err


def test_cli_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "doctor" in capsys.readouterr().out
    assert cli.main([]) == 2  # no command is a usage error: the list goes to stderr
    assert "doctor" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "stepaudit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("stepaudit ")


def test_public_api_names():
    import stepaudit.explain  # noqa: F401 - importing the subpackage must not shadow the function

    assert callable(stepaudit.explain) and callable(stepaudit.Audit) and callable(stepaudit.load)
    assert stepaudit.explain("x * y", at={"x": 2.0, "y": 3.0})["grads"] == {"x": 3.0, "y": 2.0}


def test_demo_eos_takes_quiet_and_runs(tmp_path, capsys):
    small = ["--lrs", "0.5", "--steps", "20", "--every", "10", "--n", "50", "--width", "8"]
    assert cli.main(["demo", "--eos", "--quiet", *small, "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2/lr" in out and "lr=0.5:" not in out  # the table, without the per-rate progress lines
    assert str(tmp_path) in out and len(list(tmp_path.glob("eos-*/eos.json"))) == 1
    assert cli.main(["demo", "--eos", *small, "--out", str(tmp_path / "loud")]) == 0
    assert "lr=0.5:" in capsys.readouterr().out


def test_demo_help_says_which_options_apply_to_eos(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--steps, --seed, --runs and --quiet apply to it" in help_text


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress, advance = demo._progress("sgd", 10, quiet=False)
    assert progress is None
    advance()
    assert sys.stderr.getvalue() == ""


def test_demo_writes_nothing_to_a_piped_stderr(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepaudit",
            "demo",
            "--steps",
            "2",
            "--optimizers",
            "sgd",
            "--no-report",
            "--runs",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stderr == "" and "sgd" in result.stdout

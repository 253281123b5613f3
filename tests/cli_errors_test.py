"""Errors of the ``stepaudit`` command: one line on stderr naming the problem and the fix, exit status 2
for usage errors and 1 for failures, no traceback unless STEPAUDIT_DEBUG=1; a closed pipe ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.samples import write_synthetic_run

import stepaudit.report.cli
from stepaudit import cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    good = write_synthetic_run(root / "good", steps=30)
    bad = root / "bad"
    bad.mkdir()
    (bad / "stepaudit.sqlite").write_bytes((good / "stepaudit.sqlite").read_bytes()[:3000])  # truncated
    return good, bad


def stepaudit_cli(*args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STEPAUDIT_DEBUG"}
    if debug:
        env["STEPAUDIT_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "stepaudit", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_corrupt_store_is_one_line_and_exit_1_in_every_command(runs, tmp_path):
    good, bad = runs
    for args in (
        ["report", str(bad)],
        ["compare", str(good), str(bad), "--no-html"],
        ["export", str(bad), "--csv", str(tmp_path / "x.csv")],
    ):
        result = stepaudit_cli(*args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(
            f"stepaudit {args[0]}: {bad / 'stepaudit.sqlite'} is not a stepaudit run store (corrupt or truncated?)"
        )


def test_stepaudit_debug_shows_the_traceback(runs):
    _, bad = runs
    result = stepaudit_cli("report", str(bad), debug=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RunStoreError" in result.stderr


def test_no_command_prints_the_usage_and_exits_2():
    result = stepaudit_cli()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: stepaudit <command>")


@pytest.mark.parametrize(
    "args",
    [
        ["report", "{good}", "--terminal"],
        ["compare", "{good}", "{good}", "--no-html"],
        ["export", "{good}", "--csv", "{tmp}/x.csv"],
        ["--help"],
        ["explain", "x * y"],
    ],
)
def test_a_closed_pipe_ends_quietly(runs, tmp_path, args):
    """``stepaudit … | head -1``: the reader is gone before the command writes; no traceback, status 0."""
    good, _ = runs
    argv = [a.format(good=good, tmp=tmp_path) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "STEPAUDIT_DEBUG"}
    child = subprocess.Popen(
        [sys.executable, "-m", "stepaudit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    child.stdout.close()  # as `head` exits after its line: every write to stdout now fails with EPIPE
    err = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait(timeout=300) == 0, err
    assert err == ""


def test_an_unexpected_error_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    monkeypatch.delenv("STEPAUDIT_DEBUG", raising=False)

    def broken(argv):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(stepaudit.report.cli, "main", broken)
    assert cli.main(["report", "run"]) == 1
    err = capsys.readouterr().err
    assert err == "stepaudit report: RuntimeError: something unexpected (set STEPAUDIT_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("STEPAUDIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["report", "run"])


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.delenv("STEPAUDIT_DEBUG", raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(stepaudit.report.cli, "main", interrupted)
    assert cli.main(["report", "run"]) == 130
    assert capsys.readouterr().err == "stepaudit report: interrupted\n"


def test_usage_errors_keep_exit_2_and_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STEPAUDIT_DEBUG", raising=False)
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no stepaudit run" in err and "pass a run folder" in err
    assert cli.main(["export", str(tmp_path / "nothing"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_fail_prints_one_line_or_reraises_under_debug(monkeypatch, capsys):
    monkeypatch.delenv("STEPAUDIT_DEBUG", raising=False)
    try:
        raise ValueError("two\nlines")
    except ValueError as error:
        assert cli.fail("stepaudit x", error, 2) == 2
    assert capsys.readouterr().err == "stepaudit x: two lines\n"
    monkeypatch.setenv("STEPAUDIT_DEBUG", "1")
    with pytest.raises(ValueError):
        try:
            raise ValueError("shown")
        except ValueError as error:
            cli.fail("stepaudit x", error)


def test_a_reused_doctor_run_folder_warns_in_one_line_in_the_command_lines_language(tmp_path):
    """The 'earlier run replaced' warning: one line naming the CLI flag (not run=None, not file:line)."""
    script = tmp_path / "tiny.py"
    script.write_text(
        "import torch\nm = torch.nn.Linear(2, 1)\no = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(3):\n    o.zero_grad(); m(torch.randn(4, 2)).pow(2).mean().backward(); o.step()\n"
    )
    folder = str(tmp_path / "R")
    first = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--run", folder, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0 and "warning" not in first.stderr
    second = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--run", folder, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in second.stderr.splitlines() if "earlier run" in line]
    assert lines == [
        f"stepaudit doctor: warning: {folder} held 3 steps of an earlier run; they are replaced "
        "(give --run a new folder, or leave --run out, to keep them)"
    ]
    assert "UserWarning" not in second.stderr and "run=None" not in second.stderr


def test_api_warnings_keep_the_api_wording(tmp_path):
    import warnings

    from stepaudit.store import RunStore

    RunStore(tmp_path / "r", {"model": "m"}).append({"step": 0, "loss_before": 1.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunStore(tmp_path / "r", {"model": "m"})
    assert len(caught) == 1 and "pass run=None" in str(caught[0].message)


def test_torchs_warnings_under_the_doctor_point_at_the_scripts_line_once(tmp_path):
    """A loss's broadcasting warning: the script's file:line, shown once as in a plain run, never stepaudit's."""
    script = tmp_path / "bc.py"
    script.write_text(
        "import torch\nm = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "x, y = torch.randn(16, 3), torch.randn(16)\nfor step in range(30):\n    opt.zero_grad()\n"
        "    loss = torch.nn.functional.mse_loss(m(x), y)\n    loss.backward()\n    opt.step()\n"
    )
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    doctor = subprocess.run(
        [sys.executable, "-m", "stepaudit", "doctor", "--no-store", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    def shown(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if "UserWarning: Using a target size" in line]

    assert shown(plain.stderr) == [
        f"{script}:7: UserWarning: Using a target size (torch.Size([16])) that is different "
        "to the input size (torch.Size([16, 1])). This will likely lead to incorrect results "
        "due to broadcasting. Please ensure they have the same size."
    ]
    assert shown(doctor.stderr) == shown(plain.stderr)
    assert "stepaudit" not in "".join(shown(doctor.stderr)) and "passive.py" not in doctor.stderr

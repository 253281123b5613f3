"""``stepaudit doctor`` end to end: the JSON contract, the report, the run store, and ``Audit.diagnose()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import stepaudit
from stepaudit.doctor import cli

KEYS = {"code", "severity", "confidence", "first_step", "evidence", "fix"}

SCRIPT = """
import sys, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4), nn.Softmax(dim=1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x = torch.randn(256, 8); y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
print("args", sys.argv[1:])
for step in range(10_000):
    idx = torch.randint(0, 256, (64,))
    opt.zero_grad()
    loss = nn.CrossEntropyLoss()(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    if step % 5 == 0:
        print("step", step, round(loss.item(), 4))
"""


def write(tmp_path, source, name="train.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_json_contract_run_store_and_stdout(tmp_path):
    script = write(tmp_path, SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepaudit",
            "doctor",
            "--json",
            "--max-steps",
            "15",
            "--run",
            str(run),
            str(script),
            "--flag",
            "value",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds exactly one JSON object
    assert set(result) == {"diagnoses", "steps", "script", "stopped", "exit_status", "error", "run"}
    assert result["steps"] == 15 and result["stopped"] == "max_steps" and result["script"] == str(script)
    assert result["exit_status"] == 0 and result["error"] is None and result["run"] == str(run)  # the doctor's stop
    assert all(set(d) == KEYS for d in result["diagnoses"])
    assert result["diagnoses"][0]["code"] == "loss_wiring"  # the softmax before CrossEntropyLoss
    assert "args ['--flag', 'value']" in done.stderr and "step 10" in done.stderr  # the script's own output
    assert stepaudit.diagnose(run) == result["diagnoses"]
    steps = stepaudit.load(run)
    assert len(steps) == 15 and list(steps["step"]) == list(range(15))
    meta = stepaudit.load(run, table="meta")
    assert meta["mode"] == "passive" and meta["stopped"] == "max_steps" and meta["optimizer"] == "Adam"


def test_terminal_report_and_script_error(tmp_path, capfd):
    script = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad(); torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8, dtype=torch.long)).backward(); opt.step()
        print("before the crash")
        raise RuntimeError("data loader died")
    """,
    )
    assert cli.main(["--no-store", str(script)]) == 1  # the script's own exit status
    out, err = capfd.readouterr()
    assert out.index("before the crash") < out.index("stepaudit doctor:")  # the script's output, then the report
    assert "stopped: error" in out and "RuntimeError: data loader died" in out
    assert "RuntimeError: data loader died" in err
    assert cli.main(["--json", "--no-store", str(script)]) == 1
    out, err = capfd.readouterr()
    result = json.loads(out)
    assert result["stopped"] == "error" and result["steps"] == 3 and result["diagnoses"]
    assert "before the crash" in err


def test_bad_arguments(tmp_path, capfd):
    assert cli.main([str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capfd.readouterr().err
    assert cli.main(["--max-steps", "-1", str(write(tmp_path, "pass\n"))]) == 2


def test_audit_diagnose_uses_own_batch_fields(tmp_path):
    """Active mode: the own-batch parabola separates a too-short, a fitting and a far too long step."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    results = {}
    for lr in (0.05, 2.0, 30.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        audit = stepaudit.Audit(model, torch.optim.SGD(model.parameters(), lr=lr), loss_fn, run=tmp_path / str(lr))
        for _ in range(30):
            audit.step((x, y))
        results[lr] = audit.diagnose()
        assert results[lr] == stepaudit.diagnose(tmp_path / str(lr), meta=audit.store_meta())
        audit.close()
    assert results[0.05][0]["code"] == "lr_too_low" and "valley floor" in results[0.05][0]["evidence"]
    assert [d["code"] for d in results[2.0]] == ["healthy"]
    assert results[30.0][0]["code"] == "lr_too_high" and "own batch" in results[30.0][0]["evidence"]


# -- the outcome: the script's own exit status, and no diagnosis invented for a script that never stepped ---------

STEPS = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range({n}):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.randn(32, 4)), torch.randint(0, 3, (32,))).backward()
    opt.step()
"""


def flat(text):
    """The text with every run of whitespace as one space (the report wraps long lines)."""
    return " ".join(text.split())


def doctor_json(capfd, *argv):
    """(exit status, the JSON result, stderr) of ``stepaudit doctor --json --no-store *argv`` run in-process."""
    status = cli.main(["--json", "--no-store", *map(str, argv)])
    out, err = capfd.readouterr()
    return status, json.loads(out), err


def assert_stopped_before_first_step(result, error_type, line, script):
    assert result["steps"] == 0 and result["diagnoses"] == [] and result["stopped"] == "error"
    assert result["error"]["type"] == error_type and result["error"]["line"] == line
    assert result["error"]["file"] == str(script) and result["run"] is None


def test_uncaught_exception_before_the_first_step_exits_1_without_a_diagnosis(tmp_path, capfd):
    script = write(
        tmp_path,
        """
        import torch
        def load_data():
            raise FileNotFoundError("no such file: data.csv")
        model = torch.nn.Linear(4, 3)
        data = load_data()
    """,
    )
    status, result, err = doctor_json(capfd, script)
    assert status == 1 and result["exit_status"] == 1
    assert_stopped_before_first_step(result, "FileNotFoundError", 4, script)  # the raise, not the call
    assert result["error"]["message"] == "no such file: data.csv"
    assert f"stopped before the first optimizer step: FileNotFoundError: no such file: data.csv ({script}:4)" in err
    assert cli.main(["--no-store", str(script)]) == 1
    out = flat(capfd.readouterr().out)
    assert f"stopped before the first optimizer step: FileNotFoundError: no such file: data.csv ({script}:4)" in out
    assert "healthy" not in out and "root cause" not in out and "evidence" not in out


def test_syntax_error_exits_1_and_names_the_line(tmp_path, capfd):
    script = write(tmp_path, "import torch\nx = (\n")
    status, result, err = doctor_json(capfd, script)
    assert status == 1 and result["exit_status"] == 1
    assert_stopped_before_first_step(result, "SyntaxError", 2, script)
    assert "runner.py" not in err and "runpy" not in err  # the traceback shows the script, not the doctor


def test_sys_exit_code_is_the_doctors_exit_status(tmp_path, capfd):
    script = write(tmp_path, "import sys\nprint('checking')\nsys.exit(3)\n")
    status, result, err = doctor_json(capfd, script)
    assert status == 3 and result["exit_status"] == 3
    assert_stopped_before_first_step(result, "SystemExit", 3, script)
    assert f"stopped before the first optimizer step: the script exited with status 3 ({script}:3)" in err


def test_argparse_failure_exits_2(tmp_path, capfd):
    script = write(
        tmp_path,
        """
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float, required=True)
        args = parser.parse_args()
    """,
    )
    status, result, err = doctor_json(capfd, script)
    assert status == 2 and result["exit_status"] == 2
    assert_stopped_before_first_step(result, "SystemExit", 5, script)  # the parse_args() line of the script
    assert "the following arguments are required: --lr" in err  # argparse's own message, unchanged


def test_normal_end_and_sys_exit_0_exit_0(tmp_path, capfd):
    for source in (
        STEPS.format(n=6),
        STEPS.format(n=6) + "import sys\nsys.exit(0)\n",
        STEPS.format(n=6) + "raise SystemExit\n",
    ):
        status, result, _ = doctor_json(capfd, write(tmp_path, source))
        assert status == 0 and result["exit_status"] == 0 and result["error"] is None
        assert result["stopped"] == "finished" and result["steps"] == 6 and result["diagnoses"]


def test_the_doctors_own_stop_is_a_normal_end(tmp_path, capfd):
    status, result, _ = doctor_json(capfd, "--max-steps", "4", write(tmp_path, STEPS.format(n=1000)))
    assert status == 0 and result["stopped"] == "max_steps" and result["exit_status"] == 0 and result["error"] is None
    # a script that fails while unwinding from the doctor's stop still ended because the doctor stopped it
    script = write(
        tmp_path,
        "try:\n"
        + textwrap.indent(STEPS.format(n=1000), "    ")
        + "finally:\n    raise RuntimeError('cleanup assumed a full run')\n",
    )
    status, result, _ = doctor_json(capfd, "--max-steps", "4", script)
    assert status == 0 and result["stopped"] == "max_steps" and result["diagnoses"]
    assert result["error"]["message"] == "cleanup assumed a full run"


def test_no_optimizer_step_but_a_normal_end_is_still_diagnosed(tmp_path, capfd):
    """scheduler.step() instead of optimizer.step(): the script ran to its end, and that is a finding."""
    script = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 10)
        for step in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(32, 4)), torch.randint(0, 3, (32,))).backward()
            scheduler.step()
    """,
    )
    status, result, _ = doctor_json(capfd, script)
    assert status == 0 and result["steps"] == 0 and result["stopped"] == "finished" and result["error"] is None
    assert result["diagnoses"] and result["diagnoses"][0]["code"] != "healthy"


def test_failure_after_some_steps_keeps_their_diagnoses_and_shows_the_failure(tmp_path, capfd):
    script = write(tmp_path, STEPS.format(n=8) + "raise RuntimeError('data loader died')\n")
    status, result, _ = doctor_json(capfd, script)
    assert status == 1 and result["exit_status"] == 1 and result["steps"] == 8 and result["diagnoses"]
    assert result["error"] == {"type": "RuntimeError", "message": "data loader died", "file": str(script), "line": 10}
    assert cli.main(["--no-store", str(script)]) == 1
    out = flat(capfd.readouterr().out)
    failure = f"the script failed after 8 optimizer steps: RuntimeError: data loader died ({script}:10)"
    assert failure.lower() in out.lower()
    assert out.lower().index(failure.lower()) < out.index(result["diagnoses"][0]["code"])  # the failure first
    assert "exit status 1" in out and "before the failure" in out
    if result["diagnoses"][0]["code"] == "healthy":  # never a bare "healthy" for a run that failed
        assert "healthy until the failure" in out.lower()


def test_error_location_is_the_innermost_frame_of_the_script(tmp_path, capfd):
    """A failure inside torch or a helper module is located in the script; without a script frame, in the
    user's own module (not in stepaudit or torch)."""
    script = write(
        tmp_path,
        """
        import torch
        model = torch.nn.Linear(4, 3)
        model(torch.randn(2, 5))
    """,
    )
    _, result, _ = doctor_json(capfd, script)
    assert result["error"]["type"] == "RuntimeError" and result["error"]["line"] == 4
    assert result["error"]["file"] == str(script)
    write(tmp_path, "def load():\n    raise KeyError('label')\n", name="helper.py")
    script = write(tmp_path, "import helper\nhelper.load()\n", name="main.py")
    _, result, _ = doctor_json(capfd, script)
    assert result["error"]["line"] == 2 and result["error"]["file"] == str(script)
    script = write(tmp_path, "import broken_helper\n", name="imports.py")
    write(tmp_path, "x = 1\nraise ImportError('needs a GPU build')\n", name="broken_helper.py")
    _, result, _ = doctor_json(capfd, script)
    assert result["error"]["file"] == str(script) and result["error"]["line"] == 1


def test_json_has_the_run_folder(tmp_path, capfd):
    run = tmp_path / "run"
    status = cli.main(["--json", "--run", str(run), str(write(tmp_path, STEPS.format(n=5)))])
    result = json.loads(capfd.readouterr().out)
    assert status == 0 and result["run"] == str(run) and (run / "stepaudit.sqlite").exists()
    meta = stepaudit.load(run, table="meta")
    assert meta["exit_status"] == 0 and meta["failure"] is None and meta["diagnoses"] == result["diagnoses"]


def test_doctor_options_after_the_script_name_get_a_hint(tmp_path, capfd):
    script = write(tmp_path, "import sys\nprint('args', sys.argv[1:])\n")
    assert cli.main(["--no-store", str(script), "--json"]) == 0
    out, err = capfd.readouterr()
    assert "args ['--json']" in out  # still the script's
    assert (
        "stepaudit doctor: --json after the script name is passed to the script; put doctor options before it"
        in err.splitlines()
    )
    assert cli.main(["--no-store", str(script), "--max-steps=5"]) == 0
    assert "--max-steps after the script name" in capfd.readouterr().err
    assert cli.main(["--no-store", str(script), "--epochs", "3"]) == 0
    assert "after the script name" not in capfd.readouterr().err


def test_run_pointing_at_a_file_is_refused_up_front(tmp_path, capfd):
    target = tmp_path / "a_file"
    target.write_text("not a run")
    script = write(tmp_path, STEPS.format(n=2))
    assert cli.main(["--run", str(target), str(script)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert f"--run {target} is an existing file" in err and "--no-store" in err
    assert target.read_text() == "not a run"


def test_a_directory_is_not_a_script(tmp_path, capfd):
    assert cli.main([str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert f"stepaudit doctor: {tmp_path} is a directory, not a script" in err and len(err.strip().splitlines()) == 1

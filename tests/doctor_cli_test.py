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
    done = subprocess.run([sys.executable, "-m", "stepaudit", "doctor", "--json", "--max-steps", "15", "--run", str(run),
                           str(script), "--flag", "value"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout holds exactly one JSON object
    assert set(result) == {"diagnoses", "steps", "script", "stopped"}
    assert result["steps"] == 15 and result["stopped"] == "max_steps" and result["script"] == str(script)
    assert all(set(d) == KEYS for d in result["diagnoses"])
    assert result["diagnoses"][0]["code"] == "loss_wiring"  # the softmax before CrossEntropyLoss
    assert "args ['--flag', 'value']" in done.stderr and "step 10" in done.stderr  # the script's own output
    assert stepaudit.diagnose(run) == result["diagnoses"]
    steps = stepaudit.load(run)
    assert len(steps) == 15 and list(steps["step"]) == list(range(15))
    meta = stepaudit.load(run, table="meta")
    assert meta["mode"] == "passive" and meta["stopped"] == "max_steps" and meta["optimizer"] == "Adam"


def test_terminal_report_and_script_error(tmp_path, capfd):
    script = write(tmp_path, """
        import torch
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad(); torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8, dtype=torch.long)).backward(); opt.step()
        print("before the crash")
        raise RuntimeError("data loader died")
    """)
    assert cli.main(["--no-store", str(script)]) == 0
    out, err = capfd.readouterr()
    assert out.index("before the crash") < out.index("stepaudit doctor:")  # the script's output, then the report
    assert "stopped: error" in out and "RuntimeError: data loader died" in out
    assert "RuntimeError: data loader died" in err
    assert cli.main(["--json", "--no-store", str(script)]) == 0
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
        for step in range(30):
            audit.step((x, y))
        results[lr] = audit.diagnose()
        assert results[lr] == stepaudit.diagnose(tmp_path / str(lr), meta=audit.store_meta())
        audit.close()
    assert results[0.05][0]["code"] == "lr_too_low" and "valley floor" in results[0.05][0]["evidence"]
    assert [d["code"] for d in results[2.0]] == ["healthy"]
    assert results[30.0][0]["code"] == "lr_too_high" and "own batch" in results[30.0][0]["evidence"]

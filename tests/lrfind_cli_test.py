"""``stepaudit lr-find script.py``: the range test on an unchanged script's model, optimizer and batches.

The oracle is ``stepaudit.lr_find`` called here on the same model, optimizer and batches built independently
(the script's own ``setup()`` imported, not run as ``__main__``): the CLI's suggestion must equal it exactly.
"""

from __future__ import annotations

import re
import runpy
import textwrap
from pathlib import Path

import pytest
import torch.nn.functional as F

from stepaudit import cli, lr_find
from stepaudit.lrfind_script import find_in_script

DOCS = Path(__file__).resolve().parents[1] / "docs" / "lr_find.md"

TRAIN = """
import sys
import torch
import torch.nn.functional as F


def setup():
    torch.manual_seed(0)
    X = torch.randn(512, 10)
    Y = (X @ torch.randn(10, 3)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(X[i : i + 32], Y[i : i + 32]) for i in range(0, 512, 32)]
    return model, optimizer, batches


if __name__ == "__main__":
    model, optimizer, batches = setup()
    for epoch in range(int(sys.argv[1])):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
"""


def write(folder: Path, source: str, name: str = "train.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def oracle(script: Path, count: int, num: int = 100):
    """``lr_find`` on the script's model and optimizer at their start, on its first ``count`` batches."""
    model, optimizer, batches = runpy.run_path(str(script), run_name="oracle")["setup"]()
    cycle = [batches[i % len(batches)] for i in range(count)]
    return lr_find(
        optimizer=optimizer, model=model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches=cycle, num=num
    )


def lr_find_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(["lr-find", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_suggestion_equals_lr_find_on_the_scripts_own_model_optimizer_and_batches(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = write(tmp_path, TRAIN)
    expected = oracle(script, 100)
    status, out, err = lr_find_cli(capsys, "-o", "chart.svg", str(script), "20")
    assert status == 0, err
    shown = re.search(r"^suggestion: (\S+)", out, flags=re.M).group(1)
    assert shown == f"{expected.suggestion:.3g}"
    assert "batches: the script's own first 100" in out and "fastai valley" in out and "λ_max" in out
    assert (tmp_path / "chart.svg").read_text().startswith("<svg")
    run = find_in_script(script, ["20"])  # the same run through the API: every number equal
    assert run.result.suggestion == expected.suggestion and run.result.reason == expected.reason
    assert (run.result.losses == expected.losses).all() and run.result.suggestions == expected.suggestions


def test_a_script_that_ends_sooner_gives_its_batches_reused_cyclically_and_says_so(tmp_path, capsys):
    script = write(tmp_path, TRAIN)
    run = find_in_script(script, ["2"], num=40)  # 2 epochs of 16 batches: 32 kept, the sweep cycles them
    assert (
        "first 32 training batches, re-used cyclically for 40 lrs" in run.batches
        and "ended after 32 steps" in run.batches
    )
    expected = oracle(script, 40, num=40)
    assert run.result.suggestion == expected.suggestion
    assert (run.result.losses == expected.losses).all()


def test_dropout_batchnorm_and_a_squeezed_output_replay_under_adam(tmp_path, capsys):
    script = write(
        tmp_path,
        """
        import torch
        import torch.nn as nn
        torch.manual_seed(1)
        X, Y = torch.randn(256, 6), torch.randn(256)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.MSELoss()
        for step in range(200):
            if step % 10 == 0:  # an evaluation forward with grad enabled and its own loss, no backward
                model.eval()
                nn.functional.l1_loss(model(X[:8]).squeeze(1), Y[:8])
                model.train()
            i = (step * 32) % 256
            loss = loss_fn(model(X[i : i + 32]).squeeze(1), Y[i : i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        """,
    )
    before = script.read_bytes()
    status, out, err = lr_find_cli(capsys, "--num", "30", str(script))
    assert status == 0, err
    assert "lr range test (Adam)" in out and "loss F.mse_loss" in out
    assert script.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train.py"]


def test_a_script_under_cpu_autocast_replays_in_bfloat16(tmp_path, capsys):
    script = write(
        tmp_path,
        """
        import torch
        torch.manual_seed(2)
        X, Y = torch.randn(128, 8), torch.randint(0, 4, (128,))
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(50):
            i = (step * 16) % 128
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(X[i : i + 16]), Y[i : i + 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        """,
    )
    status, out, err = lr_find_cli(capsys, "--num", "20", str(script))
    assert status == 0, err
    assert "lr range test (AdamW)" in out


ERRORS = {
    "never_steps": (
        """
        import torch
        model = torch.nn.Linear(3, 1)
        loss = torch.nn.functional.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 1))
        loss.backward()
        """,
        "without calling optimizer.step()",
    ),
    "crashes": (
        """
        import torch
        model = torch.nn.Linear(3, 1)
        raise ValueError("no data here")
        """,
        "failed before its first optimizer.step(): ValueError: no data here (train.py:4)",
    ),
    "closure": (
        """
        import torch
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.LBFGS(model.parameters())
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
        """,
        "with a closure",
    ),
    "params_outside_the_model": (
        """
        import torch
        model = torch.nn.Linear(3, 2)
        scale = torch.nn.Parameter(torch.ones(()))
        optimizer = torch.optim.SGD([*model.parameters(), scale], lr=0.1)
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3) * scale), torch.zeros(8, dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        """,
        "SGD holds parameters outside Linear",
    ),
    "extra_loss_term": (
        """
        import torch
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            out = model(torch.randn(8, 3))
            loss = torch.nn.functional.cross_entropy(out, torch.zeros(8, dtype=torch.long)) + model.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        """,
        "is not F.cross_entropy of the model's output",
    ),
    "no_functional_loss": (
        """
        import torch
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = (model(torch.randn(8, 3)) ** 2).mean()
        loss.backward()
        optimizer.step()
        """,
        "no model forward whose output goes into a torch.nn.functional loss",
    ),
    "keyword_inputs": (
        """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(3, 2)
            def forward(self, x=None):
                return self.fc(x)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(x=torch.randn(8, 3)), torch.zeros(8, dtype=torch.long))
        loss.backward()
        optimizer.step()
        """,
        "a model called with keyword inputs is not replayed",
    ),
    "loss_of_a_slice": (
        """
        import torch
        model = torch.nn.Linear(3, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.mse_loss(model(torch.randn(8, 3))[:, :2], torch.zeros(8, 2))
        loss.backward()
        optimizer.step()
        """,
        "the input of F.mse_loss was not Linear's output",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line_naming_the_fix_and_a_nonzero_exit(tmp_path, capsys, case):
    source, expected = ERRORS[case]
    script = write(tmp_path, source)
    status, out, err = lr_find_cli(capsys, str(script))
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("stepaudit lr-find: ") and "Traceback" not in err + out
    assert expected in err


def test_a_missing_script_and_demo_with_a_script_are_usage_errors(tmp_path, capsys):
    status, _, err = lr_find_cli(capsys, str(tmp_path / "missing.py"))
    assert status == 2 and err.count("\n") == 1 and "no such script" in err
    status, _, err = lr_find_cli(capsys, "--demo", str(tmp_path / "missing.py"))
    assert status == 2 and err.count("\n") == 1
    status, _, err = lr_find_cli(capsys, "--start-lr", "1", "--end-lr", "0.1", str(write(tmp_path, TRAIN)), "1")
    assert status == 2 and err.count("\n") == 1 and "start_lr" in err


def test_the_documented_script_runs_as_documented(tmp_path, capsys, monkeypatch):
    """docs/lr_find.md's example script: lr-find on it prints the summary it shows."""
    text = DOCS.read_text(encoding="utf-8")
    source = re.search(r"<!-- test: compile \(the script of .*?-->\n```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    script = write(tmp_path, source)
    status, out, err = lr_find_cli(capsys, "--num", "40", str(script))
    assert status == 0, err
    assert "batches: the script's own first 40" in out and "suggestion:" in out

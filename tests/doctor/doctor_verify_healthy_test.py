"""``stepaudit doctor --verify`` on a healthy run: a counterfactual forced onto it is never confirmed.

The oracle is the run itself: a seeded, well-tuned script (Adam with a cosine schedule) on a task whose
labels are 10 % flipped, so its loss ends near the noise floor of those labels. No fix can take a tenth of
the starting loss off such a run, so each counterfactual, applied through ``verify_one`` (what the CLI
calls for each diagnosis), must be refuted: on a seeded script the run-to-run noise is 0, so "not
confirmed" can only be "refuted", unless a run failed. The faulty halves, each counterfactual confirmed on
its fault, are in ``doctor_verify_test.py``.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from stepaudit.doctor import cli
from stepaudit.doctor.verify import run_child, verify_one, watched_run

HEALTHY_SCHEDULED = """
import torch
from torch import nn
torch.manual_seed(0)
x = torch.randn(512, 10); y = ((x[:, 0] + x[:, 1] > 0) ^ (torch.rand(512) < 0.1)).long()  # 10 % of labels flipped
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
for step in range(100):
    idx = torch.randint(0, 512, (64,))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    scheduler.step()
"""


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The healthy script, its run in this process (the diagnosing run) and its unchanged re-run in a child."""
    script = tmp_path_factory.mktemp("healthy") / "train.py"
    script.write_text(textwrap.dedent(HEALTHY_SCHEDULED))
    original = watched_run(script, [], None)
    rerun = run_child(script, [], None)
    return script, original, rerun


def test_the_healthy_script_is_healthy(healthy, capfd):
    script, original, rerun = healthy
    assert original.steps == 100 and original.error is None
    assert (rerun.start, rerun.end) == (original.start, original.end)  # seeded on CPU: no run-to-run noise
    assert original.end < 0.6 * original.start  # it trained: 0.713 → 0.377 (the flipped labels' floor is 0.325)
    assert cli.main(["--json", "--no-store", str(script)]) == 0
    assert [d["code"] for d in json.loads(capfd.readouterr().out)["diagnoses"]] == ["healthy"]


@pytest.mark.parametrize(
    "key, fix, changes_the_run",
    [
        ("lr_too_high", "lr ×0.", True),  # ×0.1, then ×0.01: the better run is kept
        ("lr_too_low", "lr ×", True),  # ×10, then ×100
        ("exploding_gradients", "gradient norm clipped at the early median", True),
        ("unnormalized_inputs", "first layer's input standardised", True),
        ("params_not_updating", "missing parameters added to the optimizer", False),  # the optimizer holds them all
        ("lr_schedule_collapse", "scheduler steps ignored once the lr fell below", True),  # the cosine's last steps
    ],
    ids=["lr_x0.1", "lr_x10", "clip", "standardise", "add_params", "schedule_hold"],
)
def test_a_counterfactual_forced_on_a_healthy_run_is_refuted(healthy, key, fix, changes_the_run):
    script, original, rerun = healthy
    check = verify_one(key, script, [], None, original, rerun, None, 300.0)
    assert check["verdict"] != "confirmed", check["detail"]
    assert check["verdict"] == "refuted", check["detail"]  # noise 0: not "inconclusive", and no run failed
    assert check["fix"].startswith(fix) and check["noise"] == 0.0
    assert check["detail"].endswith("no better than the original")
    assert check["steps"] == 100
    # the hook did act where it has something to act on, so the refutation is of a real change
    assert (check["loss_fixed"] != check["loss_original"]) == changes_the_run, check["detail"]

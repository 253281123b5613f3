"""params_not_updating on parameters that get no gradient: a small unused part of a model that learns is a note,
a detached trunk that holds most of the values stays an error."""

from __future__ import annotations

import textwrap

from support.doctor import diagnose_script

SCRIPT = """
import torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(512, 8, generator=g)
y = (X @ torch.randn(8, 3, generator=g)).argmax(1)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)
        self.aux = nn.Linear(32, 2)  # a second head this run never calls
    def forward(self, x):
        h = self.trunk(x)
        return self.head(h.detach() if DETACH else h)

model = Net()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(8):
    for i in range(0, 512, 32):
        opt.zero_grad()
        F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
"""


def diagnoses(tmp_path, detach: bool) -> list[dict]:
    path = tmp_path / "train.py"
    path.write_text(f"DETACH = {detach}\n" + textwrap.dedent(SCRIPT))
    return diagnose_script(path)


def test_an_unused_head_on_a_model_that_learns_is_only_noted(tmp_path):
    found = diagnoses(tmp_path, detach=False)
    assert found[0]["code"] == "healthy"
    note = next(d for d in found if d["code"] == "params_not_updating")
    assert note["severity"] == "info" and "aux.weight" in note["evidence"]


def test_a_detached_trunk_is_still_an_error(tmp_path):
    found = diagnoses(tmp_path, detach=True)
    assert found[0]["code"] == "params_not_updating" and found[0]["severity"] == "error"


TWO_OPTIMIZERS = """
import torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(512, 8, generator=g)
y = (X @ torch.randn(8, 3, generator=g)).argmax(1)
body = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
head, bias = nn.Linear(64, 3), nn.Linear(8, 3, bias=False)
opt_body = torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9)
opt_head = torch.optim.SGD([{"params": head.parameters()}, {"params": bias.parameters(), "lr": 0.0}], lr=0.05)
for epoch in range(6):
    for i in range(0, 512, 32):
        opt_body.zero_grad(); opt_head.zero_grad()
        F.cross_entropy(head(body(X[i:i + 32])) + bias(X[i:i + 32]), y[i:i + 32]).backward()
        opt_body.step(); opt_head.step()
"""


def test_an_lr_0_group_names_its_optimizer_when_there_are_several(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(TWO_OPTIMIZERS))
    found = diagnose_script(path)
    note = next(d for d in found if d["code"] == "params_not_updating")
    assert note["severity"] == "info", found
    # the second optimizer (index 1) holds the lr=0 group as its own group 1; the first has one group, lr 0.05
    assert "group 1 of optimizer 1 has lr=0" in note["evidence"], note
    assert "group 1 of optimizer 1 has lr=0" in note["fix"], note
    assert "(<1% of the optimizers' values)" in note["evidence"], note


STEP_OUTSIDE_LOOP = """
import torch, torch.nn as nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(640, 64, generator=g)
y = (X @ torch.randn(64, 10, generator=g)).argmax(1)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05); crit = nn.CrossEntropyLoss()
for ep in range(20):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 64):
        b = perm[i:i+64]; opt.zero_grad(); loss = crit(model(X[b]), y[b]); loss.backward()
    opt.step()                                   # dedented out of the batch loop
"""


def test_a_step_dedented_out_of_the_batch_loop_does_not_claim_summed_gradients(tmp_path):
    """zero_grad() ran before every backward, so each update holds the last batch's gradient only (the hunt's
    f19, the "optimizer.step() dedented out of the batch loop" slip): the zeroing checks say so."""
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(STEP_OUTSIDE_LOOP))
    found = diagnose_script(path)
    top = found[0]
    assert top["code"] == "params_not_updating" and top["severity"] == "warning", found
    assert "once every 10" in top["evidence"]
    assert "sums the gradients" not in top["evidence"] and "only the last batch's gradient" in top["evidence"]

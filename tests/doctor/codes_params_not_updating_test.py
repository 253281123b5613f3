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

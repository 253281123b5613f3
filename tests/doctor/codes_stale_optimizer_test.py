"""params_not_updating when the optimizer was built before the model was final: the parameters that get
gradients belong to no optimizer while the optimizer's own never get one. The doctor names that pairing and
its fix (build the optimizer after the model is final), not a zero_grad ordering or a loss rebuilt from .item().
A layer created inside forward() is re-created at every step: its share is counted once and the fix is to
create it in __init__.

Scripts after the hunt's f07 (a frozen backbone whose head is swapped after the optimizer was built: the
forum pattern "optimizer created before model.fc replaced"), f18 (k-fold loop that re-creates the model but
not the optimizer) and f01 (https://thecodeforge.io/ml-ai/pytorch-neural-network/, "Layers in forward()
create new weights each batch"); synthetic data in place of sklearn's digits.
"""

from __future__ import annotations

import textwrap

from support.doctor import diagnose_script

DATA = """
import torch, torch.nn as nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(640, 64, generator=g)
y = (X @ torch.randn(64, 10, generator=g)).argmax(1)
"""

HEAD_SWAP = """
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.fc = nn.Linear(64, 1000)
    def forward(self, x): return self.fc(self.feat(x))
model = Backbone()
for p in model.parameters(): p.requires_grad = False
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)   # built before the head swap
model.fc = nn.Linear(64, 10)                                  # new trainable head, not in the optimizer
crit = nn.CrossEntropyLoss()
for ep in range(6):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 64):
        b = perm[i:i+64]
        optimizer.zero_grad(); loss = crit(model(X[b]), y[b]); loss.backward(); optimizer.step()
"""

KFOLD = """
def make(): return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model = make(); optimizer = torch.optim.Adam(model.parameters(), 1e-3); crit = nn.CrossEntropyLoss()
folds = torch.randperm(len(X)).chunk(3)
for k in range(3):
    model = make()                         # the optimizer still holds the first model's parameters
    tr = torch.cat([f for j, f in enumerate(folds) if j != k])
    for ep in range(3):
        perm = tr[torch.randperm(len(tr))]
        for i in range(0, len(perm), 64):
            b = perm[i:i+64]; optimizer.zero_grad(); loss = crit(model(X[b]), y[b]); loss.backward(); optimizer.step()
"""

LAYER_IN_FORWARD = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.out = nn.Linear(64, 10)      # a new layer at every call
        return self.out(h)
model = Net()
opt = torch.optim.Adam(model.fc1.parameters(), lr=1e-3)
lossf = nn.CrossEntropyLoss()
for ep in range(10):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 64):
        idx = perm[i:i+64]
        opt.zero_grad(); loss = lossf(model(X[idx]), y[idx]); loss.backward(); opt.step()
"""


def run(tmp_path, body: str) -> list[dict]:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(DATA) + textwrap.dedent(body))
    return diagnose_script(path, max_steps=120)


def test_a_head_swapped_after_the_optimizer_was_built_is_named_with_its_fix(tmp_path):
    top = run(tmp_path, HEAD_SWAP)[0]
    assert top["code"] == "params_not_updating" and top["severity"] == "error", top
    assert "fc.weight" in top["evidence"] and "belong to no optimizer" in top["evidence"]
    assert ".item()" not in top["evidence"] and "zero_grad" not in top["fix"]
    assert top["fix"].startswith("build the optimizer after the model is final")


def test_a_model_recreated_per_fold_with_the_old_optimizer_is_named_with_its_fix(tmp_path):
    top = run(tmp_path, KFOLD)[0]
    assert top["code"] == "params_not_updating" and top["severity"] == "error", top
    assert "never received a gradient" in top["evidence"] and "belong to no optimizer" in top["evidence"]
    assert top["fix"].startswith("build the optimizer after the model is final")


def test_a_layer_built_in_forward_counts_once_and_gets_the_init_fix(tmp_path):
    found = run(tmp_path, LAYER_IN_FORWARD)
    top = found[0]
    assert top["code"] == "params_not_updating", found
    share = int(top["evidence"].split("% of the model's trainable values")[0].rsplit(" ", 1)[-1].strip("(<"))
    assert share <= 100 and share < 50, top["evidence"]  # the output layer is 650 of 4,810 values
    assert "?" not in top["evidence"]
    assert "__init__" in top["fix"] and "inside forward()" in top["evidence"]

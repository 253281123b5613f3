"""One story per run: lr_too_high whose only evidence is a mechanism (large early steps, ReLUs killed in the
first steps) and no rising or diverging loss is lowered to a note on a run whose loss fell by half or more,
the same way the mechanism findings it sits beside are; the run then reads healthy with notes, and no note
is named as another finding's cause.

After the hunt's f10: raw (unstandardised) breast-cancer features into an MLP with SGD, from
https://datascience.stackexchange.com/questions/19283/why-mlp-only-learns-bias-for-unbalanced-binary-classification
(the loss fell 58.5 → 0.27, yet lr_too_high stayed an error leading the report)."""

from __future__ import annotations

import textwrap

import pytest
from support.doctor import diagnose_script

from stepaudit.doctor.diagnosis import Diagnosis
from stepaudit.doctor.story import reconcile

RAW_FEATURES = """
import torch, torch.nn as nn
from torch.utils.data import TensorDataset, DataLoader
from sklearn.datasets import load_breast_cancer
torch.manual_seed(0)
d = load_breast_cancer()
ds = TensorDataset(torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32))
dl = DataLoader(ds, batch_size=32, shuffle=True)
model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
crit = nn.BCEWithLogitsLoss()
for ep in range(15):
    for xb, yb in dl:
        opt.zero_grad(); loss = crit(model(xb).squeeze(1), yb); loss.backward(); opt.step()
"""


def test_raw_features_that_still_learn_do_not_lead_with_an_lr_error(tmp_path):
    pytest.importorskip("sklearn")
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(RAW_FEATURES))
    found = diagnose_script(path)
    assert all(d["severity"] == "info" for d in found), [(d["code"], d["severity"]) for d in found]
    high = [d for d in found if d["code"] == "lr_too_high"]
    assert high and "so this is not what stops training" in high[0]["evidence"]
    assert not any("consequence of" in d["evidence"] for d in found)


class _Learnt:
    """Facts of a run whose loss fell from 58.5 to 0.27 (halved, below the prior, finite)."""

    first_nonfinite = None
    learning_well = True
    loss_start, loss_end = 58.5, 0.27


def _lr_finding(mechanism_only: bool) -> Diagnosis:
    return Diagnosis("lr_too_high", "error", 0.8, 1, "big steps.", "lower the lr", mechanism_only=mechanism_only)


def test_only_mechanism_evidence_is_lowered_on_a_run_that_learnt():
    kept = reconcile([_lr_finding(True)], _Learnt())
    assert kept[0].severity == "info"


def test_a_rising_loss_keeps_lr_too_high_an_error():
    kept = reconcile([_lr_finding(False)], _Learnt())
    assert kept[0].severity == "error"

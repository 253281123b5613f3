"""loss_wiring "probabilities_into_bce_with_logits" needs a sigmoid/softmax in the input's graph (or, without a graph,
values that hug 0 and 1): raw logits that merely stay in (0, 1), as a DCGAN discriminator's do, are not probabilities."""

from __future__ import annotations

import torch
from support.doctor import diagnose_script

from stepaudit.doctor.observe import _loss_check

# DCGAN-style: BCEWithLogitsLoss on the discriminator's raw logits, which stay in [0.54, 0.79] over the run
GAN = """
import torch, torch.nn as nn
torch.manual_seed(0)
G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
og, od = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
crit = nn.BCEWithLogitsLoss()
for step in range(200):
    real = torch.randn(64, 2) * 0.5 + 2
    z = torch.randn(64, 4); fake = G(z)
    od.zero_grad()
    errD_real = crit(D(real), torch.ones(64, 1)); errD_real.backward()
    errD_fake = crit(D(fake.detach()), torch.zeros(64, 1)); errD_fake.backward()
    od.step()
    og.zero_grad(); errG = crit(D(fake), torch.ones(64, 1)); errG.backward(); og.step()
"""


def _wired(found: list[dict]) -> bool:
    return any(d["code"] == "loss_wiring" and "BCEWithLogitsLoss received" in d["evidence"] for d in found)


def test_raw_logits_inside_0_1_are_not_probabilities(tmp_path):
    path = tmp_path / "gan_bce.py"
    path.write_text(GAN)
    assert not _wired(diagnose_script(path))


def test_a_sigmoid_before_bce_with_logits_is_still_caught(tmp_path):
    path = tmp_path / "double_sigmoid.py"
    path.write_text(GAN.replace("nn.Linear(16, 1))", "nn.Linear(16, 1), nn.Sigmoid())"))
    assert _wired(diagnose_script(path))


def test_the_input_graph_decides():
    z = torch.linspace(0.55, 0.8, 16, requires_grad=True) * 1.0
    p = torch.sigmoid(torch.linspace(-1, 1, 16, requires_grad=True))
    assert _loss_check("binary_cross_entropy_with_logits", z.detach(), None, z.grad_fn) is None
    assert _loss_check("binary_cross_entropy_with_logits", p.detach(), None, p.grad_fn)["kind"] == (
        "probabilities_into_bce_with_logits"
    )
    # no graph (computed under no_grad): the values must hug the ends
    assert _loss_check("binary_cross_entropy_with_logits", z.detach(), None) is None
    ends = torch.tensor([0.01, 0.99, 0.02, 0.97, 0.5, 0.6, 0.3, 0.7])
    assert _loss_check("binary_cross_entropy_with_logits", ends, None)["kind"] == "probabilities_into_bce_with_logits"

"""loss_wiring "log_likelihood_minimised": a loss built only from log-probabilities (≤ 0 by construction) is
minimised, a lost minus sign; healthy losses that go negative (a Gaussian NLL) or are ≤ 0 with a bounded
minimum (p·log p) are left alone."""

from __future__ import annotations

import textwrap

import pytest
import torch
from support.doctor import diagnose_script, watch_script

from stepaudit.doctor.loss_sign import log_likelihood_sources

DATA = """
import torch
import torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(512, 8, generator=g)
w_true = torch.randn(8, generator=g)
y = (X @ w_true > 0).float()
labels = (X[:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)
net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, OUT))
opt = torch.optim.Adam(net.parameters(), lr=LR, maximize=ASCEND)
for epoch in range(6):
    for i in range(0, 512, 32):
        xb, yb, cb = X[i:i + 32], y[i:i + 32], labels[i:i + 32]
        out = net(xb)
        loss = LOSS
        opt.zero_grad()
        loss.backward()
        opt.step()
"""
# the hand-written Bernoulli log-likelihood of a logistic classifier, with and without its minus sign
BERNOULLI = "(yb * torch.log(p) + (1 - yb) * torch.log(1 - p)).mean()"
CASES = {
    "bernoulli_lost": (1, f"(lambda p: {BERNOULLI})(torch.sigmoid(out[:, 0]))", True),
    "bernoulli_eps_lost": (1, "(lambda p: (yb * torch.log(p + 1e-8)).sum() / len(yb))(torch.sigmoid(out[:, 0]))", True),
    "categorical_lost": (3, "F.log_softmax(out, 1).gather(1, cb[:, None]).mean()", True),
    "distribution_lost": (1, "torch.distributions.Bernoulli(logits=out[:, 0]).log_prob(yb).mean()", True),
    # the log-likelihood itself, maximised on purpose (torch.optim's maximize=True): it rises towards 0
    "bernoulli_maximized": (1, f"(lambda p: {BERNOULLI})(torch.sigmoid(out[:, 0]))", False),
    "bernoulli_fixed": (1, f"-(lambda p: {BERNOULLI})(torch.sigmoid(out[:, 0]))", False),
    "categorical_fixed": (3, "-F.log_softmax(out, 1).gather(1, cb[:, None]).mean()", False),
    # heteroscedastic regression: 0.5·(log σ² + (y − μ)²/σ²) falls from 0.59 to −1.45 as σ² shrinks (lr 1e-2)
    "gaussian_nll": (2, "0.5 * (out[:, 1] + (xb[:, 0] - out[:, 0]) ** 2 / out[:, 1].exp()).mean()", False),
    # an entropy bonus: Σ p log p ≤ 0 but bounded below by −ln C, so minimising it is fine
    "entropy": (3, "F.cross_entropy(out, cb) + 0.1 * (F.softmax(out, 1) * F.log_softmax(out, 1)).sum(1).mean()", False),
}


def _script(tmp_path, out: int, loss: str, ascend: bool = False, lr: float = 1e-3):
    path = tmp_path / "train.py"
    body = DATA.replace("OUT", str(out)).replace("LOSS", loss).replace("ASCEND", str(ascend)).replace("LR", str(lr))
    path.write_text(textwrap.dedent(body))
    return path


def _flagged(found: list[dict]) -> bool:
    return any(
        d["code"] == "loss_wiring" and d["severity"] == "error" and "log-probabilities" in d["evidence"] for d in found
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_minimised_log_likelihood_is_a_lost_minus_sign(tmp_path, case):
    out, loss, lost = CASES[case]
    lr = 1e-2 if case == "gaussian_nll" else 1e-3
    found = diagnose_script(_script(tmp_path, out, loss, ascend=case.endswith("maximized"), lr=lr))
    assert _flagged(found) == lost, found
    if lost:  # a small lr: the loss only creeps below its start (−0.7 → −1), too little for "unbounded below"
        assert found[0]["code"] == "loss_wiring" and "≤ 0 whatever the model predicts" in found[0]["evidence"]


def test_a_gan_generator_with_the_saturating_loss_is_not_flagged(tmp_path):
    # log(1 − D(G(z))) is ≤ 0 and minimised on purpose (Goodfellow et al. 2014); the discriminator's BCE is not
    script = tmp_path / "gan.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        D = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
        og, od = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
        bce = nn.BCELoss()
        for step in range(150):
            real, fake = torch.randn(32, 2) + 3, G(torch.randn(32, 4))
            d_loss = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
            od.zero_grad(); d_loss.backward(); od.step()
            g_loss = torch.log(1 - D(fake)).mean()
            og.zero_grad(); g_loss.backward(); og.step()
        """)
    )
    watcher = watch_script(script)
    assert watcher.observations()["log_likelihood_loss"] is None


BINARY, CLASSES = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("make", "sources"),
    [
        (lambda p, z: (BINARY * torch.log(p)).mean() / 2, ["log of a sigmoid/softmax output"]),
        (lambda p, z: -torch.nn.functional.cross_entropy(z, CLASSES), None),  # an added minus sign: an ascent
        (
            lambda p, z: -torch.nn.functional.nll_loss(torch.log_softmax(z, 1), CLASSES, reduction="none").mean(),
            ["log_softmax"],
        ),
        (lambda p, z: -torch.nn.functional.binary_cross_entropy(p, BINARY), None),
        (lambda p, z: -(-(BINARY[:, None] * torch.log_softmax(z, 1)).sum() / 4), None),  # a negated soft-target NLL
        (lambda p, z: torch.nn.functional.cross_entropy(z, CLASSES), None),
        (lambda p, z: (torch.log(p) * torch.tensor([1.0, 2.0, 3.0, 0.5])).mean(), None),  # returns: the data's sign
        (lambda p, z: -(torch.log(p) * torch.tensor([-1.0, 0.0, -1.0, -0.5])).mean(), None),  # rewards ≤ 0, no baseline
        (lambda p, z: torch.log(p.exp()).mean(), None),  # exp of a probability is not one
        (lambda p, z: (p * torch.log(p)).sum(), None),
    ],
)
def test_the_sign_is_read_from_the_graph(make, sources):
    z = torch.randn(4, 3, requires_grad=True)
    assert log_likelihood_sources(make(torch.sigmoid(z[:, 0]), z)) == sources


# a minus sign written in front of a library cross-entropy: the classifier's loss is maximised on purpose
ASCENTS = {
    # gradient-ascent unlearning (NegGrad) of a forget set
    "unlearn": """
        import torch, torch.nn as nn, torch.nn.functional as F
        torch.manual_seed(0)
        X = torch.randn(512, 10); y = (X[:, :3] @ torch.randn(3, 4)).argmax(1)
        net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()})
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        forget = X[:64], y[:64]
        for it in range(60):
            loss = -F.cross_entropy(net(forget[0]), forget[1])
            opt.zero_grad(); loss.backward(); opt.step()
        """,
    # a universal adversarial perturbation of a fixed classifier (untargeted): its loss barely moves
    "adv_perturb": """
        import torch, torch.nn as nn, torch.nn.functional as F
        torch.manual_seed(0)
        X = torch.randn(1024, 10); y = (X[:, :3] @ torch.randn(3, 5)).argmax(1)
        clf = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
        for p in clf.parameters(): p.requires_grad_(False)
        delta = torch.zeros(10, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=1e-2)
        for it in range(100):
            i = (it * 64) % 1024
            loss = -F.cross_entropy(clf(X[i:i+64] + delta), y[i:i+64])
            opt.zero_grad(); loss.backward(); opt.step()
            with torch.no_grad(): delta.clamp_(-0.5, 0.5)
        """,
}


@pytest.mark.parametrize("case", sorted(ASCENTS))
def test_a_negated_library_cross_entropy_is_an_ascent_not_a_lost_sign(tmp_path, case):
    path = tmp_path / f"{case}.py"
    path.write_text(textwrap.dedent(ASCENTS[case]))
    found = diagnose_script(path)
    assert not _flagged(found), found


def test_a_minimised_log_likelihood_must_really_fall(tmp_path):
    # the log-likelihood of a frozen model's outputs (only a bias-free scale trains, at a tiny lr): it barely moves
    loss = "F.log_softmax(out.detach() * SCALE, 1).gather(1, cb[:, None]).mean()"
    body = DATA.replace("net.parameters()", "[SCALE]").replace("import torch\n", "import torch\nSCALE = None\n", 1)
    body = body.replace("opt = ", "SCALE = torch.ones((), requires_grad=True)\nopt = ")
    path = tmp_path / "train.py"
    path.write_text(body.replace("OUT", "3").replace("LOSS", loss).replace("ASCEND", "False").replace("LR", "1e-6"))
    found = diagnose_script(path)
    assert not _flagged(found), found

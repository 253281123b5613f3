"""lr_too_low's first-order argument ("the whole run would remove only …") is not made when the loss fell by more
than twice what the steps promised: then something else moves it, as the generator's steps move the
discriminator's loss in a GAN (a DCGAN-style toy at lr 2e-4 read as a warning); a plain run at a tiny lr still fires."""

from __future__ import annotations

from pathlib import Path

from support.doctor import diagnose_script, toy_script

GAN = """
G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
og = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
od = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
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

TINY_LR = """
model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
opt = torch.optim.SGD(model.parameters(), lr=1e-4)
for epoch in range(8):
    for i in range(0, 512, 32):
        opt.zero_grad(); F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward(); opt.step()
"""


def test_a_gan_whose_discriminator_loss_falls_faster_than_its_steps_promise_is_not_lr_too_low(tmp_path):
    found = diagnose_script(toy_script(tmp_path, GAN))
    assert not any(d["code"] == "lr_too_low" and d["severity"] != "info" for d in found), found


def test_a_tiny_learning_rate_still_is(tmp_path):
    found = diagnose_script(toy_script(tmp_path, TINY_LR))
    assert found[0]["code"] == "lr_too_low" and "would remove only" in found[0]["evidence"], found


def test_batch_noise_around_a_flat_loss_does_not_count_as_a_fall():
    # c89: every step clipped to norm 0.005; the loss wanders 1.395 -> 1.386, four times the tiny promise but far
    # less than a tenth of its start, and nothing else moves it
    case = Path(__file__).parent / "cases" / "c89_wave_gru_clip.py"
    found = diagnose_script(case, max_steps=250)
    assert found[0]["code"] == "lr_too_low", found

"""Loss arguments read as torch binds them (positional, legacy size_average), and the step-0 loss judged against
ln C only when it is the mean loss of a fresh initialisation (not a summed loss, not loaded weights)."""

from __future__ import annotations

import pytest
import torch
from support.doctor import diagnose_script, watch_script
from support.doctor import toy_script as _script

from stepaudit.doctor import diagnose_facts
from stepaudit.doctor.facts import Facts
from stepaudit.doctor.loss_args import loss_arguments, loss_reduction


def _init_judged(found: list[dict]) -> bool:
    """loss_wiring's "the loss at initialisation is …× ln C" finding."""
    return any(d["code"] == "loss_wiring" and "loss at initialisation" in d["evidence"] for d in found)


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "reduction", "ignore"),
    [
        ("cross_entropy", (1, 2, None, None, 255), {}, "mean", 255),
        ("cross_entropy", (1, 2, None, None, -100, None, "sum"), {}, "sum", -100),
        ("nll_loss", (1, 2), {"ignore_index": 0, "reduction": "none"}, "none", 0),
        ("binary_cross_entropy", (1, 2), {"size_average": False}, "sum", None),  # pytorch/examples' old VAE loss
        ("mse_loss", (1, 2, None, False), {}, "none", None),
        ("mse_loss", (1, 2, None, None, "sum"), {}, "sum", None),
        ("l1_loss", (1, 2), {}, "mean", None),
    ],
)
def test_loss_arguments_are_bound_by_torchs_signature(name, args, kwargs, reduction, ignore):
    bound = loss_arguments(name, args, kwargs)
    assert bound["input"] == 1 and bound["target"] == 2
    assert loss_reduction(bound) == reduction and bound.get("ignore_index") == ignore


POSITIONAL_IGNORE = """
net = nn.Linear(8, 3)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
labels = y.clone()
labels[::4] = 255  # unlabelled pixels of a segmentation set, skipped through the positional ignore_index
for i in range(0, 512, 32):
    opt.zero_grad()
    F.cross_entropy(net(X[i:i + 32]), labels[i:i + 32], None, None, 255).backward()
    opt.step()
"""


def test_a_positional_ignore_index_is_not_counted_as_a_class(tmp_path):
    counts = watch_script(_script(tmp_path, POSITIONAL_IGNORE)).observations()["label_counts"]
    assert counts and set(counts) <= {"0", "1", "2"}, counts


SUMMED = """
net = nn.Linear(8, 3)
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
loss_fn = LOSS
for epoch in range(4):
    for i in range(0, 512, 32):
        opt.zero_grad()
        loss_fn(net(X[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
"""


@pytest.mark.parametrize(
    "loss",
    [
        "nn.CrossEntropyLoss(reduction='sum')",
        "nn.CrossEntropyLoss(size_average=False)",
        "lambda out, t: F.cross_entropy(out, t, None, None, -100, None, 'sum')",
        "lambda out, t: F.nll_loss(F.log_softmax(out, 1), t, None, False)",
    ],
)
def test_a_summed_loss_at_init_is_not_compared_with_ln_c(tmp_path, loss):
    # 32 examples summed: the first loss is ≈ 32 ln 3, which is the mean loss of an unremarkable initialisation
    watcher = watch_script(_script(tmp_path, SUMMED.replace("LOSS", loss)))
    obs = watcher.observations()
    assert obs["summed_losses"] and obs["initial_loss"]["reduction"] == "sum"
    assert obs["initial_loss"]["value"] > 10 * torch.log(torch.tensor(3.0)).item()
    facts = Facts(watcher.records, {}, obs)
    assert facts.label_entropy is None  # nor is the loss's end compared with the per-example label entropy
    assert not _init_judged(diagnose_facts(facts))


def _checkpoint(tmp_path, scale: float) -> str:
    """Weights of a confident 3-class classifier (logits ~ ``scale``), as a resumed run's checkpoint holds them."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    with torch.no_grad():
        net[2].weight.mul_(scale)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict()}, path)
    return str(path)


LOADED = """
teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
state = torch.load(CKPT)["model"]
LOAD
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
for epoch in range(4):
    for i in range(0, 512, 32):
        opt.zero_grad()
        F.cross_entropy(net(X[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
"""


@pytest.mark.parametrize(
    ("load", "judged"),
    [
        # fine-tuning a checkpoint on new labels: its confident logits give a step-0 loss far above ln 3, and
        # "scale down the last layer's initialisation" would be wrong advice for weights that were never initialised
        ("net.load_state_dict(state)", False),
        ("net[2].load_state_dict({k[2:]: v for k, v in state.items() if k.startswith('2.')})", False),
        # a loaded module the optimizer does not train (a frozen teacher) leaves the fresh model's init judged
        ("teacher.load_state_dict(state); net[2].weight.data.copy_(state['2.weight'])", True),
        # a reset to the model's own initial weights (per fold) changes no value: the initialisation is still judged
        (
            "net[2].weight.data.mul_(40); init = {k: v.clone() for k, v in net.state_dict().items()}; "
            "net.load_state_dict(init)",
            True,
        ),
    ],
)
def test_the_loss_of_loaded_weights_is_not_judged_as_an_initialisation(tmp_path, load, judged):
    body = LOADED.replace("CKPT", repr(_checkpoint(tmp_path, 40.0))).replace("LOAD", load)
    found = diagnose_script(_script(tmp_path, body))
    assert _init_judged(found) == judged, found


# a genuinely bad init (last layer x30), with the common "reset to the initial weights per fold" load_state_dict
BAD_INIT_RESET = """
import torch, torch.nn as nn, torch.nn.functional as F, copy
torch.manual_seed(0)
X = torch.randn(1024, 10); y = (X[:, :3] @ torch.randn(3, 10)).argmax(1)
model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 10))
with torch.no_grad(): model[2].weight.mul_(30)
init_state = copy.deepcopy(model.state_dict())
for fold in range(2):
    model.load_state_dict(init_state)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for ep in range(2):
        for i in range(0, 1024, 64):
            loss = F.cross_entropy(model(X[i:i+64]), y[i:i+64])
            opt.zero_grad(); loss.backward(); opt.step()
"""


def test_a_reset_to_the_initial_weights_is_not_a_loaded_checkpoint(tmp_path):
    path = tmp_path / "badinit_reset.py"
    path.write_text(BAD_INIT_RESET)
    found = diagnose_script(path)
    assert _init_judged(found), found
    # the script's own load is untouched: it still returns torch's result
    module = torch.nn.Linear(2, 2)
    assert str(module.load_state_dict(module.state_dict())) == "<All keys matched successfully>"

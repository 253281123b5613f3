"""The doctor watching torch.compile'd training: same graphs, same graph breaks, same weights, no warnings of ours.

Each case runs one small script three times in this process: plain once to warm up (TorchDynamo keeps
some per-code state across ``torch._dynamo.reset()``, so a first run in a process can count graph breaks
differently from later ones), then plain and watched, each after ``torch._dynamo.reset()`` and with
TorchDynamo's counters cleared. CPU backends that compile fast ("eager", "aot_eager") keep it quick; the
default inductor backend was checked by hand (see the report of issue 14).
"""

from __future__ import annotations

import os
import runpy
import sys
import textwrap
import warnings

import pytest
import torch

import stepaudit
from stepaudit.doctor.passive import PassiveWatcher
from stepaudit.doctor.runner import run_script

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 8
OWN_DIR = os.path.dirname(os.path.realpath(stepaudit.__file__))

MODEL = """
import sys, torch
from torch import nn
import torch.nn.functional as F
torch.manual_seed(0)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        torch._dynamo.graph_break()  # fullgraph=False: the model is compiled in two graphs
        h = F.dropout(torch.tanh(self.l2(h)), 0.2, self.training)  # the global RNG inside compiled code
        return F.log_softmax(self.l3(h), dim=1)

model = Net()
g = torch.Generator().manual_seed(1)
x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
"""

# torch.compile(model): an OptimizedModule called from an eager loop.
COMPILED_MODULE = (
    MODEL
    + """
compiled = torch.compile(model, backend="aot_eager")
opt = torch.optim.Adam(model.parameters(), 1e-2)
for step in range({steps}):
    idx = torch.randint(0, 64, (32,))
    opt.zero_grad()
    loss = F.nll_loss(compiled(x[idx]), y[idx])
    loss.backward()
    opt.step()
torch.save(model.state_dict(), sys.argv[1])
"""
)

# A compiled training step: zero_grad, backward and the optimizer step run inside torch.compile (each a
# graph break), so the doctor's backward wrapper and hooks are called from code TorchDynamo compiles.
COMPILED_STEP = (
    MODEL
    + """
opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)

@torch.compile(backend="eager")
def train_step(xb, yb):
    opt.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    return loss

for step in range({steps}):
    idx = torch.randint(0, 64, (32,))
    train_step(x[idx], y[idx])
    if step == 0:  # step 1 is sampled: the doctor's module hooks would be registered now, were they not frozen
        hooks = len(torch.nn.modules.module._global_forward_pre_hooks)
torch.save(model.state_dict(), sys.argv[1])
open(sys.argv[1] + ".hooks", "w").write(str(hooks))
"""
)


def _run(path, out, watched: bool):
    dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if watched:
            watcher = PassiveWatcher(max_steps=1000)
            outcome = run_script(path, [str(out)], watcher)
            assert outcome.stopped == "finished", outcome
        else:
            watcher = None
            saved = sys.argv[:]
            sys.argv = [str(path), str(out)]
            try:
                runpy.run_path(str(path), run_name="__main__")
            finally:
                sys.argv[:] = saved
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    return {
        "breaks": breaks,
        "graphs": graphs,
        "warnings": caught,
        "rng": torch.get_rng_state(),
        "weights": torch.load(out),
        "watcher": watcher,
    }


@pytest.mark.parametrize("source", [COMPILED_MODULE, COMPILED_STEP], ids=["compiled_module", "compiled_step"])
def test_compiled_training_is_unchanged_under_the_doctor(tmp_path, source):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source.format(steps=STEPS)))
    _run(path, tmp_path / "warm.pt", watched=False)
    plain = _run(path, tmp_path / "plain.pt", watched=False)
    watched = _run(path, tmp_path / "watched.pt", watched=True)

    assert sum(plain["breaks"].values()) > 0  # the scripts do break their graphs
    assert watched["breaks"] == plain["breaks"]  # the same graph breaks, for the same reasons, as often
    assert watched["graphs"] == plain["graphs"]  # and no recompilation
    assert plain["weights"].keys() == watched["weights"].keys()
    assert all(torch.equal(plain["weights"][k], watched["weights"][k]) for k in plain["weights"])
    assert torch.equal(plain["rng"], watched["rng"])

    ours = [w for w in watched["warnings"] if os.path.realpath(w.filename).startswith(OWN_DIR)]
    assert not ours, [str(w.message) for w in ours]
    plain_messages = {str(w.message) for w in plain["warnings"]}
    extra = [str(w.message) for w in watched["warnings"] if str(w.message) not in plain_messages]
    assert len(extra) <= 1, extra  # at most torch's one note on global module hooks at the first call

    watcher = watched["watcher"]
    assert watcher.capture_errors == 0, watcher.first_capture_error
    assert watcher.backward_count == STEPS  # the backward wrapper runs (uncompiled) at every step
    if source is COMPILED_STEP:  # the module hooks went before the first compilation and stayed away
        assert (tmp_path / "watched.pt.hooks").read_text() == "0"
    if source is COMPILED_MODULE:
        assert watcher.step_count == STEPS and [type(r).__name__ for r in watcher.roots.values()] == ["Net"]
        assert all(r["loss_before"] == r["loss_before"] for r in watcher.records)

"""rnn_batch_time_swapped: a batch_first=False recurrent layer fed (batch, time, features), on real runs and shapes."""

from __future__ import annotations

import textwrap

import pytest
from doctor_rules_test import UNIFORM_10, codes, passive, run
from support.doctor import watch_script

from stepaudit.doctor import diagnose, diagnose_facts
from stepaudit.doctor.codes.rnn_batch_time_swapped import rnn_batch_time_swapped
from stepaudit.doctor.facts import Facts

# A sequence classifier on generated data (the class is the sign pattern of the sequence's mean): LAYER,
# FEED and HEAD are filled in per variant; the loop is the same for all.
SCRIPT = """
import torch
import torch.nn as nn

torch.manual_seed(0)
B, T, F, C = 16, 12, 3, 4
x_all = torch.randn(512, T, F)
y_all = (x_all.mean(1)[:, 0] > 0).long() * 2 + (x_all.mean(1)[:, 1] > 0).long()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = LAYER
        self.head = nn.Linear(24, C)

    def forward(self, x):
        out = FEED
        return HEAD


model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(STEPS):
    idx = torch.randint(0, 512, (B,))
    optimizer.zero_grad()
    loss = LOSS
    loss.backward()
    optimizer.step()
"""
CLASSIFY = "nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])"
VARIANTS = {
    # the reported fault: (B, T, F) into a seq-first LSTM, the "last step" taken as out[:, -1]
    "swapped": ("nn.LSTM(F, 24)", "self.rnn(x)[0]", "self.head(out[:, -1])", CLASSIFY),
    "batch_first": ("nn.LSTM(F, 24, batch_first=True)", "self.rnn(x)[0]", "self.head(out[:, -1])", CLASSIFY),
    # legit seq-first: (T, B, F) in, the last step is out[-1] (batch at dim 1)
    "seq_first": ("nn.GRU(F, 24)", "self.rnn(x.transpose(0, 1))[0]", "self.head(out[-1])", CLASSIFY),
    # a per-step loss over every (time, example) row: T·B rows, neither dim of the input
    "per_step": (
        "nn.RNN(F, 24)",
        "self.rnn(x.transpose(0, 1))[0]",
        "self.head(out).reshape(-1, C)",
        "nn.functional.cross_entropy(model(x_all[idx]), y_all[idx].repeat(T))",
    ),
    # a seq-first tagger whose loss is taken one example at a time, out[:, b]: each loss's batch is T (dim 0)
    "per_example": (
        "nn.LSTM(F, 24)",
        "self.rnn(x.transpose(0, 1))[0]",
        "self.head(out)",
        "(lambda out, y: sum(nn.functional.cross_entropy(out[:, b], y[:, b]) for b in range(B)))"
        "(model(x_all[idx]), y_all[idx].expand(T, B))",
    ),
    # packed sequences are never judged
    "packed": (
        "nn.LSTM(F, 24)",
        "nn.utils.rnn.pad_packed_sequence(self.rnn(nn.utils.rnn.pack_padded_sequence("
        "x.transpose(0, 1), [T] * x.shape[0]))[0])[0]",
        "self.head(out[-1])",
        CLASSIFY,
    ),
}


def _script(tmp_path, variant: str, steps: int = 40):
    layer, feed, head, loss = VARIANTS[variant]
    text = textwrap.dedent(SCRIPT)
    for key, value in (("LAYER", layer), ("FEED", feed), ("HEAD", head), ("LOSS", loss), ("STEPS", str(steps))):
        text = text.replace(key, value)
    path = tmp_path / f"{variant}.py"
    path.write_text(text)
    return path


def test_a_seq_first_lstm_fed_batch_first_tensors_is_named_with_its_shapes(tmp_path):
    watcher = watch_script(_script(tmp_path, "swapped"))
    obs = watcher.observations()
    assert obs["recurrent_inputs"][0]["module"] == "rnn" and obs["recurrent_inputs"][0]["calls"][0] == [0, 16, 12, 3]
    found = diagnose_facts(Facts(watcher.records, {}, obs))
    assert codes(found)[0] == "rnn_batch_time_swapped", codes(found)
    assert "(16, 12, 3)" in found[0]["evidence"] and "loss's batch was 16" in found[0]["evidence"]
    assert "batch_first=True" in found[0]["fix"] and "transpose(0, 1)" in found[0]["fix"]


@pytest.mark.parametrize("variant", ["batch_first", "seq_first", "per_step", "per_example", "packed"])
def test_layouts_that_match_what_the_layer_expects_are_not_named(tmp_path, variant):
    watcher = watch_script(_script(tmp_path, variant))
    obs = watcher.observations()
    judged = {"batch_first": 0, "seq_first": 1, "per_step": 1, "per_example": 1, "packed": 0}[variant]
    assert len(obs["recurrent_inputs"]) == judged  # the seq-first layers were seen, and still not named
    if judged:
        assert obs["recurrent_inputs"][0]["calls"][0] == [0, 12, 16, 3]
    found = diagnose_facts(Facts(watcher.records, {}, obs))
    assert "rnn_batch_time_swapped" not in codes(found), found


def _obs(calls: list, losses: list) -> dict:
    return {
        "recurrent_inputs": [{"module": "encoder.lstm", "layer": "LSTM", "calls": calls}],
        "loss_shapes": losses,
    }


def test_the_rule_reads_dim_0_against_every_loss_of_the_step():
    calls = [[s, 32, 20, 5] for s in range(5)]
    fires = _obs(calls, [[s, [32, 10], [32]] for s in range(5)])
    assert rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **fires})) is not None
    cases = {
        "loss batch at dim 1 (seq-first, out[-1])": _obs(
            [[s, 20, 32, 5] for s in range(5)], [[s, [32, 10], [32]] for s in range(5)]
        ),
        "per-step loss keeping the layout": _obs(calls, [[s, [32, 20, 1], [32, 20, 1]] for s in range(5)]),
        "square input": _obs([[s, 32, 32, 5] for s in range(5)], [[s, [32, 10], [32]] for s in range(5)]),
        "batch of one fed seq-first": _obs([[s, 9, 1, 5] for s in range(5)], [[s, [9, 4], [9]] for s in range(5)]),
        "two sampled steps only": _obs(calls[:2], [[s, [32, 10], [32]] for s in range(2)]),
        "a second loss with another batch": _obs(
            calls, [[s, [32, 10], [32]] for s in range(5)] + [[s, [640, 10], [640]] for s in range(5)]
        ),
    }
    for why, obs in cases.items():
        assert rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **obs})) is None, why
    # losses whose rows cover every (dim 0, dim 1) position: a per-example loop over a seq-first output
    looped = _obs(calls, [[s, [32, 10], [32]] for s in range(5) for _ in range(20)])
    assert rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **looped})) is None
    # a layer run twice a step (siamese) counts steps, not calls: 3 calls in one step are not 3 steps
    twice = _obs([[s, 32, 20, 5] for s in range(3) for _ in range(2)], [[s, [32, 10], [32]] for s in range(3)])
    found = rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **twice}))
    assert found is not None and "3 of 3 sampled steps" in found.evidence
    crowded = _obs([[0, 32, 20, 5]] * 3, [[0, [32, 10], [32]]])
    assert rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **crowded})) is None
    # one step in ten that does not match still fires (9 of 10 sampled steps)
    mixed = _obs([[s, 32, 20, 5] for s in range(10)], [[s, [32 if s else 20, 10], None] for s in range(10)])
    found = rnn_batch_time_swapped(Facts([], {}, {"mode": "passive", **mixed}))
    assert found is not None and "9 of 10" in found.evidence and found.first_step == 1


def test_an_error_when_the_run_does_not_learn_well_a_warning_when_it_does():
    obs = _obs([[s, 32, 20, 5] for s in range(5)], [[s, [32, 10], [32]] for s in range(5)])
    stalled = diagnose(run(loss=lambda t: 2.3 - 2e-3 * t), meta=passive(label_counts=UNIFORM_10, **obs))
    assert codes(stalled)[0] == "rnn_batch_time_swapped" and stalled[0]["severity"] == "error"
    learning = diagnose(run(), meta=passive(label_counts=UNIFORM_10, **obs))  # the loss falls 2.35 → 0.05
    assert codes(learning)[0] == "rnn_batch_time_swapped" and learning[0]["severity"] == "warning"

"""data_not_shuffled: batches that hold far fewer classes than shuffled ones, against closed forms and real runs."""

from __future__ import annotations

import itertools
import math
import textwrap

import pytest
from support.doctor import watch_script

from stepaudit.doctor import diagnose_facts
from stepaudit.doctor.codes.data_not_shuffled import data_not_shuffled, expected_classes
from stepaudit.doctor.facts import Facts


def test_expected_classes_equals_an_enumeration_of_every_batch():
    """E[distinct] of a batch of 4 labels from (0.5, 0.3, 0.2), summed over all 3⁴ sequences."""
    p = (0.5, 0.3, 0.2)
    truth = sum(math.prod(p[i] for i in seq) * len(set(seq)) for seq in itertools.product(range(3), repeat=4))
    assert expected_classes(list(p), 4) == pytest.approx(truth, rel=1e-12)
    assert expected_classes([0.5, 0.5], 8) == pytest.approx(2 - 2 * 0.5**8, rel=1e-12)


def facts(batches: list[list[int]], counts: dict) -> Facts:
    return Facts([], {}, {"mode": "passive", "steps": 100, "batch_label_pool": counts, "batch_labels": batches})


def test_batches_of_one_class_fire_and_shuffled_ones_do_not():
    ten = {str(k): 100 for k in range(10)}
    sorted_batches = [[1, 32, s, [s // 4]] for s in range(8)] + [[2, 32, 8, [1, 2]]]
    found = data_not_shuffled(facts(sorted_batches, ten))
    assert found is not None and found.severity == "error" and found.first_step == 0
    assert "9 of 9" in found.evidence
    shuffled = [[9, 32, s, list(range(9))] for s in range(9)]  # a shuffled batch of 32 holds ~9.7 of 10 classes
    assert data_not_shuffled(facts(shuffled, ten)) is None


def test_few_classes_per_batch_that_change_every_step_are_not_sorted_data():
    """Identity (P×K) sampling: 2 of 10 classes per batch, new ones each step; a GAN's constant targets alternate."""
    ten = {str(k): 100 for k in range(10)}
    pk = [[2, 32, s, [(2 * s) % 10, (2 * s + 1) % 10]] for s in range(9)]
    assert data_not_shuffled(facts(pk, ten)) is None
    gan = [[1, 64, s, [s % 2]] for s in range(12)]
    assert data_not_shuffled(facts(gan, {"0": 384, "1": 384})) is None
    assert data_not_shuffled(facts([[1, 64, 2 * s, [(s // 3) % 2]] for s in range(12)], {"0": 384, "1": 384})) is None


def test_no_verdict_from_few_batches_or_from_batches_too_small_to_hold_two_classes():
    ten = {str(k): 100 for k in range(10)}
    assert data_not_shuffled(facts([[1, 32, s, [0]] for s in range(4)], ten)) is None  # 4 < 5 batches
    skewed = {"0": 990, "1": 10}  # a shuffled batch of 16 holds 1.15 classes on average: one is no evidence
    assert data_not_shuffled(facts([[1, 16, s, [0]] for s in range(20)], skewed)) is None
    assert data_not_shuffled(facts([[1, 32, s, [3]] for s in range(20)], {"3": 500})) is None  # one class in all


SCRIPT = """
import torch
import torch.nn.functional as F
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn(1024, 8, generator=g)
y = (X[:, 0] > 0).long()
order = torch.argsort(y, stable=True) if SORTED else torch.randperm(1024, generator=g)
X, y = X[order], y[order]
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(3):
    for i in range(0, 1024, 32):
        opt.zero_grad()
        F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
    with torch.no_grad():  # validation in the same order: not a training batch
        for i in range(0, 1024, 256):
            F.cross_entropy(model(X[i:i + 256]), y[i:i + 256])
"""


@pytest.mark.parametrize("ordered", [True, False])
def test_a_script_reading_its_classes_in_order_is_named_and_the_shuffled_one_is_not(tmp_path, ordered):
    path = tmp_path / "train.py"
    path.write_text(f"SORTED = {ordered}\n" + textwrap.dedent(SCRIPT))
    watcher = watch_script(path)
    observed = watcher.observations()
    assert observed["batch_labels"] and all(size == 32 for _, size, *_ in observed["batch_labels"])  # no validation
    codes = [d["code"] for d in diagnose_facts(Facts(watcher.records, {}, observed))]
    assert ("data_not_shuffled" in codes) == ordered
    if ordered:
        assert codes[0] == "data_not_shuffled"

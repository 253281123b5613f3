"""The second tries of ``doctor --verify``'s counterfactuals: ReLU instead of squashing, the softmax's axis."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepaudit.doctor import counterfactual, counterfactual_init, counterfactual_wiring


def _tower() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.Sigmoid(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1), nn.Sigmoid()
    )


def test_relu_instead_swaps_hidden_squashes_only_and_draws_he_weights():
    model = _tower()
    x = torch.randn(16, 64)
    handles = counterfactual.install("vanishing_gradients", counterfactual_init.RELU_INSTEAD)
    try:
        out = model(x)
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    # oracle: the same layers by hand, ReLU for the two hidden squashes, the output sigmoid kept
    by_hand = torch.sigmoid(model[4](torch.relu(model[2](torch.relu(model[0](x))))))
    assert torch.equal(out, by_hand)
    he = math.sqrt(2 / 64)
    assert abs(float(model[0].weight.detach().std()) / he - 1) < 0.03  # 16 384 draws
    assert counts == {"tanh/sigmoid → ReLU": 2, "He": 2}
    assert torch.equal(model(x), torch.sigmoid(model[4](torch.tanh(model[2](torch.sigmoid(model[0](x)))))))  # removed


def test_relu_instead_can_keep_the_scripts_weights():
    model = _tower()
    before = [p.detach().clone() for p in model.parameters()]
    handles = counterfactual.install("saturated_activations", counterfactual_init.RELU_OWN_INIT)
    try:
        model(torch.randn(4, 64))
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert counts == {"tanh/sigmoid → ReLU": 2}


def test_a_net_without_squashing_has_nothing_to_swap():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    handles = counterfactual.install("vanishing_gradients", counterfactual_init.RELU_OWN_INIT)
    try:
        model(torch.randn(3, 4))
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    assert counts == {}


def test_a_softmax_over_the_batch_is_taken_over_the_classes():
    torch.manual_seed(0)
    model = nn.Linear(3, 5)
    x = torch.randn(8, 3)
    handles = counterfactual.install("loss_wiring")
    try:
        out = model(x)
        calls = [F.log_softmax(out, 0), out.log_softmax(dim=0), torch.softmax(out, 0), F.softmax(out, dim=1)]
        with torch.no_grad():
            evaluation = F.log_softmax(model(x), 0)  # not a training call: as written
        column = torch.log_softmax(model(x[:5]).T, 0)  # (5, 5) but its first axis is not the batch of 8
        counts = counterfactual.applied()
    finally:
        counterfactual.remove(handles)
    logits = out.detach()
    assert torch.allclose(calls[0], torch.log_softmax(logits, 1), atol=0, rtol=0)
    assert torch.allclose(calls[1], torch.log_softmax(logits, 1), atol=0, rtol=0)
    assert torch.allclose(calls[2], torch.softmax(logits, 1), atol=0, rtol=0)
    assert torch.allclose(calls[3], torch.softmax(logits, 1), atol=0, rtol=0)
    assert torch.equal(evaluation, torch.log_softmax(logits, 0))
    assert torch.allclose(column.exp().sum(0), torch.ones(5))  # still over its own dim 0
    assert counts == {counterfactual_wiring.BATCH_AXIS: 3}


def test_observe_only_leaves_a_softmax_over_the_batch_alone():
    model = nn.Linear(3, 5)
    counterfactual_wiring.APPLIED.clear()
    handles = counterfactual_wiring.rewire_losses(0.0)
    try:
        out = model(torch.randn(8, 3))
        value = F.log_softmax(out, 0)
    finally:
        counterfactual.remove(handles)
    assert torch.equal(value, torch.log_softmax(out.detach(), 0))
    assert counterfactual_wiring.APPLIED[counterfactual_wiring.BATCH_AXIS] == 0


class _Facts:
    """The one thing ``counterfactual_for`` reads for params_not_updating: the observed orphans."""

    def __init__(self, orphans: list[dict]) -> None:
        self.obs = {"orphan_params": orphans}


def test_missing_parameters_are_added_only_when_they_survive_to_the_next_step():
    from stepaudit.doctor.verify import counterfactual_for

    diagnosis = {"code": "params_not_updating"}
    kept = {"name": "head.weight", "numel": 10, "registered": True}
    in_a_list = {"name": "blocks.0.weight (in a plain list, not registered)", "numel": 10, "registered": False}
    replaced = {"name": "?", "numel": 10, "registered": True}  # no longer among the model's parameters
    fresh = {"name": "a tensor of shape [4] created during the forward pass (...)", "numel": 4, "registered": False}
    assert counterfactual_for(diagnosis, _Facts([kept, in_a_list]))[0] == "params_not_updating"
    for orphans in ([], [kept, replaced], [fresh]):
        key, why = counterfactual_for(diagnosis, _Facts(orphans))
        assert key is None and why

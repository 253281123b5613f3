"""The parameter index and batch helpers Audit builds on, checked against hand-written expectations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepaudit.arguments import batch_size, check_loss_signature, check_replayable, index_parameters, validate


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net.register_parameter("scale", nn.Parameter(torch.ones(1)))
    return net


def test_index_follows_optimizer_order_with_modules_and_groups():
    net = model()
    optimizer = torch.optim.SGD(
        [{"params": [net[2].weight, net.scale]}, {"params": [net[0].weight, net[0].bias, net[2].bias], "lr": 0.1}],
        lr=0.01,
    )
    index = index_parameters(net, optimizer)
    assert index.names == ["2.weight", "scale", "0.weight", "0.bias", "2.bias"]
    assert index.modules == ["2", "(root)", "0", "0", "2"]
    assert index.groups == [0, 0, 1, 1, 1]
    assert all(
        p is q for p, q in zip(index.params, [net[2].weight, net.scale, net[0].weight, net[0].bias, net[2].bias])
    )


def test_orphans_warn_by_name_and_strangers_are_refused():
    net = model()
    with pytest.warns(UserWarning, match=r"not in the optimizer .*: scale, 0\.bias, 2\.weight, 2\.bias"):
        index_parameters(net, torch.optim.SGD([net[0].weight], lr=0.1))
    stranger = nn.Parameter(torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"shape \(5, 7\) that is not in the model"):
        index_parameters(net, torch.optim.SGD([stranger], lr=0.1))


def test_batch_size_reads_the_first_tensor_of_each_micro_batch():
    x = torch.zeros(6, 3)
    assert batch_size([(x, torch.zeros(6))]) == 6
    assert batch_size([{"ids": x[:2], "mask": x}, [x[:4]]]) == 2 + 4
    assert batch_size([("text only",)]) is None
    assert batch_size([torch.tensor(1.0)]) is None


def test_one_shot_iterators_are_refused_and_containers_pass():
    check_replayable((torch.zeros(2), torch.zeros(2)))
    check_replayable({"x": torch.zeros(2)})
    with pytest.raises(TypeError, match="cannot be replayed"):
        check_replayable(iter([torch.zeros(2)]))
    with pytest.raises(TypeError, match="cannot be replayed"):
        check_replayable(x for x in [torch.zeros(2)])


@pytest.mark.parametrize(
    "every, message", [(0, "every must be a positive int"), (True, "every must be"), (2.0, "every must be")]
)
def test_validate_names_the_fix(every, message):
    net = model()
    with pytest.raises(ValueError, match=message):
        validate(net, torch.optim.SGD(net.parameters(), lr=0.1), lambda m, b: m(b).sum(), every, None, "eval")


def test_complex_and_torchscript_models_are_refused_with_the_fix():
    net = nn.Linear(3, 2)
    net.register_parameter("phase", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(TypeError, match=r"phase is complex.*view_as_complex"):
        validate(net, torch.optim.SGD(net.parameters(), lr=0.1), lambda m, b: m(b).sum(), 1, None, "eval")
    scripted = torch.jit.script(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="eager model"):
        validate(scripted, torch.optim.SGD(scripted.parameters(), lr=0.1), lambda m, b: m(b).sum(), 1, None, "eval")


def one_argument_loss(batch):
    return batch


@pytest.mark.parametrize(
    "loss_fn, shown",
    [
        (one_argument_loss, r"one_argument_loss\(batch\)"),
        (lambda model, batch, extra: 0, r"<lambda>\(model, batch, extra\)"),
        (lambda *, model, batch: 0, r"<lambda>\(\*, model, batch\)"),
    ],
)
def test_a_loss_fn_that_cannot_take_model_and_batch_is_refused_with_the_signature(loss_fn, shown):
    with pytest.raises(
        TypeError, match=r"loss_fn is called as loss_fn\(model, batch\).*" + shown + ".*lambda model, batch"
    ):
        check_loss_signature(loss_fn)
    net = model()
    with pytest.raises(TypeError, match=shown):
        validate(net, torch.optim.SGD(net.parameters(), lr=0.1), loss_fn, 1, None, "eval")


@pytest.mark.parametrize(
    "loss_fn", [lambda model, batch: 0, lambda *args: 0, lambda model, batch, scale=1.0: 0, nn.MSELoss(), max]
)  # a Module's forward(input, target); a builtin: no check
def test_a_loss_fn_that_takes_two_arguments_passes(loss_fn):
    check_loss_signature(loss_fn)

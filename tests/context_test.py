"""``context.group_lr``: the one learning-rate read, shared by ``Audit`` and the passive doctor."""

from __future__ import annotations

import math

import numpy as np
import torch

from stepaudit.context import group_lr


def test_group_lr_reads_every_number_torch_accepts_and_nan_otherwise():
    """Python and NumPy numbers, 0-d arrays and one-element tensors give their value; None (Adafactor's relative
    step), booleans, strings and several values give NaN."""
    for lr, expected in [
        (0.1, 0.1),
        (3, 3.0),
        (np.float32(0.25), 0.25),
        (np.float64(0.5), 0.5),
        (np.array(0.125), 0.125),
        (torch.tensor(0.75), 0.75),
    ]:
        assert group_lr({"lr": lr}) == expected, lr
    for lr in (None, True, "0.1", torch.tensor([0.1, 0.2]), np.array([0.1, 0.2])):
        assert math.isnan(group_lr({"lr": lr})), lr
    assert math.isnan(group_lr({}))


def test_a_numpy_lr_reaches_the_optimizer_and_the_read_agrees():
    """torch's own SGD accepts a NumPy lr; the value read back is the one it steps with (w − lr·g)."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([w], lr=np.float32(0.25))
    w.grad = torch.tensor([2.0])
    optimizer.step()
    assert w.item() == 1.0 - group_lr(optimizer.param_groups[0]) * 2.0 == 0.5

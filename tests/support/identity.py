"""Bit-identity of two training runs: every weight and buffer, every optimizer state entry and setting, every
RNG stream (torch's CPU generator, Python's ``random``, NumPy's whole legacy state, not only its key array)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_host(seed: int = 5) -> None:
    """Seed Python's and NumPy's generators, so two runs that draw the same numbers end in the same state."""
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> tuple:
    """(torch CPU state, Python's state, NumPy's full legacy state) now."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_rng(a: tuple, b: tuple) -> None:
    """Two ``rng_state()`` snapshots are equal: NumPy's position counter too, which moves on every draw."""
    assert torch.equal(a[0], b[0]), "torch CPU generator"
    assert a[1] == b[1], "Python random"
    (name_a, keys_a, *rest_a), (name_b, keys_b, *rest_b) = a[2], b[2]
    assert name_a == name_b and np.array_equal(keys_a, keys_b) and rest_a == rest_b, "NumPy random"


def _same_value(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_value(p, q) for p, q in zip(x, y))
    return type(x) is type(y) and (x == y or (x != x and y != y))  # NaN settings compare equal


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same state_dict entries (weights and buffers), bit for bit."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """The same per-parameter state (same keys, equal values) and the same settings in every group."""
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, entry in state_a["state"].items():
        assert entry.keys() == state_b["state"][index].keys(), index
        for key, value in entry.items():
            assert _same_value(value, state_b["state"][index][key]), (index, key)
    assert len(state_a["param_groups"]) == len(state_b["param_groups"])
    for group_a, group_b in zip(state_a["param_groups"], state_b["param_groups"]):
        assert group_a.keys() == group_b.keys()
        for key in group_a:
            assert _same_value(group_a[key], group_b[key]), key

"""Shared fixtures: tiny models and batches for oracle tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def classification_loss(model, batch):
    """Mean cross-entropy; the loss_fn used throughout the tests."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def make_mlp(dropout: float = 0.0, batchnorm: bool = False, seed: int = 0) -> nn.Module:
    """A 6-16-3 MLP, optionally with Dropout and BatchNorm (train-mode behaviour under test)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, 3))
    return nn.Sequential(*layers)

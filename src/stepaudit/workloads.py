"""Built-in workloads on data that ships with a package: the demo, the benchmarks and the tests use them.

- digits: the UCI 8×8 handwritten digits (1,797 images, 10 classes; shipped in ``stepaudit/data``), standardised;
- an MLP 64-256-256-10, a small CNN with BatchNorm, and a tiny transformer language model on
  the text of Python's own standard-library sources (nothing is downloaded).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Workload:
    """A model, its loss ``loss_fn(model, batch)``, and an endless stream of training batches."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batches: Callable[[], Iterator[Any]]
    description: str


def load_digits(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): digits (shipped in ``stepaudit/data``) standardised with the training statistics."""
    import numpy as np

    with np.load(Path(__file__).parent / "data" / "digits.npz") as data:
        x = torch.tensor(data["images"], dtype=torch.float32)
        y = torch.tensor(data["labels"], dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple]:
    """Endless shuffled mini-batches with their own generator (never touches the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]


def classification_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Mean cross-entropy of ``model(inputs)`` against integer labels."""
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


def mlp(widths: tuple[int, ...] = (64, 256, 256, 10), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A plain MLP with the given layer widths."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions with BatchNorm on 1×8×8 digits, then a linear classifier."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(4 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


class TinyLM(nn.Module):
    """A 2-layer causal transformer language model over bytes."""

    def __init__(self, vocab: int = 128, d_model: int = 64, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        return self.out(self.blocks(h, mask=self.mask[:t, :t], is_causal=True))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def stdlib_text() -> torch.Tensor:
    """ASCII bytes of a few standard-library modules' source: text that ships with every Python."""
    import argparse  # noqa: E401 - sources used as a corpus
    import collections
    import json
    import textwrap

    text = "".join(inspect.getsource(m) for m in (textwrap, json, collections, argparse))
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


def text_batches(tokens: torch.Tensor, batch_size: int, context: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random windows of ``context + 1`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])


def digits_mlp(batch_size: int = 128, seed: int = 0) -> Workload:
    """MLP 64-256-256-10 on digits."""
    torch.manual_seed(seed)
    x, y, _, _ = load_digits()
    return Workload(
        "mlp",
        mlp(),
        classification_loss,
        lambda: minibatches(x, y, batch_size, seed),
        f"digits MLP 64-256-256-10, batch {batch_size}",
    )


def digits_cnn(batch_size: int = 128, seed: int = 0) -> Workload:
    """CNN with BatchNorm on digits."""
    torch.manual_seed(seed)
    x, y, _, _ = load_digits()
    return Workload(
        "cnn",
        DigitsCNN(),
        classification_loss,
        lambda: minibatches(x, y, batch_size, seed),
        f"digits CNN 2×conv16+BatchNorm, batch {batch_size}",
    )


def tiny_lm(batch_size: int = 16, context: int = 64, seed: int = 0) -> Workload:
    """2-layer transformer LM on stdlib source text."""
    torch.manual_seed(seed)
    tokens = stdlib_text()
    return Workload(
        "lm",
        TinyLM(context=context),
        lm_loss,
        lambda: text_batches(tokens, batch_size, context, seed),
        f"transformer LM 2×d64, context {context}, batch {batch_size}",
    )


WORKLOADS = {"mlp": digits_mlp, "cnn": digits_cnn, "lm": tiny_lm}

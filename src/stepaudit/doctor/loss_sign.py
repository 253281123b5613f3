"""The sign of a loss read from its autograd graph: a log-likelihood (≤ 0 by construction) handed to backward.

A loss built only from log-probabilities (log of a sigmoid or softmax output, log_softmax, logsigmoid, or a
negated elementwise BCE/NLL, as torch.distributions' log_prob computes it) combined with constant non-negative weights, sums, means and views is ≤ 0 whatever the
model predicts, and its infimum is −∞: each log p falls without bound as the model drives p to 0. Minimising
it is maximising the negative log-likelihood (a lost minus sign). Anything else (a log of a variance, a
product of two model outputs such as p·log p, a constant of mixed sign) leaves the sign unknown.

A minus sign written in front of a negative log-likelihood (a reduced library criterion such as
``-F.cross_entropy(...)``, ``-F.binary_cross_entropy(...)``, or an NLL the script already negated, e.g. the
soft-target cross-entropy ``-(t·log p).sum() / N``) is an *added* sign, not a lost one: gradient-ascent
unlearning and adversarial perturbations maximise a classifier's loss on purpose. Such a loss's sign is unknown.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_NODES = 400  # loss-head nodes walked per graph (the model below the log-probabilities is never walked)
_SAME = {
    "MeanBackward0",
    "MeanBackward1",
    "SumBackward0",
    "SumBackward1",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "ExpandBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "UnsqueezeBackward0",
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "SelectBackward0",
    "SliceBackward0",
    "IndexBackward0",
    "GatherBackward0",
    "MaskedSelectBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "CatBackward0",
    "StackBackward0",
}
_PROBABILITIES = {"SigmoidBackward0", "SoftmaxBackward0"}
_LIBRARY_NLL = {"BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0", "NllLossBackward0"}
_SCALING = {"MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"}
_PROBABILITY_KEEPING = _SAME | {"RsubBackward1", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0"}


def _constant_sign(value: Any) -> int:
    """+1 for a scalar ≥ 0 or a tensor in [0, 1] (targets, masks), −1 for a negative scalar, else 0.

    Other tensors (returns, advantages, rewards in [−1, 0]) are data a policy-gradient surrogate multiplies
    log-probabilities by: their sign is the data's, not the objective's, so they leave the sign unknown."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0 and not value.is_complex():
        value = float(value)  # a Python scalar autograd wrapped
    if isinstance(value, (int, float)):
        return 1 if value >= 0 else -1
    if not isinstance(value, torch.Tensor) or value.is_complex() or value.numel() == 0:
        return 0
    return 1 if bool(((value >= 0) & (value <= 1)).all()) else 0


def _saved(node: Any, name: str) -> Any:
    try:
        return getattr(node, name)
    except (AttributeError, RuntimeError):  # not saved, or freed
        return None


def is_probability(node: Any, budget: int = 8) -> bool:
    """``node`` outputs a sigmoid/softmax probability, through views, 1 − p, clamps or an added constant."""
    for _ in range(budget):
        name = type(node).__name__
        if name in _PROBABILITIES:
            return True
        children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
        if len(children) != 1 or name not in _PROBABILITY_KEEPING | {"AddBackward0", "AddBackward1"}:
            return False
        node = children[0]
    return False


def _negative_log_likelihood(node: Any, budget: int = 8) -> bool:
    """``node`` outputs an NLL the script wrote as such: a reduced library criterion (NLL, BCE, cross-entropy, whose
    ``reduction`` is 'mean' or 'sum') or an explicit negation, through views, sums, means and constant scalings.

    An elementwise (reduction='none') library NLL is not one: ``-bce(..., reduction='none')`` is how
    torch.distributions' Bernoulli.log_prob computes a log-likelihood term."""
    for _ in range(budget):
        name = type(node).__name__
        if name == "NegBackward0":
            return True
        if name in _LIBRARY_NLL:
            reduction = _saved(node, "_saved_reduction")
            return not (isinstance(reduction, int) and reduction == 0)  # 0: 'none'
        children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
        if len(children) != 1 or name not in _SAME | _SCALING:
            return False
        node = children[0]
    return False


class _Walk:
    """One graph's sign analysis; ``sources`` names the log-probabilities found."""

    def __init__(self) -> None:
        self.nodes = 0
        self.sources: set[str] = set()

    def sign(self, node: Any) -> int:
        """+1 (≥ 0), −1 (≤ 0) or 0 (unknown) for the output of ``node``."""
        self.nodes += 1
        if node is None or self.nodes > MAX_NODES:
            return 0
        name = type(node).__name__
        nexts = [c for c, _ in node.next_functions]
        if name == "LogBackward0":
            x = _saved(node, "_saved_self")  # the log's input at this step: a probability is ≤ 1
            if nexts and is_probability(nexts[0]) and isinstance(x, torch.Tensor) and bool((x <= 1).all()):
                self.sources.add("log of a sigmoid/softmax output")
                return -1
            return 0
        if name in ("LogSigmoidBackward0", "LogSoftmaxBackward0"):
            self.sources.add("logsigmoid" if name == "LogSigmoidBackward0" else "log_softmax")
            return -1
        if name in ("BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0", "NllLossBackward0"):
            weights = [_saved(node, w) for w in ("_saved_weight", "_saved_pos_weight")]
            if any(w is not None and _constant_sign(w) != 1 for w in weights):
                return 0
            if name == "NllLossBackward0":
                return -self.sign(nexts[0]) if nexts else 0
            self.sources.add("a negated binary_cross_entropy")
            return 1
        if name in _SAME:
            signs = {self.sign(c) for c in nexts if c is not None}
            return signs.pop() if len(signs) == 1 and None not in nexts else 0
        if name == "NegBackward0":
            if nexts[0] is not None and _negative_log_likelihood(nexts[0]):
                return 0  # a minus sign added in front of an NLL: an ascent on purpose (see the module's doc)
            return -self.sign(nexts[0])
        if name in ("AddBackward0", "SubBackward0"):
            if len(nexts) != 2 or None in nexts:
                return 0  # a constant of unseen sign added
            alpha = _constant_sign(_saved(node, "_saved_alpha"))
            a, b = self.sign(nexts[0]), self.sign(nexts[1]) * alpha * (-1 if name == "SubBackward0" else 1)
            return a if a == b else 0
        if name in ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"):
            return self._scaled(node, name, nexts)
        return 0

    def _scaled(self, node: Any, name: str, nexts: list) -> int:
        """A product with (or quotient by) a constant: the constant's sign times the other factor's."""
        if name in ("MulBackward1", "DivBackward1") or (len(nexts) == 2 and nexts[1] is None):
            constant, other = _saved(node, "_saved_other"), nexts[0]
        elif name == "MulBackward0" and len(nexts) == 2 and nexts[0] is None:
            constant, other = _saved(node, "_saved_self"), nexts[1]
        else:
            return 0  # two model outputs multiplied (p·log p): no fixed sign
        if name.startswith("Div") and isinstance(constant, torch.Tensor) and not bool((constant != 0).all()):
            return 0
        return _constant_sign(constant) * self.sign(other)


def log_likelihood_sources(loss: torch.Tensor) -> list[str] | None:
    """The log-probabilities a scalar loss is a non-negative combination of, when it is ≤ 0 by construction."""
    if loss.grad_fn is None or loss.numel() != 1 or not loss.is_floating_point():
        return None
    walk = _Walk()
    with torch.no_grad():
        return sorted(walk.sources) if walk.sign(loss.grad_fn) == -1 else None

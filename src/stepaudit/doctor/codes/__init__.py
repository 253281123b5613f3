"""The diagnosis codes, one module each; the code list, the cause graph and the ordering are derived here.

Each module holds its rule (a function reading ``Facts`` and returning a ``Diagnosis`` with its evidence
and fix, or None) and its ``CODE`` (``base.Code``): priority, the codes it can cause, and how the story
tempers it. To add a code, add a module and list it in ``_MODULES``; nothing else changes. Thresholds are
round numbers with a stated meaning, not fits to a test suite. Sources cited by the rules:
  [K]   A. Karpathy, "A Recipe for Training Neural Networks" (2019): verify loss @ init (= ln C),
        normalise inputs, overfit one batch, watch for a loss that rises.
  [CS]  cs231n, "Neural Networks Part 3": ‖Δw‖/‖w‖ ≈ 1e-3; much lower: lr too low; much higher: too
        high; "as much as 40% of your network can be dead" ReLUs.
  [DL]  The descent lemma: for L-smooth f, f(w − ηg) ≤ f(w) − η(1 − Lη/2)‖g‖², so a step longer than
        2/L can raise the loss; a loss that climbs above its starting value is steps overshooting.
  [MC]  McCandlish et al., "An Empirical Model of Large-Batch Training" (2018): with noise scale
        B_noise = tr Σ/‖G‖², E[cos(g_t, g_t+1)] ≈ 1/(1 + B_noise/B) for independent batches.
  [LC]  LeCun et al., "Efficient BackProp" (1998) §4.3: inputs with zero mean and unit variance;
        the curvature of a first-layer weight scales with E[x²].
  [GB]  Glorot & Bengio, "Understanding the difficulty of training deep feedforward networks" (2010):
        saturated sigmoid/tanh units and gradients shrinking layer by layer.
  [PM]  Pascanu, Mikolov & Bengio, "On the difficulty of training RNNs" (2013): exploding gradients,
        norms growing by orders of magnitude; clip them.
  [ZK]  Zhang et al., "Understanding deep learning requires rethinking generalization" (2017): random
        labels are fitted only by memorisation, slowly, the loss staying near the label entropy.
  [LH]  Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019): AdamW's decay
        w ← w − lr·λ·w acts apart from the gradient step; λ must be tuned with lr and run length.
"""

from __future__ import annotations

from collections.abc import Callable

from ..diagnosis import Diagnosis
from ..facts import Facts
from . import (
    data_not_shuffled,
    dead_relu,
    exploding_gradients,
    gradient_noise_dominates,
    labels_unlearnable,
    loss_wiring,
    lr_too_high,
    lr_too_low,
    missing_zero_grad,
    nonfinite,
    params_not_updating,
    rnn_batch_time_swapped,
    saturated_activations,
    unnormalized_inputs,
    vanishing_gradients,
    weight_decay_too_high,
)
from .base import RESERVED, Code, validate

# The order the rules run in: findings keep it, so it breaks ties between equally strong findings.
_MODULES = (
    nonfinite,
    params_not_updating,
    missing_zero_grad,
    loss_wiring,
    rnn_batch_time_swapped,
    unnormalized_inputs,
    data_not_shuffled,
    dead_relu,
    saturated_activations,
    vanishing_gradients,
    exploding_gradients,
    lr_too_high,
    weight_decay_too_high,
    lr_too_low,
    labels_unlearnable,
    gradient_noise_dominates,
)
ALL: tuple[Code, ...] = tuple(module.CODE for module in _MODULES)
validate(ALL)

RULES: tuple[Callable[[Facts], Diagnosis | None], ...] = tuple(code.rule for code in ALL)
CODES: tuple[str, ...] = RESERVED + tuple(code.name for code in ALL)
# cause -> findings it produces. A finding is reported as a symptom when a cause that fired did not start later.
CAUSES: dict[str, tuple[str, ...]] = {code.name: code.causes for code in ALL if code.causes}
# mutual causes (a → b and b → a, same start): the one earlier here is the cause
PRIORITY: tuple[str, ...] = tuple(code.name for code in sorted(ALL, key=lambda code: code.priority))
QUIET_AFTER_DIVERGENCE: tuple[str, ...] = tuple(code.name for code in ALL if code.quiet_after_divergence)
NOTES_WHEN_LEARNING: tuple[str, ...] = tuple(code.name for code in ALL if code.note_when_learning)

__all__ = [
    "ALL",
    "CAUSES",
    "CODES",
    "Code",
    "NOTES_WHEN_LEARNING",
    "PRIORITY",
    "QUIET_AFTER_DIVERGENCE",
    "RULES",
    "validate",
]

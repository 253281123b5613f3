"""One story per run: the single place where the doctor's findings are reconciled before they are ordered.

The rules judge one mechanism each and know nothing of one another; this module makes their joint
answer consistent. Its policies, applied in this order by ``reconcile``:

1. **A diverged run is explained by what made it diverge.** Once the loss, the gradient or the weights
   went non-finite, findings about a lack of progress (``QUIET_AFTER_DIVERGENCE``) describe numbers
   computed on the way to NaN, not a cause: they are dropped.
2. **Findings that do not stop training are notes.** When the loss at least halved and did not stall at
   the label prior, a mechanism finding (``NOTES_WHEN_LEARNING``), or a finding whose only evidence is a
   mechanism (``Diagnosis.mechanism_only``: ``lr_too_high`` from large early steps and dead ReLUs, with no
   rising or diverging loss), cannot be why the model is not training: its severity becomes ``info``,
   unless the rule marked it ``persistent`` (it lasted to the end at a level that costs accuracy whatever
   the loss did: half the tanh units saturated from initialisation, a batch of ≤ 8 far below the noise
   scale on a loss that levelled off, a gradient that overflowed, ≥ 90% of the hidden ReLUs killed for good
   by the first steps). A note is never taken as another
   finding's cause (``order``), so the links stay one story. (Measured: the official polynomial-fitting
   tutorial feeds raw x³ features (RMS 13), has ‖g‖/‖w‖ ≈ 4e5 at step 0 under reduction='sum', and still
   trains to R² 0.90 with RMSprop; a healthy small Transformer has a first-to-last-layer gradient ratio
   below 1e-2.)
3. **No opposite advice.** Each finding's fix moves the learning rate one way or not at all
   (``Diagnosis.lr_direction``). When findings disagree, the weaker (confidence × severity) is dropped. A finding that another
   explains (a consequence, see ``CAUSES`` in ``codes``) gets "fix <cause> first" instead of its own fix
   (``as_consequence``), so a consequence never advises against its cause.
"""

from __future__ import annotations

from .codes import NOTES_WHEN_LEARNING, QUIET_AFTER_DIVERGENCE
from .diagnosis import Diagnosis
from .facts import Facts

_WEIGHT = {"error": 1.0, "warning": 0.75, "info": 0.3}


def strength(d: Diagnosis) -> float:
    """Confidence weighted by severity: how strongly a finding is put."""
    return d.confidence * _WEIGHT[d.severity]


def reconcile(found: list[Diagnosis], f: Facts) -> list[Diagnosis]:
    """Apply the three policies of this module to the rules' raw findings (a new list; findings may change)."""
    kept = list(found)
    if f.first_nonfinite is not None and f.first_nonfinite.get("what") != "input":
        kept = [d for d in kept if d.code not in QUIET_AFTER_DIVERGENCE]
    if f.learning_well:
        for d in kept:
            if (d.code in NOTES_WHEN_LEARNING or d.mechanism_only) and d.severity != "info" and not d.persistent:
                d.severity = "info"
                d.evidence += f" The loss still fell from {f.loss_start:.3g} to {f.loss_end:.3g}, so this is not what stops training."
    while len({d.lr_direction for d in kept if d.lr_direction}) > 1:
        weaker = min((d for d in kept if d.lr_direction), key=strength)
        kept = [d for d in kept if d is not weaker]
    return kept


def as_consequence(symptom: Diagnosis, cause: Diagnosis) -> None:
    """Mark ``symptom`` as explained by ``cause``: its evidence names the cause and its fix defers to it."""
    symptom.evidence = f"(likely a consequence of {cause.code}) {symptom.evidence}"
    symptom.fix = f"fix {cause.code} first; this should then go away"

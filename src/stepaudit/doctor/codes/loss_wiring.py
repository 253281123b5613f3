"""A loss fed the wrong kind of input, invalid at init, unbounded, constant, or far from ln C at init [K]."""

from __future__ import annotations

import math

from ..diagnosis import SEVERITIES, Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..facts import Facts
from .base import Code

# a real fall of a minimised log-likelihood: its start's 5% (verify's SLIGHT, the least gain that counts as any), not
# any fall (an ascent that stalls reads "fell from -1.71 to -1.71")
FELL = 0.05

_WIRING = {
    "probabilities_into_cross_entropy": (
        "error",
        0.95,
        "CrossEntropyLoss received probabilities (every row sums to {row_sum:.3g} and lies in [0, 1]) "
        "instead of logits: it applies log_softmax itself, so the loss cannot go below ~ln(e + C − 1) − 1 and "
        "gradients are squashed",
        "remove the final softmax (nn.Softmax / F.softmax) and feed raw logits to CrossEntropyLoss",
    ),
    "log_probabilities_into_cross_entropy": (
        "info",
        0.3,
        "CrossEntropyLoss received log-probabilities (rows' logsumexp = 0): harmless, since log_softmax "
        "is idempotent, but redundant",
        "drop the log_softmax before CrossEntropyLoss, or use NLLLoss with it",
    ),
    "scores_into_nll_loss": (
        "error",
        0.95,
        "NLLLoss received values that are not log-probabilities (rows' logsumexp = {logsumexp:.3g}, "
        "max {max:.3g}; it expects log_softmax outputs), so the loss is unbounded below",
        "apply F.log_softmax(logits, dim=1) before NLLLoss, or use CrossEntropyLoss on the logits",
    ),
    "probabilities_into_bce_with_logits": (
        "error",
        0.9,
        "BCEWithLogitsLoss received values in [{min:.3g}, {max:.3g}], i.e. probabilities after a "
        "sigmoid, where it expects logits (it applies the sigmoid itself)",
        "remove the sigmoid before BCEWithLogitsLoss (or use BCELoss on the probabilities)",
    ),
    "softmax_over_batch": (
        "error",
        0.9,
        "{function} was taken over dim {dim} of a tensor of shape {shape}, whose first axis is the "
        "batch: each column is normalised across examples instead of each row across classes",
        "normalise over the class axis: softmax(logits, dim=1) (or dim=-1); better, pass raw logits to F.cross_entropy",
    ),
    "classes_as_regression": (
        "warning",
        0.6,
        "{loss} compared one output per example with targets that are the class indices 0–{top} "
        "(each about equally frequent): the classes are fitted as a number, so the model is pushed to put "
        "class 3 between classes 2 and 4 and to predict the mean class when unsure",
        "predict one logit per class and use F.cross_entropy(logits, labels.long()); read the class with argmax",
    ),
    "broadcast_shapes": (
        "error",
        0.9,
        "the regression loss compared input of shape {input_shape} with target of shape "
        "{target_shape}: they broadcast to a matrix, so every prediction is fitted to every target",
        "make the shapes equal, e.g. loss_fn(pred.squeeze(-1), y) or y.unsqueeze(-1)",
    ),
}


def loss_wiring(f: Facts) -> Diagnosis | None:
    """A loss wired to the wrong kind of input, or a loss at initialisation far from ln C [K: verify loss @ init]."""
    findings = f.obs.get("loss_findings") or []
    # the most severe first; a softmax over the batch axis before the loss that then sees bad inputs
    ranked = sorted(
        findings,
        key=lambda x: (
            SEVERITIES.index(_WIRING[x["kind"]][0]) if x.get("kind") in _WIRING else 9,
            x.get("kind") != "softmax_over_batch",
        ),
    )
    for finding in ranked:
        if finding.get("kind") not in _WIRING:
            continue
        severity, confidence, evidence, fix = _WIRING[finding["kind"]]
        try:
            text = evidence.format(**finding)
        except (KeyError, ValueError):
            text = evidence.split("{")[0]
        return Diagnosis(
            "loss_wiring", severity, confidence, int(finding.get("step") or 0), text + ".", fix, kind=finding["kind"]
        )
    broken = f.first_nonfinite
    if (
        broken is not None
        and broken["what"] == "loss"
        and f.records
        and broken["step"] == f.records[0]["step"]
        and not f.obs.get("target_nan_or_inf")
    ):
        # NaN before any update, with finite inputs (else "input") and targets: the formula is invalid for
        # what a freshly initialised model outputs (log of a value ≤ 0, 0/0, sqrt of a negative).
        return Diagnosis(
            "loss_wiring",
            "error",
            0.8,
            broken["step"],
            "the loss was already NaN/Inf at the first step, before any update, with finite inputs: the "
            "loss computation is invalid for the model's initial outputs (log of a value ≤ 0, a "
            "division by zero or the square root of a negative number).",
            "compute log-probabilities with F.log_softmax / F.logsigmoid (or clamp: log(p.clamp_min("
            "1e-8))), or use the fused losses (F.cross_entropy, F.binary_cross_entropy_with_logits)",
            kind="nonfinite_at_start",
        )
    init = f.obs.get("initial_loss") or {}
    if init.get("loss") == "cross_entropy" and init.get("classes") == 1:
        # log_softmax over a class axis of size 1 is log(e^z / e^z) = 0 for any logit z: the loss is 0 and its
        # gradient is 0 whatever the model outputs (soft float targets are accepted, so nothing raises)
        return Diagnosis(
            "loss_wiring",
            "error",
            0.95,
            int(init.get("step") or 0),
            "CrossEntropyLoss received a single class column (input of shape (N, 1)): the softmax of one "
            "value is 1, so the loss is 0 and its gradient is 0 whatever the model predicts.",
            "for two classes use one logit with BCEWithLogitsLoss (float targets of the same shape), or two "
            "logits with CrossEntropyLoss and integer class labels",
            kind="single_class",
        )
    likelihood = f.obs.get("log_likelihood_loss")
    start, end = f.loss_start, f.loss_end
    if likelihood and start is not None and end is not None and start - end >= FELL * abs(start) and end < start:
        return Diagnosis(
            "loss_wiring",
            "error",
            0.85,
            0,
            f"the loss handed to backward is built only from log-probabilities ({', '.join(likelihood['sources'])}) "
            "with non-negative weights, so it is ≤ 0 whatever the model predicts and unbounded below; it fell "
            f"from {_g(start)} to {_g(end)}: minimising a log-likelihood drives the probability of the data to 0.",
            "negate it: loss = -log_likelihood.mean() (or use F.binary_cross_entropy_with_logits / F.cross_entropy, "
            "which are already the negative log-likelihood)",
            kind="log_likelihood_minimised",
            whole_run=True,
        )
    form = f.loss_form
    zero_grad = f.gradient_always_zero
    if form is not None and (form["kind"] == "unbounded_below" or f.moved or zero_grad or f.obs.get("custom_update")):
        if form["kind"] == "constant_loss":
            evidence = (
                f"the loss was exactly {_g(form['value'])} at each of the first {form['steps']} steps"
                + (" and its gradient was exactly 0" if zero_grad else " while the weights moved")
                + ": it does not depend on what the model predicts, so it gives no learning signal"
            )
            fix = (
                "check the hand-written loss: log of a raw output (apply softmax/log_softmax first), a mask or "
                "weight that zeroes it, or a comparison made on detached values; F.cross_entropy takes logits"
            )
        else:
            evidence = (
                f"the loss fell from {_g(form['start'])} to {_g(form['end'])} (lowest {_g(form['lowest'])}) and is "
                "still falling: the objective is unbounded below, so minimising it does not fit the data"
            )
            fix = (
                "a log-likelihood must be negated to be minimised (loss = -log_prob.mean()); NLL losses need "
                "log-probabilities (log_softmax), and a loss of probabilities must stay ≥ 0"
            )
        return Diagnosis("loss_wiring", "error", 0.85, 0, evidence + ".", fix, kind=form["kind"], whole_run=True)
    classes, value = init.get("classes"), init.get("value")
    # ln C is the mean loss of a fresh initialisation: not of a summed loss (B·ln C), nor of loaded weights
    fresh = init.get("reduction", "mean") == "mean" and not f.obs.get("loaded_weights")
    if init.get("loss") == "cross_entropy" and classes and classes >= 2 and isinstance(value, (int, float)) and fresh:
        expected = math.log(classes)
        if math.isfinite(value) and value > 2 * expected:
            # For logits of spread s, E[CE] ≈ ln C + s²/2: beyond 2 ln C the initialisation alone costs as much as
            # knowing nothing (s ≳ √(2 ln C)); the first steps are spent undoing it (Karpathy's "hockey stick").
            ratio = value / expected
            severity = "info" if (f.progress or 0) >= 0.5 else "warning"
            return Diagnosis(
                "loss_wiring",
                severity,
                _clip(0.5 + 0.1 * math.log2(ratio)),
                int(init.get("step") or 0),
                f"the loss at initialisation is {_g(value)}, {ratio:.3g}× ln {classes} = {_g(expected)} "
                "(uniform predictions): the initial logits are far too large or the loss is scaled.",
                "scale down the last layer's initial weights (e.g. multiply by 0.01) and check the "
                "loss reduction ('mean'); then verify the first loss ≈ ln C",
                kind="init",
            )
    return None


CODE = Code(
    name="loss_wiring",
    rule=loss_wiring,
    priority=30,
    causes=(
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "saturated_activations",
        "nonfinite",
        "exploding_gradients",
        "lr_too_high",
    ),
)

"""The doctor's rules: one small function per diagnosis, each reading ``Facts`` and citing its source.

A rule returns a ``Diagnosis`` (or None). Thresholds are round numbers with a stated meaning, not
fits to a test suite. Sources:
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
"""
from __future__ import annotations

import math
from typing import Callable

from .diagnosis import SEVERITIES, Diagnosis, clip as _clip, fmt as _g, not_training as _not_training
from .dynamics import gradient_noise_dominates, labels_unlearnable, lr_too_high, lr_too_low
from .facts import Facts, med

__all__ = ["RULES", "SEVERITIES", "Diagnosis"]


# -- structural findings (seen directly, not inferred) ----------------------------------------------------------
def nonfinite(f: Facts) -> Diagnosis | None:
    """NaN/Inf in the loss, the gradient, the update or the weights."""
    found = f.first_nonfinite
    if found is None:
        return None
    step, what = found["step"], found["what"]
    before = [v for s, v in f.losses if s < step]
    grew = bool(before) and f.loss_init is not None and max(before) > 1.5 * abs(f.loss_init)
    if what == "input":
        detail, fix = ("the first layer's input already contained NaN/Inf",
                       "clean the data: assert torch.isfinite(x).all() when loading; impute or drop the bad rows")
    elif grew:
        detail, fix = (f"after the loss had grown to {_g(max(before))} (from {_g(f.loss_init)})",
                       "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0))")
    elif not before:
        detail, fix = ("at the first step, before any update",
                       "look for NaN/Inf in the data (torch.isfinite(x).all()) and for log(0), division by zero "
                       "or sqrt(0) in the loss; add an epsilon (e.g. log(p + 1e-8)) or use the fused loss")
    else:
        detail, fix = (f"suddenly, with the loss still near {_g(before[-1] if before else None)} just before",
                       "look for NaN/Inf in the data (torch.isfinite(x).all()) and for log(0), division by zero "
                       "or sqrt(0) in the loss; add an epsilon (e.g. log(p + 1e-8)) or use the fused loss")
    return Diagnosis("nonfinite", "error", 0.95, step, f"the {what} became NaN/Inf at step {step}, {detail}.", fix,
                     kind="growth" if grew else what, lr_direction=-1 if grew else 0)


def params_not_updating(f: Facts) -> Diagnosis | None:
    """No optimizer step, a zero learning rate, or parameters that get no gradient or no optimizer."""
    obs = f.obs
    steps, backwards = f.n_steps, obs.get("backward_passes")
    if f.passive and steps == 0:
        if obs.get("weights_changed"):
            return None  # a hand-written or non-torch.optim update moved the weights: they are updating
        if backwards:
            return Diagnosis("params_not_updating", "error", 0.97, 0,
                             f"{backwards} backward passes ran but optimizer.step() was never called: the weights never change.",
                             "call optimizer.step() after loss.backward() (and optimizer.zero_grad() before it)")
        return Diagnosis("params_not_updating", "warning", 0.5, None,
                         "no backward pass and no optimizer step were seen: nothing was trained.",
                         "check that the script reaches its training loop (loss.backward(); optimizer.step())")
    groups = [{**g, "lr": (o.get("max_lr") or [])[i] if i < len(o.get("max_lr") or []) else g.get("lr")}
              for o in obs.get("optimizers") or [] for i, g in enumerate(o.get("param_groups") or [])]
    groups = groups or (f.meta.get("param_groups") or [])  # active: the groups as the audit began
    zero_lr = [g for g in groups if g.get("lr") == 0]  # passive: the largest lr seen (schedules may end at 0)
    if groups and len(zero_lr) == len(groups):
        return Diagnosis("params_not_updating", "error", 0.95, 0, "the learning rate is 0 in every parameter group.",
                         "set a positive learning rate (e.g. lr=1e-3 for Adam, 1e-2–1e-1 for SGD)")
    if f.sampled and not f.moved:
        zero_grad = f.gradient_always_zero
        if zero_grad and ((f.loss_form or {}).get("kind") == "constant_loss" or f.dead_output is not None):
            return None  # the loss does not depend on the weights (loss_wiring) or the output is a dead ReLU
        if zero_grad:
            return Diagnosis("params_not_updating", "error", 0.95, int(f.sampled[0]["step"]),
                             f"the gradient the optimizer received was exactly 0 at all {len(f.sampled)} sampled steps, "
                             "so no weight changed: .grad is cleared between backward() and step(), or backward() "
                             "runs after step().",
                             "order each iteration as optimizer.zero_grad(); loss.backward(); optimizer.step()")
        return Diagnosis("params_not_updating", "error", 0.9, int(f.sampled[0]["step"]),
                         f"‖Δw‖ = 0 at all {len(f.sampled)} sampled steps although ‖g‖ ≈ {_g(med(r['grad_norm'] for r in f.sampled))}.",
                         "check the learning rate and that the optimizer holds the model's parameters")
    return _rare_steps(f) or _mostly_frozen(f) or _partly_not_updating(f, zero_lr, groups)


def _rare_steps(f: Facts) -> Diagnosis | None:
    """optimizer.step() once every many backward passes (outside the batch loop), on a run that stalls."""
    passes = [r.get("backward_passes") for r in f.records if isinstance(r.get("backward_passes"), (int, float))]
    # Deliberate accumulation (nanoGPT: 40 micro-batches) has the same ratio; only a run that does not
    # learn makes it a suspect, and then as a warning that names both readings.
    if not passes or f.n_steps > 50 or not _not_training(f):
        return None
    every = sorted(passes)[len(passes) // 2]
    if every < 8:  # deliberate accumulation is usually 2-8 micro-batches, and over a long run
        return None
    total = sum(passes)
    return Diagnosis("params_not_updating", "warning", 0.7, 0,
                     f"optimizer.step() ran {f.n_steps} times for {total} backward passes (once every {every}) and the "
                     f"loss barely moved: each update sums the gradients of {every} batches, and the weights change "
                     f"{every}× less often than the script sees batches (deliberate gradient accumulation does this "
                     "too; then ignore this).",
                     "call optimizer.zero_grad(), loss.backward() and optimizer.step() once per batch, inside the "
                     "batch loop (check the indentation of optimizer.step())", kind="rare_steps")


def _mostly_frozen(f: Facts) -> Diagnosis | None:
    """Most of the model has requires_grad=False and the run does not learn."""
    total, frozen = f.obs.get("model_numel") or 0, f.obs.get("frozen_numel") or 0
    if not total or frozen < 0.5 * total or not _not_training(f):
        return None
    names = ", ".join(f.obs.get("frozen_names") or [])
    return Diagnosis("params_not_updating", "error" if frozen >= 0.9 * total else "warning",
                     _clip(0.5 + 0.4 * frozen / total), 0,
                     f"{frozen / total:.0%} of the model's values ({frozen:,} of {total:,}; e.g. {names}) have "
                     "requires_grad=False, and the loss barely moved: only the rest can learn.",
                     "unfreeze the layers that must learn (p.requires_grad_(True)); freeze only pretrained layers",
                     kind="frozen")


def _partly_not_updating(f: Facts, zero_lr: list, groups: list) -> Diagnosis | None:
    obs = f.obs
    trainable = obs.get("trainable_numel") or 0
    orphans = obs.get("orphan_params") or []
    orphan_numel = sum(o["numel"] for o in orphans)
    no_grad = [p for o in obs.get("optimizers") or [] for p in o.get("no_grad") or []]
    no_grad_numel = sum(o.get("no_grad_numel", 0) for o in obs.get("optimizers") or [])
    held = sum(o.get("numel", 0) for o in obs.get("optimizers") or [])
    parts, share = [], 0.0
    if orphans:
        share = max(share, orphan_numel / trainable if trainable else 1.0)
        parts.append(f"{len(orphans)} parameter tensors ({orphan_numel:,} values, {share:.0%} of the model's trainable "
                     f"values; e.g. {', '.join(o['name'] for o in orphans[:3])}) receive gradients but belong to no "
                     "optimizer, so they never change")
    if no_grad_numel and held:
        s = no_grad_numel / held
        share = max(share, s)
        parts.append(f"{len(no_grad)} of the optimizer's parameter tensors ({s:.0%} of its values; e.g. "
                     f"{', '.join(p['name'] for p in no_grad[:3])}) never received a nonzero gradient (detached or unused)")
    if zero_lr:
        share = max(share, len(zero_lr) / len(groups))
        parts.append(f"{len(zero_lr)} of {len(groups)} parameter groups have lr = 0")
    if not parts:
        return None
    severity = "error" if share >= 0.5 or orphans else "warning"
    kind = "no_grad" if not orphans and not zero_lr else "structure"
    fix = ("build the optimizer after the model is final (after replacing layers / moving to the device) "
           "from model.parameters(); don't detach() or wrap the forward in torch.no_grad()")
    if any(o.get("registered") is False for o in orphans):
        fix = ("register every layer with the model: keep submodules in nn.ModuleList / nn.ModuleDict, not a plain "
               "list or dict, and create weights once in __init__ as nn.Parameter, not inside forward(); then "
               "build the optimizer from model.parameters()")
    return Diagnosis("params_not_updating", severity, _clip(0.6 + 0.4 * share), 0, "; ".join(parts) + ".", fix,
                     kind=kind)


def missing_zero_grad(f: Facts) -> Diagnosis | None:
    """``.grad`` still holds the previous step's gradient when the next backward begins (passive check)."""
    checks = [c for c in f.obs.get("zero_checks") or [] if isinstance(c.get("kept"), (int, float))]
    if len(checks) < 2:
        return None
    kept = [c for c in checks if c["kept"] >= 0.5]
    share = len(kept) / len(checks)
    if share < 0.9:  # deliberate accumulation still clears .grad after every step
        return None
    first = kept[0].get("next", kept[0].get("step", -1) + 1)
    return Diagnosis("missing_zero_grad", "error", _clip(0.75 + 0.25 * share), int(first),
                     f"at {len(kept)} of {len(checks)} checked steps the previous step's gradient was still in .grad "
                     "when the next backward() began, so gradients add up across steps (step k uses g_1+…+g_k).",
                     "call optimizer.zero_grad() once per iteration, before loss.backward()")


_WIRING = {
    "probabilities_into_cross_entropy": (
        "error", 0.95, "CrossEntropyLoss received probabilities (every row sums to {row_sum:.3g} and lies in [0, 1]) "
        "instead of logits: it applies log_softmax itself, so the loss cannot go below ~ln(e + C − 1) − 1 and "
        "gradients are squashed",
        "remove the final softmax (nn.Softmax / F.softmax) and feed raw logits to CrossEntropyLoss"),
    "log_probabilities_into_cross_entropy": (
        "info", 0.3, "CrossEntropyLoss received log-probabilities (rows' logsumexp = 0): harmless, since log_softmax "
        "is idempotent, but redundant",
        "drop the log_softmax before CrossEntropyLoss, or use NLLLoss with it"),
    "scores_into_nll_loss": (
        "error", 0.95, "NLLLoss received values that are not log-probabilities (rows' logsumexp = {logsumexp:.3g}, "
        "max {max:.3g}; it expects log_softmax outputs), so the loss is unbounded below",
        "apply F.log_softmax(logits, dim=1) before NLLLoss, or use CrossEntropyLoss on the logits"),
    "probabilities_into_bce_with_logits": (
        "error", 0.9, "BCEWithLogitsLoss received values in [{min:.3g}, {max:.3g}], i.e. probabilities after a "
        "sigmoid, where it expects logits (it applies the sigmoid itself)",
        "remove the sigmoid before BCEWithLogitsLoss (or use BCELoss on the probabilities)"),
    "softmax_over_batch": (
        "error", 0.9, "{function} was taken over dim {dim} of a tensor of shape {shape}, whose first axis is the "
        "batch: each column is normalised across examples instead of each row across classes",
        "normalise over the class axis: softmax(logits, dim=1) (or dim=-1); better, pass raw logits to "
        "F.cross_entropy"),
    "classes_as_regression": (
        "warning", 0.6, "{loss} compared one output per example with targets that are the class indices 0–{top} "
        "(each about equally frequent): the classes are fitted as a number, so the model is pushed to put "
        "class 3 between classes 2 and 4 and to predict the mean class when unsure",
        "predict one logit per class and use F.cross_entropy(logits, labels.long()); read the class with argmax"),
    "broadcast_shapes": (
        "error", 0.9, "the regression loss compared input of shape {input_shape} with target of shape "
        "{target_shape}: they broadcast to a matrix, so every prediction is fitted to every target",
        "make the shapes equal, e.g. loss_fn(pred.squeeze(-1), y) or y.unsqueeze(-1)"),
}


def loss_wiring(f: Facts) -> Diagnosis | None:
    """A loss wired to the wrong kind of input, or a loss at initialisation far from ln C [K: verify loss @ init]."""
    findings = f.obs.get("loss_findings") or []
    # the most severe first; a softmax over the batch axis before the loss that then sees bad inputs
    ranked = sorted(findings, key=lambda x: (SEVERITIES.index(_WIRING[x["kind"]][0]) if x.get("kind") in _WIRING else 9,
                                             x.get("kind") != "softmax_over_batch"))
    for finding in ranked:
        if finding.get("kind") not in _WIRING:
            continue
        severity, confidence, evidence, fix = _WIRING[finding["kind"]]
        try:
            text = evidence.format(**finding)
        except (KeyError, ValueError):
            text = evidence.split("{")[0]
        return Diagnosis("loss_wiring", severity, confidence, int(finding.get("step") or 0), text + ".", fix,
                         kind=finding["kind"])
    broken = f.first_nonfinite
    if (broken is not None and broken["what"] == "loss" and f.records and broken["step"] == f.records[0]["step"]
            and not f.obs.get("target_nan_or_inf")):
        # NaN before any update, with finite inputs (else "input") and targets: the formula is invalid for
        # what a freshly initialised model outputs (log of a value ≤ 0, 0/0, sqrt of a negative).
        return Diagnosis("loss_wiring", "error", 0.8, broken["step"],
                         "the loss was already NaN/Inf at the first step, before any update, with finite inputs: the "
                         "loss computation is invalid for the model's initial outputs (log of a value ≤ 0, a "
                         "division by zero or the square root of a negative number).",
                         "compute log-probabilities with F.log_softmax / F.logsigmoid (or clamp: log(p.clamp_min("
                         "1e-8))), or use the fused losses (F.cross_entropy, F.binary_cross_entropy_with_logits)",
                         kind="nonfinite_at_start")
    form = f.loss_form
    zero_grad = f.gradient_always_zero
    if form is not None and (form["kind"] == "unbounded_below" or f.moved or zero_grad or f.obs.get("custom_update")):
        if form["kind"] == "constant_loss":
            evidence = (f"the loss was exactly {_g(form['value'])} at each of the first {form['steps']} steps"
                        + (" and its gradient was exactly 0" if zero_grad else " while the weights moved")
                        + ": it does not depend on what the model predicts, so it gives no learning signal")
            fix = ("check the hand-written loss: log of a raw output (apply softmax/log_softmax first), a mask or "
                   "weight that zeroes it, or a comparison made on detached values; F.cross_entropy takes logits")
        else:
            evidence = (f"the loss fell from {_g(form['start'])} to {_g(form['end'])} (lowest {_g(form['lowest'])}) and is "
                        "still falling: the objective is unbounded below, so minimising it does not fit the data")
            fix = ("a log-likelihood must be negated to be minimised (loss = -log_prob.mean()); NLL losses need "
                   "log-probabilities (log_softmax), and a loss of probabilities must stay ≥ 0")
        return Diagnosis("loss_wiring", "error", 0.85, 0, evidence + ".", fix, kind=form["kind"], whole_run=True)
    init = f.obs.get("initial_loss") or {}
    classes, value = init.get("classes"), init.get("value")
    if init.get("loss") == "cross_entropy" and classes and classes >= 2 and isinstance(value, (int, float)):
        expected = math.log(classes)
        if math.isfinite(value) and value > 2 * expected:
            # For logits of spread s, E[CE] ≈ ln C + s²/2: beyond 2 ln C the initialisation alone costs as much as
            # knowing nothing (s ≳ √(2 ln C)); the first steps are spent undoing it (Karpathy's "hockey stick").
            ratio = value / expected
            severity = "info" if (f.progress or 0) >= 0.5 else "warning"
            return Diagnosis("loss_wiring", severity, _clip(0.5 + 0.1 * math.log2(ratio)), int(init.get("step") or 0),
                             f"the loss at initialisation is {_g(value)}, {ratio:.3g}× ln {classes} = {_g(expected)} "
                             "(uniform predictions): the initial logits are far too large or the loss is scaled.",
                             "scale down the last layer's initial weights (e.g. multiply by 0.01) and check the "
                             "loss reduction ('mean'); then verify the first loss ≈ ln C", kind="init")
    return None


def unnormalized_inputs(f: Facts) -> Diagnosis | None:
    """First-layer input far from unit scale [LC §4.3; K: normalise inputs]."""
    rows = [r for r in f.records if isinstance(r.get("input_rms"), (int, float))]
    if not rows:
        return None
    first = max(rows, key=lambda r: (r.get("input_rows") or 0, -r["step"]))  # the most pooled rows
    rms, feature_max = first["input_rms"], first.get("input_feature_rms_max") or first["input_rms"]
    offset, ratio = first.get("input_feature_offset_median"), first.get("input_feature_std_ratio")
    # The first layer's curvature scales with E[x²] [LC]: two orders of magnitude either way is a mismatch.
    too_large = rms >= 10 or feature_max >= 100
    too_small = 0 < rms <= 1e-2
    # [LC §4.3] also asks for zero mean and comparable variances per feature: a feature whose mean is 20×
    # its spread varies over a sliver of its value (the bias must cancel the offset before anything is
    # learnt); spreads 100× apart give the first layer's curvature a condition number ≥ 1e4.
    sliver = isinstance(offset, (int, float)) and offset >= 20
    low = first.get("input_feature_std_min_ratio")
    uneven = (isinstance(ratio, (int, float)) and ratio >= 100 and (first.get("input_feature_std_max") or 0) >= 3) or (
        isinstance(low, (int, float)) and low >= 300)
    if not (too_large or too_small or sliver or uneven):
        return None
    off = (math.log10(max(rms, feature_max / 10)) if too_large else -math.log10(rms) if too_small
           else math.log10(max(offset or 1, ratio or 1, low or 1)) - 1)
    evidence = (f"the first layer ({first.get('input_layer', '?')}) receives inputs with RMS {_g(rms)} "
                f"(largest feature RMS {_g(feature_max)}, median feature std {_g(first.get('input_feature_std_median'))}); "
                "unit scale is ≈ 1")
    if sliver and not (too_large or too_small):
        evidence += (f"; the median feature's mean is {_g(offset)}× its standard deviation: the values vary over a "
                     "sliver of their range")
    if uneven:
        evidence += (f"; the features' standard deviations differ by {_g(max(ratio or 1, low or 1))}× "
                     f"(largest {_g(first.get('input_feature_std_max'))}, the median is {_g(low)}× the smallest)")
    trouble = _not_training(f) or f.first_nonfinite is not None or any(
        (r.get("saturated_share") or 0) >= 0.5 or (r.get("dead_relu_share") or 0) >= 0.5 for r in f.records)
    severity = "error" if trouble else "warning"
    return Diagnosis("unnormalized_inputs", severity, _clip(0.55 + 0.15 * (off - 1) + (0.2 if trouble else 0)),
                     int(first["step"]), evidence + ".",
                     "standardise the inputs with the training-set statistics: x = (x - mean) / std "
                     "(images: divide by 255, then normalise per channel)")


# -- activations and gradients ----------------------------------------------------------------------------------
def dead_relu(f: Facts) -> Diagnosis | None:
    """Hidden ReLU units that output 0 for every example of a batch [CS: up to 40% can die], or a ReLU on
    the model's output that is 0 for every example (all predictions 0, no gradient back)."""
    output = f.dead_output
    if output is not None:
        return Diagnosis("dead_relu", "error", 0.9, output,
                         f"the model's output goes through a ReLU that is 0 for every example of the batch from step "
                         f"{output} on (median over sampled steps): every prediction is 0 and no gradient flows back.",
                         "remove the ReLU after the last layer (predict the raw output; use Softplus or exp if the "
                         "target must be positive)")
    overall, layer = f.share_late("dead_relu_share"), f.share_late("dead_relu_max")
    if overall is None:
        return None
    share, first = overall
    layer_share = layer[0] if layer else share
    if share < 0.5 and layer_share < 0.9:  # half the units, or a layer that passes (almost) nothing
        return None
    at_init = (f.share_init("dead_relu_share") or 0) >= 0.5 or (f.share_init("dead_relu_max") or 0) >= 0.9
    if not at_init and (f.progress or 0) >= 0.5 and share < 0.9:
        return None  # units died along the way but the loss halved: not what stops training
    severity = "error" if share >= 0.9 or at_init or _not_training(f) else "warning"
    onsets = [s for s in (f.first_at("dead_relu_share", 0.5), f.first_at("dead_relu_max", 0.9)) if s is not None]
    first = 0 if at_init else min(onsets, default=first)
    when = "from initialisation on" if at_init else f"from step {first} on"
    fix = ("check biases and initialisation (no large negative bias; kaiming init); LeakyReLU or normalisation "
           "layers keep units alive")
    return Diagnosis("dead_relu", severity, _clip(0.5 + 0.5 * max(share, layer_share - 0.2)), first,
                     f"{share:.0%} of hidden ReLU units never fire on a whole batch (worst layer {layer_share:.0%} dead) "
                     f"{when}, so they pass no gradient and never recover.",
                     fix if at_init else "lower the learning rate (large steps push units below zero for good); " + fix,
                     lr_direction=0 if at_init else -1)


def saturated_activations(f: Facts) -> Diagnosis | None:
    """Hidden sigmoid/tanh units stuck near their asymptotes, where the derivative is ~0 [GB].

    At initialisation a hidden layer is saturated only if its pre-activations have a spread ≳ 4 (half of
    N(0, σ²) beyond ±2.65 needs σ ≈ 3.9): a mis-scaled initialisation or input, whatever the loss does
    later. Saturation that develops during training counts only when the loss has not halved.
    """
    late, layer = f.share_late("saturated_share"), f.share_late("saturated_max")
    if late is None:
        return None
    share, first = late
    init_layer = f.share_init("saturated_max") or 0
    at_init = init_layer >= 0.5
    if not at_init and (share < 0.5 or ((f.progress or 0) >= 0.5 and share < 0.9)):
        return None
    worst = max(init_layer, layer[0] if layer else 0)
    severity = "error" if _not_training(f) or share >= 0.5 else "warning"
    when = "from initialisation on" if at_init else f"from step {first} on"
    return Diagnosis("saturated_activations", severity, _clip(0.45 + 0.5 * max(share, worst)), 0 if at_init else first,
                     f"{share:.0%} of hidden sigmoid/tanh outputs (worst layer {worst:.0%}) sit within 1% of their "
                     f"limits {when}, where the derivative is < 2% of its maximum, so little gradient flows through them.",
                     "initialise with the fan-in in mind (xavier / N(0, 1/fan_in)), normalise the inputs, "
                     "or use ReLU-family activations / normalisation layers", persistent=at_init and share >= 0.5)


def vanishing_gradients(f: Facts) -> Diagnosis | None:
    """Relative gradient shrinking by orders of magnitude from the last layer to the first [GB]."""
    found = f.depth_ratio
    if found is None:
        return None
    ratio, first, last = found
    if ratio > 1e-2:
        return None
    severity = "error" if _not_training(f) or ratio <= 1e-4 else "warning"
    step = int(f.sampled[0]["step"]) if f.sampled else 0
    return Diagnosis("vanishing_gradients", severity, _clip(0.6 + 0.08 * -math.log10(ratio / 1e-2)), step,
                     f"the first weight layer ({first}) gets a relative gradient ‖g‖/‖w‖ {ratio:.2g}× that of the last "
                     f"({last}) (median over sampled steps): the early layers barely learn.",
                     "use ReLU-family activations with kaiming init, add residual connections or "
                     "BatchNorm/LayerNorm, and avoid deep stacks of sigmoid/tanh")


def exploding_gradients(f: Facts) -> Diagnosis | None:
    """Gradients growing by orders of magnitude over the run, or already huge relative to the weights [PM]."""
    parts, first = [], None
    growth = f.grad_growth
    if growth and growth[0] >= 100:
        parts.append(f"‖g‖ grew {growth[0]:.3g}× over the run")
        first = growth[1]
    rel, early = f.relative_grad_init, f.relative_grad_early
    if rel is not None and rel >= 10 and early is not None and early >= 10:
        # ‖g‖/‖w‖ ≥ 10: even lr = 1e-2 would move the weights by 10% per step, 100× cs231n's 1e-3. Required at
        # initialisation and still over the first sampled steps: one large first gradient is not a trend.
        parts.append(f"at step {f.sampled[0]['step']} the gradient was {rel:.3g}× the weights' norm (median over "
                     f"layers), and still {early:.3g}× over the first sampled steps")
        first = int(f.sampled[0]["step"])
    cliff = f.loss_cliff
    if cliff is not None:
        parts.append(f"the loss was {_g(cliff['before'])} (below its start) until step {cliff['calm']}, then jumped to "
                     f"{_g(cliff['top'])} and went non-finite at step {cliff['nonfinite']}: a sudden gradient blow-up "
                     "(a cliff), not a slow divergence")
        first = cliff["calm"] + 1
    overflow = next((r for r in f.records if r.get("grad_nonfinite")
                     and isinstance(r.get("loss_before"), (int, float)) and math.isfinite(r["loss_before"])), None)
    if overflow is not None:
        parts.append(f"the gradient overflowed to NaN/Inf at step {overflow['step']} while the loss was finite")
        first = int(overflow["step"]) if first is None else first
    if not parts:
        return None
    severity = "error" if f.first_nonfinite or _not_training(f) else "warning"
    kind = "init" if first == (f.sampled[0]["step"] if f.sampled else None) else "cliff" if cliff else "growth"
    return Diagnosis("exploding_gradients", severity, _clip(0.55 + 0.15 * len(parts)), first, "; ".join(parts) + ".",
                     "clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) and use a smaller "
                     "initialisation or normalisation layers", kind="overflow" if overflow is not None else kind,
                     persistent=overflow is not None or cliff is not None)


RULES: tuple[Callable[[Facts], Diagnosis | None], ...] = (
    nonfinite, params_not_updating, missing_zero_grad, loss_wiring, unnormalized_inputs, dead_relu,
    saturated_activations, vanishing_gradients, exploding_gradients, lr_too_high, lr_too_low,
    labels_unlearnable, gradient_noise_dominates,
)

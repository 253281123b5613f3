"""The first layer's input is far from zero mean and unit scale [LC §4.3; K]."""

from __future__ import annotations

import math

from ..diagnosis import Diagnosis
from ..diagnosis import clip as _clip
from ..diagnosis import fmt as _g
from ..diagnosis import not_training as _not_training
from ..facts import Facts
from .base import Code


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
        isinstance(low, (int, float)) and low >= 300
    )
    if not (too_large or too_small or sliver or uneven):
        return None
    off = (
        math.log10(max(rms, feature_max / 10))
        if too_large
        else -math.log10(rms)
        if too_small
        else math.log10(max(offset or 1, ratio or 1, low or 1)) - 1
    )
    evidence = (
        f"the first layer ({first.get('input_layer', '?')}) receives inputs with RMS {_g(rms)} "
        f"(largest feature RMS {_g(feature_max)}, median feature std {_g(first.get('input_feature_std_median'))}); "
        "unit scale is ≈ 1"
    )
    if sliver and not (too_large or too_small):
        evidence += (
            f"; the median feature's mean is {_g(offset)}× its standard deviation: the values vary over a "
            "sliver of their range"
        )
    if uneven:
        evidence += (
            f"; the features' standard deviations differ by {_g(max(ratio or 1, low or 1))}× "
            f"(largest {_g(first.get('input_feature_std_max'))}, the median is {_g(low)}× the smallest)"
        )
    trouble = (
        _not_training(f)
        or f.first_nonfinite is not None
        or any((r.get("saturated_share") or 0) >= 0.5 or (r.get("dead_relu_share") or 0) >= 0.5 for r in f.records)
    )
    severity = "error" if trouble else "warning"
    return Diagnosis(
        "unnormalized_inputs",
        severity,
        _clip(0.55 + 0.15 * (off - 1) + (0.2 if trouble else 0)),
        # The first layer's input is the data: its scale is a property of the data set, there before any
        # step, whichever step's pooled rows measured it best (the record used here can be step 40). Dated
        # at step 0, it can explain what the first oversized steps did (dead ReLUs, exploding gradients,
        # an lr that is too high only for these inputs) instead of being dated after them.
        0,
        evidence + ".",
        "standardise the inputs with the training-set statistics: x = (x - mean) / std "
        "(images: divide by 255, then normalise per channel)",
    )


CODE = Code(
    name="unnormalized_inputs",
    rule=unnormalized_inputs,
    priority=40,
    causes=(
        "saturated_activations",
        "dead_relu",
        "exploding_gradients",
        "lr_too_high",
        "nonfinite",
        "loss_wiring:init",
        "vanishing_gradients",
        "gradient_noise_dominates",
        "labels_unlearnable",
    ),
    note_when_learning=True,
)

"""Rule branches added for public "my model isn't training" reports (cases c84-c90), on synthetic records.

Each test builds records whose quantity is known by construction (a cosine mean and its standard error, a
gradient norm identical at every step, a single class column) and checks the branch against that number,
then the same run just across the line.
"""

from __future__ import annotations

import math
import statistics

import pytest
from doctor_rules_test import UNIFORM_10, codes, passive, run

from stepaudit.doctor import diagnose
from stepaudit.doctor.facts import Facts

FOUR = {"0": 1, "1": 1, "2": 1, "3": 1}  # label entropy ln 4


def _plateau(**extra):
    """Steps of 20% of the weights early on a loss that only goes 1.38 → 1.0 (the bounce branch's setting)."""
    return dict(loss=lambda t: 1.0 + 0.38 * math.exp(-t / 10), ratio=0.2, **extra)


def test_bounce_needs_cosines_told_from_zero_or_a_growing_norm():
    # cosines alternating +0.30 / -0.35: mean -0.025, s.e. ≈ 0.0326 (n = 100), so the mean is within two
    # standard errors of 0 (nearly orthogonal gradients, not overshoot); the weights' norm stays at 10
    scattered = lambda t: -0.35 if t % 2 else 0.30  # noqa: E731
    f = Facts(run(**_plateau(grad_cos_prev=scattered)), {})
    m, se, n = f.grad_cos_stats
    values = [scattered(t) for t in range(100)]
    assert n == 100 and m == pytest.approx(statistics.mean(values)) == pytest.approx(-0.025)
    assert se == pytest.approx(statistics.stdev(values) / 10) and -2 * se < m < 0 and not f.oscillating
    found = diagnose(run(**_plateau(grad_cos_prev=scattered)), meta=passive(label_counts=FOUR))
    assert "lr_too_high" not in codes(found), codes(found)
    # the same mean with half the scatter's spread replaced by a steady -0.3: clearly negative → overshoot
    found = diagnose(run(**_plateau(grad_cos_prev=-0.3)), meta=passive(label_counts=FOUR))
    assert codes(found)[0] == "lr_too_high" and "pointed apart" in found[0]["evidence"]
    # the scattered cosines with the weights' norm growing 30× (independent sign the steps set the scale)
    grown = _plateau(grad_cos_prev=scattered, weight_norm=lambda t: 10.0 * (1 + 0.3 * t))
    found = diagnose(run(**grown), meta=passive(label_counts=FOUR))
    assert codes(found)[0] == "lr_too_high" and "grew" in found[0]["evidence"]


def test_fresh_leaves_on_a_run_that_learns_are_a_note_not_an_error():
    leaf = {
        "name": "a tensor of shape [1] created during the forward pass (requires_grad, registered nowhere)",
        "numel": 1,
        "registered": False,
    }
    meta = passive(steps=100, trainable_numel=1000, orphan_params=[leaf], label_counts=UNIFORM_10)
    found = diagnose(run(), meta=meta)  # the loss falls 2.35 → 0.05
    assert codes(found)[0] == "healthy"
    note = found[codes(found).index("params_not_updating")]
    assert note["severity"] == "info" and "created anew at every step" in note["evidence"]
    # the same leaf on a run that does not learn: still an error (c36's weights drawn anew in forward)
    found = diagnose(run(loss=lambda t: 2.3 - 1e-4 * t), meta=meta)
    assert codes(found)[0] == "params_not_updating" and found[0]["severity"] == "error"
    # a registered parameter outside the optimizer stays an error even when the rest learns
    held_out = {"name": "head.weight", "numel": 1, "registered": True}
    found = diagnose(run(), meta={**meta, "observations": {**meta["observations"], "orphan_params": [held_out]}})
    assert codes(found)[0] == "params_not_updating" and found[0]["severity"] == "error"


def test_a_zero_gradient_names_a_loss_cut_from_the_weights():
    found = diagnose(run(loss=lambda t: 0.3, ratio=0.0, grad=0.0, first_order=0.0))
    assert codes(found)[0] == "params_not_updating"
    assert ".item()" in found[0]["evidence"] and ".item()" in found[0]["fix"]


def test_cross_entropy_over_one_class_column_is_loss_wiring():
    # log_softmax over an axis of size 1 is identically 0: the loss and its gradient are 0 at every step
    assert math.log(math.exp(3.7) / math.exp(3.7)) == 0.0
    init = {"loss": "cross_entropy", "value": 0.0, "classes": 1, "step": 0}
    flat = run(loss=lambda t: 0.0, ratio=0.0, grad=0.0, first_order=0.0, jitter=False)
    found = diagnose(flat, meta=passive(initial_loss=init))
    assert codes(found)[0] == "loss_wiring" and "single class column" in found[0]["evidence"]
    assert "BCEWithLogitsLoss" in found[0]["fix"] and "params_not_updating" not in codes(found)
    # two class columns: an ordinary cross-entropy, not this finding
    two = {**init, "value": math.log(2), "classes": 2}
    found = diagnose(run(), meta=passive(initial_loss=two, label_counts={"0": 1, "1": 1}))
    assert codes(found) == ["healthy"]


def test_a_summed_loss_is_named_in_the_overshoot_and_the_explosion():
    rising = dict(loss=lambda t: 2.3 * (1.05**t), ratio=0.3, grad=lambda t: 1.3**t)
    for summed in ([], ["mse_loss"]):
        found = diagnose(run(**rising), meta=passive(summed_losses=summed))
        named = [d for d in found if d["code"] in ("lr_too_high", "exploding_gradients")]
        assert named, codes(found)
        for d in named:
            assert ("summed, not averaged" in d["evidence"]) == bool(summed), d
        # the root cause's fix says it (a consequence's fix defers to its cause)
        assert ("'mean'" in named[0]["fix"]) == bool(summed), named[0]


def test_a_gradient_clipped_to_one_norm_at_every_step_is_named_by_lr_too_low():
    flat = dict(loss=lambda t: 1.386 - 1e-6 * t, ratio=2e-5, first_order=-1e-6)
    # 0.005 at every step: the same value to 0.1% at 100 of 100 steps
    found = diagnose(run(grad=0.005, **flat), meta=passive(label_counts=FOUR))
    assert codes(found)[0] == "lr_too_low"
    assert "same norm 0.005 at 100 of 100" in found[0]["evidence"] and "max_norm = 0.005" in found[0]["fix"]
    # mini-batch norms varying by ±20% around the same value: not a clipped gradient
    varying = lambda t: 0.005 * (1 + 0.2 * math.sin(t))  # noqa: E731
    assert sum(abs(varying(t) - varying(0)) <= 1e-3 * varying(0) for t in range(100)) < 80
    found = diagnose(run(grad=varying, **flat), meta=passive(label_counts=FOUR))
    assert codes(found)[0] == "lr_too_low" and "clipping" not in found[0]["fix"]

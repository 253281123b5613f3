"""Doctor rules on synthetic records: each record set is built to show one fault, with the numbers known."""

from __future__ import annotations

import math

import pytest

from stepaudit.doctor import CODES, diagnose
from stepaudit.doctor.facts import Facts, entropy, rolling_median

KEYS = {"code", "severity", "confidence", "first_step", "evidence", "fix"}
UNIFORM_10 = {str(c): 100 for c in range(10)}  # label entropy ln 10


def run(
    n=100,
    loss=lambda t: 2.3 * math.exp(-t / 30) + 0.05,
    ratio=1e-3,
    first_order=-0.02,
    grad=1.0,
    weight=10.0,
    layers=None,
    jitter=True,
    **extra,
):
    """A passive-looking run: every step has a loss; every step has norms (ratio = ‖Δw‖/‖w‖).

    ``jitter`` adds ±0.01% batch-to-batch variation, as every mini-batch loss has: a loss identical at
    every step is itself a finding (the objective does not depend on the model), tested separately.
    """
    records = []
    for t in range(n):
        value = loss(t)
        if jitter and math.isfinite(value):
            value *= 1 + 1e-4 * (((t * 7919) % 13) - 6) / 6
        r = {
            "step": t,
            "lr": 0.1,
            "loss_before": value,
            "grad_norm": grad(t) if callable(grad) else grad,
            "weight_norm": weight,
            "update_norm": ratio * weight,
            "update_ratio": ratio,
            "first_order": first_order(t) if callable(first_order) else first_order,
        }
        if layers:
            r["layers"] = layers(t)
        for key, value in extra.items():
            r[key] = value(t) if callable(value) else value
        records.append(r)
    return records


def passive(**obs):
    return {"observations": {"mode": "passive", **obs}}


def codes(found):
    return [d["code"] for d in found]


def check_contract(found):
    assert found, "diagnose returns at least one diagnosis"
    for d in found:
        assert set(d) == KEYS
        assert d["code"] in CODES
        assert d["severity"] in ("error", "warning", "info")
        assert 0.0 <= d["confidence"] <= 1.0
        assert isinstance(d["evidence"], str) and d["evidence"] and isinstance(d["fix"], str) and d["fix"]


def test_healthy_run_is_reported_alone():
    found = diagnose(run(), meta=passive(label_counts=UNIFORM_10, steps=100))
    check_contract(found)
    assert codes(found) == ["healthy"]
    assert found[0]["first_step"] is None


def test_nonfinite_names_the_first_bad_step():
    found = diagnose(run(loss=lambda t: math.nan if t >= 37 else 2.3 - 0.01 * t))
    check_contract(found)
    assert codes(found)[0] == "nonfinite"
    assert found[0]["first_step"] == 37
    assert "suddenly" in found[0]["evidence"]  # no growth before: data / log(0), not the lr


def test_rising_loss_with_large_steps_is_lr_too_high_and_its_nan_a_symptom():
    loss = lambda t: 2.3 * 1.1**t if t < 40 else math.inf  # noqa: E731
    found = diagnose(run(loss=loss, ratio=0.3, grad=lambda t: 1.1**t, batch_size=64))
    check_contract(found)
    assert codes(found)[0] == "lr_too_high"
    # batches of 64: the start is the loss at init, 2.3; the loss first exceeds 1.5 × 2.3 where 1.1^t > 1.5: t = 5
    assert found[0]["first_step"] == 5
    assert "nonfinite" in codes(found)
    nan = found[codes(found).index("nonfinite")]
    assert nan["evidence"].startswith("(likely a consequence of lr_too_high)")
    assert nan["first_step"] == 40


def test_one_bad_batch_is_not_a_rising_loss():
    loss = lambda t: 20.0 if t == 50 else 2.3 * math.exp(-t / 30) + 0.05  # noqa: E731
    assert codes(diagnose(run(loss=loss), meta=passive(label_counts=UNIFORM_10))) == ["healthy"]


def test_tiny_steps_and_a_flat_loss_are_lr_too_low():
    found = diagnose(run(loss=lambda t: 2.30 - 1e-5 * t, ratio=1e-6, first_order=-1e-5))
    check_contract(found)
    assert codes(found)[0] == "lr_too_low"
    assert "1e-06" in found[0]["evidence"]


def test_zero_update_is_params_not_updating_not_lr_too_low():
    found = diagnose(run(loss=lambda t: 2.3, ratio=0.0, grad=0.0, first_order=0.0))
    assert codes(found)[0] == "params_not_updating"
    assert "exactly 0" in found[0]["evidence"]


def test_backward_without_step_and_zero_lr():
    found = diagnose([], meta=passive(steps=0, backward_passes=12))
    assert codes(found) == ["params_not_updating"] and "12 backward passes" in found[0]["evidence"]
    meta = passive(steps=100, optimizers=[{"param_groups": [{"lr": 0.0}], "numel": 10}])
    found = diagnose(run(loss=lambda t: 2.3, ratio=0.0, first_order=0.0), meta=meta)
    assert codes(found)[0] == "params_not_updating" and "lr is 0" in found[0]["evidence"].replace("learning rate", "lr")


def test_orphan_parameters():
    meta = passive(steps=100, trainable_numel=1000, orphan_params=[{"name": "fc.weight", "numel": 600}])
    found = diagnose(run(), meta=meta)
    assert codes(found)[0] == "params_not_updating"
    assert "fc.weight" in found[0]["evidence"] and "60%" in found[0]["evidence"]


def test_missing_zero_grad_from_zero_checks_and_accumulation_is_fine():
    kept = [{"step": s, "next": s + 1, "optimizer": 0, "kept": 1.0} for s in range(0, 100, 10)]
    found = diagnose(run(), meta=passive(zero_checks=kept, label_counts=UNIFORM_10))
    assert codes(found)[0] == "missing_zero_grad" and found[0]["first_step"] == 1
    cleared = [{**c, "kept": 0.0} for c in kept]
    assert codes(diagnose(run(), meta=passive(zero_checks=cleared, label_counts=UNIFORM_10))) == ["healthy"]


@pytest.mark.parametrize(
    "finding, severity",
    [
        ({"kind": "probabilities_into_cross_entropy", "row_sum": 1.0, "classes": 10}, "error"),
        ({"kind": "scores_into_nll_loss", "logsumexp": 3.2, "max": 5.0, "probabilities": False}, "error"),
        ({"kind": "broadcast_shapes", "input_shape": [64, 1], "target_shape": [64]}, "error"),
        ({"kind": "log_probabilities_into_cross_entropy", "logsumexp": 0.0}, "info"),
    ],
)
def test_loss_wiring_findings(finding, severity):
    found = diagnose(run(), meta=passive(loss_findings=[{**finding, "step": 0, "loss": "x"}], label_counts=UNIFORM_10))
    check_contract(found)
    if severity == "info":  # a harmless note does not displace "healthy"; it follows it
        assert codes(found) == ["healthy", "loss_wiring"] and found[1]["severity"] == "info"
    else:
        assert codes(found)[0] == "loss_wiring" and found[0]["severity"] == severity


def test_loss_at_init_far_from_ln_c():
    init = {"loss": "cross_entropy", "value": 5 * math.log(10), "classes": 10, "step": 0}
    stuck = run(loss=lambda t: 5 * math.log(10) - 0.001 * t)
    found = diagnose(stuck, meta=passive(initial_loss=init, label_counts=UNIFORM_10))
    assert codes(found)[0] == "loss_wiring" and "5× ln 10" in found[0]["evidence"]
    assert found[0]["severity"] == "warning"
    # the same start in a run whose loss then falls by 98% is a note after "healthy"
    found = diagnose(run(), meta=passive(initial_loss=init, label_counts=UNIFORM_10))
    assert codes(found) == ["healthy", "loss_wiring"] and found[1]["severity"] == "info"
    init["value"] = 1.6 * math.log(10)  # logits of spread ≈ 1.6 at init: unremarkable
    assert codes(diagnose(run(), meta=passive(initial_loss=init, label_counts=UNIFORM_10))) == ["healthy"]


def test_unnormalized_inputs():
    found = diagnose(
        run(loss=lambda t: 2.3 - 1e-3 * t, input_rms=120.0, input_feature_rms_max=250.0, input_layer="Linear")
    )
    assert codes(found)[0] == "unnormalized_inputs" and "120" in found[0]["evidence"]
    # the same inputs on a run whose loss fell by 98%: named, as a note after healthy
    found = diagnose(run(input_rms=120.0, input_feature_rms_max=250.0, input_layer="Linear"))
    assert codes(found) == ["healthy", "unnormalized_inputs"] and found[1]["severity"] == "info"
    assert codes(diagnose(run(input_rms=0.9, input_feature_rms_max=1.3), meta=passive(label_counts=UNIFORM_10))) == [
        "healthy"
    ]


def test_dead_relu_and_saturation_when_training_stalls():
    flat = lambda t: 2.3  # noqa: E731
    found = diagnose(run(loss=flat, dead_relu_share=0.8, dead_relu_max=0.95))
    assert codes(found)[0] == "dead_relu" and "80%" in found[0]["evidence"]
    found = diagnose(run(loss=flat, saturated_share=0.7))
    assert codes(found)[0] == "saturated_activations"
    # a run whose loss fell by 98% is not stopped by 60% saturated units
    assert codes(diagnose(run(saturated_share=0.6), meta=passive(label_counts=UNIFORM_10))) == ["healthy"]


def layer_rows(first_ratio, last_ratio):
    """Two weight layers with ‖g‖/‖w‖ as given (‖w‖ = 1)."""
    return lambda t: [
        {
            "kind": "module",
            "name": "0",
            "grad_norm": first_ratio,
            "weight_norm": 1.0,
            "update_norm": 0,
            "update_ratio": 0,
        },
        {
            "kind": "module",
            "name": "4",
            "grad_norm": last_ratio,
            "weight_norm": 1.0,
            "update_norm": 0,
            "update_ratio": 0,
        },
        {"kind": "group", "name": "0", "grad_norm": 1.0, "weight_norm": 1.0, "update_norm": 0, "update_ratio": 0},
    ]


def test_vanishing_gradients_from_layer_ratio():
    found = diagnose(run(loss=lambda t: 2.3, layers=layer_rows(1e-6, 0.1)))
    assert codes(found)[0] == "vanishing_gradients"
    assert "1e-05×" in found[0]["evidence"]  # (1e-6/1) / (0.1/1)
    assert codes(diagnose(run(layers=layer_rows(0.05, 0.1)), meta=passive(label_counts=UNIFORM_10))) == ["healthy"]


def test_exploding_gradients_from_growth():
    found = diagnose(run(loss=lambda t: 2.3, grad=lambda t: 1.2**t, ratio=1e-3))
    assert "exploding_gradients" in codes(found)[:2]
    d = found[codes(found).index("exploding_gradients")]
    assert d["first_step"] == math.ceil(math.log(100) / math.log(1.2))  # first step where 1.2^t ≥ 100


def test_labels_unlearnable_and_noise():
    # loss stays at ln 10 while each step promises −0.05 on its own batch: 100 steps × 0.05 = 5 nats promised.
    found = diagnose(
        run(loss=lambda t: math.log(10) + 0.01 * math.sin(t), first_order=-0.05, ratio=3e-3),
        meta=passive(label_counts=UNIFORM_10, steps=100),
    )
    assert codes(found)[0] == "labels_unlearnable"
    # learnable (loss well below ln 10) but consecutive gradients orthogonal and little progress: noise
    found = diagnose(
        run(loss=lambda t: 1.5 + 0.3 * math.sin(t) - 0.002 * t, grad_cos_prev=0.01, ratio=3e-3),
        meta=passive(label_counts=UNIFORM_10, batch_size=2, steps=100),
    )
    assert codes(found)[0] == "gradient_noise_dominates" and "batch size 2" in found[0]["evidence"]


# -- active-mode records ------------------------------------------------------------------------------------------
def test_active_own_batch_overshoot_is_lr_too_high():
    records = run(loss=lambda t: 2.3, ratio=0.05, delta=lambda t: 0.2 if t % 2 else -0.1, alpha=lambda t: 1.6)
    assert codes(diagnose(records))[0] == "lr_too_high"


def test_active_alpha_near_minus_one_is_lr_too_low():
    records = run(
        loss=lambda t: 2.3 - 1e-4 * t, ratio=5e-4, first_order=-1e-4, delta=-1e-4, alpha=-0.98, best_scale=40.0
    )
    found = diagnose(records)
    assert codes(found)[0] == "lr_too_low" and "40×" in found[0]["evidence"]


def test_active_next_delta_that_does_not_transfer_is_labels_unlearnable():
    records = run(loss=lambda t: 2.3, first_order=-0.05, delta=-0.04, next_delta=lambda t: 0.001 * (-1) ** t)
    found = diagnose(records)
    assert codes(found)[0] == "labels_unlearnable" and "carried over" in found[0]["evidence"]


def test_active_noise_scale_against_batch():
    records = run(loss=lambda t: 2.0 + 0.2 * math.sin(t), noise_scale=2000.0, batch_size=32)
    found = diagnose(records)
    assert codes(found)[0] == "gradient_noise_dominates" and "62×" in found[0]["evidence"]


# -- ordering and facts ---------------------------------------------------------------------------------------------
def test_structural_cause_comes_before_its_symptoms():
    kept = [{"step": s, "next": s + 1, "optimizer": 0, "kept": 1.0} for s in range(0, 60, 10)]
    found = diagnose(
        run(loss=lambda t: 2.3 * 1.05**t, ratio=0.05, grad=lambda t: 1.1**t), meta=passive(zero_checks=kept)
    )
    assert codes(found)[0] == "missing_zero_grad"
    for d in found[1:]:
        assert "consequence of missing_zero_grad" in d["evidence"]
        assert d["confidence"] <= found[0]["confidence"]


def test_entropy_and_rolling_median_match_closed_forms():
    assert entropy({"a": 5, "b": 5}) == pytest.approx(math.log(2))
    assert entropy({"a": 1, "b": 1, "c": 2}) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert rolling_median([1, 9, 2, 8, 3], 3) == [2, 8, 3]
    f = Facts(run(n=50, loss=lambda t: 3.0 if t < 10 else 1.0, jitter=False), {})
    assert f.loss_start == 3.0 and f.loss_end == 1.0 and f.progress == pytest.approx(2 / 3)


def test_records_from_a_run_folder_match_records_in_memory(tmp_path):
    from stepaudit.store import RunStore

    records = run(n=40, loss=lambda t: 2.3 * 1.1**t, ratio=0.3, layers=layer_rows(0.1, 0.2))
    store = RunStore(tmp_path, {"optimizer": "SGD"})
    for r in records:
        store.append(r)
    store.close()
    assert diagnose(tmp_path) == diagnose(records)


def test_bad_argument_names_the_fix():
    with pytest.raises(TypeError, match="run folder or a list of step records"):
        diagnose(42)


def test_a_spike_the_run_recovers_from_is_not_lr_too_high():
    """Catapult phase (Lewkowycz et al. 2020): the loss jumps early, then falls well below its start."""
    loss = lambda t: 2.3 * (3.0 if 1 <= t <= 8 else 1.0) * math.exp(-t / 40) + 0.05  # noqa: E731
    records = run(loss=loss, ratio=0.05, batch_size=64)
    assert codes(diagnose(records, meta=passive(label_counts=UNIFORM_10))) == ["healthy"]
    stays = lambda t: 2.3 * (3.0 if t >= 1 else 1.0)  # noqa: E731
    assert codes(diagnose(run(loss=stays, ratio=0.05, batch_size=64)))[0] == "lr_too_high"


def test_activation_faults_at_initialisation_count_even_if_the_loss_falls():
    def share(at_init, late):
        return lambda t: at_init if t == 0 else late

    # majority of one tanh layer saturated at step 0 (pre-activation spread ≳ 4), and still at the end: a
    # mis-scaled init that costs accuracy even while the loss falls by 98% (persistent, not demoted) ...
    found = diagnose(
        run(saturated_share=share(0.55, 0.55), saturated_max=share(0.6, 0.6)), meta=passive(label_counts=UNIFORM_10)
    )
    assert codes(found) == ["saturated_activations"] and found[0]["first_step"] == 0
    # ... saturated at initialisation but not by the end of a run that learns well: a note ...
    found = diagnose(
        run(saturated_share=share(0.55, 0.3), saturated_max=share(0.6, 0.6)), meta=passive(label_counts=UNIFORM_10)
    )
    assert codes(found) == ["healthy", "saturated_activations"] and found[1]["severity"] == "info"
    assert "not what stops training" in found[1]["evidence"]
    # ... and the error when the loss stalls
    found = diagnose(
        run(loss=lambda t: 2.3 - 1e-3 * t, saturated_share=share(0.55, 0.55), saturated_max=share(0.6, 0.6)),
        meta=passive(label_counts=UNIFORM_10),
    )
    assert codes(found)[0] == "saturated_activations" and found[0]["severity"] == "error"
    # the same saturation learnt along the way, while the loss fell by 98%: not the problem
    found = diagnose(
        run(saturated_share=share(0.01, 0.55), saturated_max=share(0.02, 0.6)), meta=passive(label_counts=UNIFORM_10)
    )
    assert codes(found) == ["healthy"]
    found = diagnose(
        run(dead_relu_share=share(0.7, 0.7), dead_relu_max=share(0.8, 0.8)), meta=passive(label_counts=UNIFORM_10)
    )
    assert codes(found) == ["healthy", "dead_relu"] and "from initialisation" in found[1]["evidence"]


def test_negative_gradient_cosines_are_overshoot_not_noise():
    loss = lambda t: 1.5 + 0.3 * math.sin(t) - 0.002 * t  # noqa: E731
    meta = passive(label_counts=UNIFORM_10, batch_size=2, steps=100)
    assert "gradient_noise_dominates" not in codes(diagnose(run(loss=loss, grad_cos_prev=-0.6, ratio=3e-3), meta=meta))
    # a healthy signal: consecutive gradients agree (cos 0.5) although the loss moves little
    assert "gradient_noise_dominates" not in codes(diagnose(run(loss=loss, grad_cos_prev=0.5, ratio=3e-3), meta=meta))


def test_significantly_negative_cosines_mean_oscillation():
    alternating = lambda t: -0.5 if t % 2 else -0.1  # noqa: E731
    f = Facts(run(grad_cos_prev=alternating), {})
    m, se, n = f.grad_cos_stats
    assert n == 100 and m == pytest.approx(-0.3) and se == pytest.approx(0.2 * math.sqrt(100 / 99) / 10)
    assert f.oscillating
    assert not Facts(run(grad_cos_prev=lambda t: 0.4 if t % 2 else -0.4), {}).oscillating  # mean 0: scatter


def test_lr_too_high_when_large_steps_bounce_at_a_plateau():
    # Adam at 100× its lr: steps of 20% of the weights, consecutive gradients apart, the norm growing 30×,
    # and a loss that only goes from 1.38 to about 1.0 without ever rising above its start or going NaN
    bouncing = dict(
        loss=lambda t: 1.0 + 0.38 * math.exp(-t / 10),
        ratio=0.2,
        grad_cos_prev=lambda t: -0.05 + 0.02 * ((t % 3) - 1),
        weight_norm=lambda t: 10.0 * (1 + 0.3 * t),
    )
    found = diagnose(run(**bouncing), meta=passive(label_counts={"0": 1, "1": 1, "2": 1, "3": 1}))
    assert codes(found)[0] == "lr_too_high", codes(found)
    assert found[0]["first_step"] == 0 and "bounces" in found[0]["evidence"] and "lr" in found[0]["fix"]
    # the same large steps on a run whose loss falls to 5% of its start: Adam with BatchNorm at a high lr
    # that learns is not flagged by this branch
    learning = {**bouncing, "loss": lambda t: 0.05 + 1.33 * math.exp(-t / 10)}
    assert "lr_too_high" not in codes(diagnose(run(**learning), meta=passive()))
    # modest steps (cs231n's 1e-3) and positive cosines on the same plateau: not this branch
    modest = {**bouncing, "ratio": 1e-3, "grad_cos_prev": 0.3, "weight_norm": 10.0}
    assert "lr_too_high" not in codes(diagnose(run(**modest), meta=passive()))


def _decay_meta(decay: float, lr: float = 1e-3, optimizer: str = "AdamW") -> dict:
    group = {"lr": lr, "weight_decay": decay, "n_params": 1000}
    return passive(
        label_counts=UNIFORM_10, optimizers=[{"optimizer": optimizer, "param_groups": [group], "max_lr": [lr]}]
    )


def test_weight_decay_too_high():
    # AdamW weight_decay 30 at lr 1e-3: 3% of every weight per step; the norm falls 6.8 → 1.9, the loss
    # stays at 90% of ln 10
    shrinking = dict(
        loss=lambda t: 2.07 + 0.23 * math.exp(-t / 10), ratio=0.02, weight_norm=lambda t: 1.9 + 4.9 * math.exp(-t / 20)
    )
    found = diagnose(run(**shrinking), meta=_decay_meta(30.0))
    assert codes(found)[0] == "weight_decay_too_high", codes(found)
    assert found[0]["severity"] == "error" and "weight_decay = 30" in found[0]["evidence"]
    assert "0.03" in found[0]["evidence"] and "30" in found[0]["fix"]
    # the usual AdamW decay (1e-2: 1e-5 per step) on the same curve: not a decay finding
    assert "weight_decay_too_high" not in codes(diagnose(run(**shrinking), meta=_decay_meta(1e-2)))
    # a strong decay whose weights did not shrink (the loss defends them): not this finding
    held = {**shrinking, "weight_norm": 6.8}
    assert "weight_decay_too_high" not in codes(diagnose(run(**held), meta=_decay_meta(30.0)))
    # a strong decay on a run that learns (loss 2.3 → 0.05): not this finding
    learning = {**shrinking, "loss": lambda t: 2.3 * math.exp(-t / 30) + 0.05}
    assert "weight_decay_too_high" not in codes(diagnose(run(**learning), meta=_decay_meta(30.0)))


def test_input_scale_is_dated_before_the_first_step_and_explains_the_steps_it_made_too_large():
    # raw 0-255 pixels (input RMS 124, best measured at step 40): steps of the weights' size kill the
    # ReLUs by step 2 and the loss sits at ln 10; the input scale is the root, lr_too_high its consequence
    found = diagnose(
        run(
            loss=lambda t: 2.3,
            ratio=1.0,
            input_rms=lambda t: 124.0 if t == 40 else None,
            input_feature_rms_max=lambda t: 205.0 if t == 40 else None,
            input_rows=lambda t: 640 if t == 40 else None,
            input_layer="Linear",
            dead_relu_share=lambda t: 0.1 if t < 2 else 0.9,
        ),
        meta=passive(label_counts=UNIFORM_10),
    )
    assert codes(found)[0] == "unnormalized_inputs" and found[0]["first_step"] == 0, codes(found)
    high = [d for d in found if d["code"] == "lr_too_high"]
    assert high and "consequence of unnormalized_inputs" in high[0]["evidence"]


def test_weight_decay_of_an_empty_group_is_not_rated():
    # a large decay on a group without parameters decays nothing; the group that holds them has none
    empty = {"lr": 1e-3, "weight_decay": 30.0, "n_params": 0}
    held = {"lr": 1e-3, "weight_decay": 0.0, "n_params": 1000}
    meta = passive(
        label_counts=UNIFORM_10,
        optimizers=[{"optimizer": "AdamW", "param_groups": [empty, held], "max_lr": [1e-3, 1e-3]}],
    )
    shrinking = dict(
        loss=lambda t: 2.07 + 0.23 * math.exp(-t / 10), ratio=0.02, weight_norm=lambda t: 1.9 + 4.9 * math.exp(-t / 20)
    )
    assert "weight_decay_too_high" not in codes(diagnose(run(**shrinking), meta=meta))


def test_bouncing_needs_gradients_pointing_apart_not_only_a_growing_norm():
    # logistic regression from a small init (N(0, 0.01)): early steps of 0.8 of the weights, the norm growing 30×,
    # the loss 0.70 → 0.55 at its noise floor, consecutive gradients still agreeing (cosine +0.13): healthy
    healthy = dict(
        loss=lambda t: 0.55 + 0.15 * math.exp(-t / 15),
        ratio=0.03,
        update_ratio=lambda t: 0.8 if t < 5 else 0.03,
        grad_cos_prev=0.13,
        weight_norm=lambda t: 0.042 + 1.25 * (1 - math.exp(-t / 20)),
    )
    meta = passive(label_counts={"0": 1, "1": 1})
    assert "lr_too_high" not in codes(diagnose(run(**healthy), meta=meta))
    # the same run with consecutive gradients pointing apart is the bounce
    assert "lr_too_high" in codes(diagnose(run(**{**healthy, "grad_cos_prev": -0.1}), meta=meta))

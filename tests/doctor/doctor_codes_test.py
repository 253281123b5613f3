"""The diagnosis codes as objects (stepaudit.doctor.codes): one module per code, the tables derived from them."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from stepaudit.doctor import CAUSES, CODES, RULES, codes
from stepaudit.doctor.codes import ALL, NOTES_WHEN_LEARNING, PRIORITY, QUIET_AFTER_DIVERGENCE
from stepaudit.doctor.codes.base import Code, validate
from stepaudit.doctor.diagnosis import Diagnosis

# The hand-written tables as they were before the codes became objects (doctor/__init__.py, rules.py, story.py):
# the derived ones must equal them, so the refactor changes no diagnosis and no ordering.
BEFORE_CODES = (
    "healthy",
    "lr_too_high",
    "lr_too_low",
    "vanishing_gradients",
    "exploding_gradients",
    "dead_relu",
    "saturated_activations",
    "unnormalized_inputs",
    "loss_wiring",
    "missing_zero_grad",
    "params_not_updating",
    "labels_unlearnable",
    "gradient_noise_dominates",
    "nonfinite",
    "weight_decay_too_high",  # added after the refactor, with its own cases (c79, c81)
    "data_not_shuffled",  # added after the refactor, with its own cases (c82, c83)
    "rnn_batch_time_swapped",  # added after the refactor, with its own cases (c91-c93)
)
BEFORE_CAUSES = {
    "params_not_updating": ("lr_too_low", "labels_unlearnable", "gradient_noise_dominates", "vanishing_gradients"),
    "missing_zero_grad": (
        "exploding_gradients",
        "lr_too_high",
        "nonfinite",
        "dead_relu",
        "gradient_noise_dominates",
        "labels_unlearnable",
        "saturated_activations",
    ),
    "loss_wiring": (
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "saturated_activations",
        "nonfinite",
        "exploding_gradients",
        "lr_too_high",
    ),
    "unnormalized_inputs": (
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
    "exploding_gradients": (
        "nonfinite",
        "lr_too_high",
        "loss_wiring:init",
        "dead_relu",
        "saturated_activations",
        "labels_unlearnable",
    ),
    "lr_too_high": (
        "nonfinite",
        "exploding_gradients",
        "dead_relu",
        "saturated_activations",
        "gradient_noise_dominates",
        "labels_unlearnable",
        "vanishing_gradients",
    ),
    "dead_relu": (
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "params_not_updating:no_grad",
    ),
    "saturated_activations": (
        "vanishing_gradients",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "params_not_updating:no_grad",
    ),
    "vanishing_gradients": (
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "params_not_updating:no_grad",
    ),
    "weight_decay_too_high": (
        "labels_unlearnable",
        "gradient_noise_dominates",
        "vanishing_gradients",
        "lr_too_low",
        "dead_relu",
    ),
    "data_not_shuffled": (
        "lr_too_high",
        "exploding_gradients",
        "gradient_noise_dominates",
        "labels_unlearnable",
        "nonfinite",
    ),
    "rnn_batch_time_swapped": (
        "lr_too_high",
        "lr_too_low",
        "labels_unlearnable",
        "gradient_noise_dominates",
        "vanishing_gradients",
        "exploding_gradients",
        "saturated_activations",
        "dead_relu",
    ),
    "lr_too_low": ("labels_unlearnable",),
    "labels_unlearnable": ("gradient_noise_dominates",),
}
BEFORE_PRIORITY = (
    "params_not_updating",
    "missing_zero_grad",
    "loss_wiring",
    "rnn_batch_time_swapped",
    "unnormalized_inputs",
    "data_not_shuffled",
    "lr_too_high",
    "weight_decay_too_high",
    "exploding_gradients",
    "dead_relu",
    "saturated_activations",
    "vanishing_gradients",
    "lr_too_low",
    "labels_unlearnable",
    "gradient_noise_dominates",
    "nonfinite",
)
BEFORE_RULES = (
    "nonfinite",
    "params_not_updating",
    "missing_zero_grad",
    "loss_wiring",
    "rnn_batch_time_swapped",
    "unnormalized_inputs",
    "data_not_shuffled",
    "dead_relu",
    "saturated_activations",
    "vanishing_gradients",
    "exploding_gradients",
    "lr_too_high",
    "weight_decay_too_high",
    "lr_too_low",
    "labels_unlearnable",
    "gradient_noise_dominates",
)
BEFORE_QUIET_AFTER_DIVERGENCE = {
    "lr_too_low",
    "labels_unlearnable",
    "gradient_noise_dominates",
    "vanishing_gradients",
    "weight_decay_too_high",
}
BEFORE_NOTES_WHEN_LEARNING = {
    "exploding_gradients",
    "vanishing_gradients",
    "gradient_noise_dominates",
    "dead_relu",
    "saturated_activations",
    "unnormalized_inputs",
}

CODES_DIR = pathlib.Path(codes.__file__).parent
MODULES = sorted(p.stem for p in CODES_DIR.glob("*.py") if p.stem not in {"__init__", "base"})


def test_derived_tables_equal_the_hand_written_ones():
    # The code list is the same set, healthy first; its order now follows the rules' (it is only a listing).
    assert CODES[0] == "healthy" and sorted(CODES) == sorted(BEFORE_CODES) and len(set(CODES)) == len(CODES)
    assert CAUSES == BEFORE_CAUSES
    assert PRIORITY == BEFORE_PRIORITY
    assert tuple(rule.__name__ for rule in RULES) == BEFORE_RULES  # the rules' order breaks ties between findings
    assert set(QUIET_AFTER_DIVERGENCE) == BEFORE_QUIET_AFTER_DIVERGENCE
    assert set(NOTES_WHEN_LEARNING) == BEFORE_NOTES_WHEN_LEARNING


def test_the_story_and_the_ordering_use_the_derived_tables():
    from stepaudit.doctor import story

    assert story.QUIET_AFTER_DIVERGENCE is QUIET_AFTER_DIVERGENCE
    assert story.NOTES_WHEN_LEARNING is NOTES_WHEN_LEARNING


def test_every_code_module_is_collected_once():
    assert sorted(code.name for code in ALL) == MODULES


@pytest.mark.parametrize("name", MODULES)
def test_a_code_module_declares_its_code(name):
    module = importlib.import_module(f"stepaudit.doctor.codes.{name}")
    code = module.CODE
    assert isinstance(code, Code)
    assert code.name == name  # the module's file name is the code
    assert callable(code.rule) and code.rule.__name__ == name
    assert code.rule.__doc__
    assert isinstance(code.priority, int)


def _rule(f) -> Diagnosis | None:
    return None


def test_a_new_code_is_validated():
    extra = Code(name="toy_code", rule=_rule, priority=999, causes=("nonfinite", "loss_wiring:init"))
    validate(ALL + (extra,))  # a new code that names known codes passes
    with pytest.raises(ValueError, match="not a code"):
        validate(ALL + (Code(name="toy_code", rule=_rule, priority=999, causes=("no_such_code",)),))
    with pytest.raises(ValueError, match="not a code"):
        validate(ALL + (Code(name="toy_code", rule=_rule, priority=999, causes=("no_such_code:init",)),))
    with pytest.raises(ValueError, match="priority"):
        validate(ALL + (Code(name="toy_code", rule=_rule, priority=ALL[0].priority),))
    with pytest.raises(ValueError, match="twice"):
        validate(ALL + (Code(name=ALL[0].name, rule=_rule, priority=999),))
    with pytest.raises(ValueError, match="reserved"):
        validate(ALL + (Code(name="healthy", rule=_rule, priority=999),))
    with pytest.raises(ValueError, match="itself"):
        validate(ALL + (Code(name="toy_code", rule=_rule, priority=999, causes=("toy_code",)),))

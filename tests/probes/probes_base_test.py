"""The Probe contract (probes/base.py): declared fields checked at the boundary, typed options, state, amendments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import classification_loss, make_mlp

import stepaudit
from stepaudit import probes
from stepaudit.probes import Field, Options, Probe, register
from stepaudit.probes.base import NEEDS
from stepaudit.schema import field as schema_field


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _run(tmp_path, name: str, steps: int = 2, **kwargs) -> stepaudit.Audit:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / name, probes={name: 1}, **kwargs)
    for i in range(steps):
        audit.step(_batch(i))
    audit.close()
    return audit


def _stored(tmp_path, name: str) -> list[dict]:
    return stepaudit.load(tmp_path / name).to_dict("records")


# -- the boundary: what a probe returns ---------------------------------------------------------------------
@register("_t_unknown", fields={"t_kept": "float"})
def _unknown(ctx):
    """Writes a declared field and one it never declared."""
    return {"t_kept": 1.5, "t_undeclared": 2.0}


@register("_t_core", fields={"t_kept_core": "float"})
def _core(ctx):
    """Overwrites a core field."""
    return {"t_kept_core": 1.0, "delta": 0.0, "loss_before": -1.0}


@register("_t_typed", fields={"t_float": "float", "t_int": "int", "t_text": "str", "t_flag": "bool"})
def _typed(ctx):
    """Values of the wrong type next to a right one."""
    return {"t_float": torch.tensor(1.0), "t_int": 2.5, "t_text": "fine", "t_flag": 1}


def test_an_undeclared_field_goes_to_probe_errors_and_the_step_is_stored(tmp_path):
    audit = _run(tmp_path, "_t_unknown")
    for record in audit.records:
        assert record["t_kept"] == 1.5 and "t_undeclared" not in record
        assert "unknown field 't_undeclared'" in record["probe_errors"]["_t_unknown"]
        assert record["verdict"] in ("decrease", "increase", "flat")
    stored = _stored(tmp_path, "_t_unknown")
    assert [r["step"] for r in stored] == [0, 1] and "t_undeclared" not in stored[0]


def test_a_field_colliding_with_a_core_field_is_refused_and_the_core_value_kept(tmp_path):
    audit = _run(tmp_path, "_t_core")
    for record in audit.records:
        assert record["delta"] == record["loss_after"] - record["loss_before"] and record["loss_before"] > 0
        message = record["probe_errors"]["_t_core"]
        assert "'delta' collides with a core field" in message and "'loss_before' collides" in message
        assert record["t_kept_core"] == 1.0
    assert len(_stored(tmp_path, "_t_core")) == 2


def test_badly_typed_values_are_refused_and_the_rest_kept(tmp_path):
    audit = _run(tmp_path, "_t_typed")
    record = audit.records[0]
    message = record["probe_errors"]["_t_typed"]
    for name, kind in (("t_float", "float"), ("t_int", "int"), ("t_flag", "bool")):
        assert f"field {name!r} must be {kind}" in message and name not in record
    assert record["t_text"] == "fine"
    assert len(_stored(tmp_path, "_t_typed")) == 2


def test_strict_raises_on_a_contract_violation(tmp_path):
    with pytest.raises(stepaudit.AuditError, match="unknown field 't_undeclared'"):
        _run(tmp_path, "_t_unknown", strict=True)


def test_a_result_that_is_not_a_dict_is_a_probe_error(tmp_path):
    register(Probe("_t_list", lambda ctx, options, state: [1.0]))
    record = _run(tmp_path, "_t_list", steps=1).records[0]
    assert record["probe_errors"]["_t_list"] == "returned list, not a dict of fields"


def test_two_probes_may_share_a_declared_schema_field_but_not_overwrite_the_core(tmp_path):
    model = make_mlp()
    audit = stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        classification_loss,
        run=tmp_path / "both",
        probes={"quadratic": 1, "hessian_trace": 1},
        probe_options={"curvature": {"trace_samples": 2}},
        strict=True,
    )
    audit.step(_batch(0))
    audit.close()
    assert audit.last["hvp_method"] and "probe_errors" not in audit.last


# -- declarations ----------------------------------------------------------------------------------------------
def _nothing(ctx, options, state):
    return {}


@pytest.mark.parametrize(
    "declaration, message",
    [
        (dict(fields=("delta",)), "'delta' is a core field; a probe cannot write it"),
        (dict(fields=("t_not_in_schema",)), r"not a schema field; declare it as Field\('t_not_in_schema'"),
        (dict(fields={"sharpness": "str"}), "is a float in the schema, not str"),
        (dict(fields={"t_x": "float"}, amends=("t_y",)), "amends undeclared field"),
        (dict(needs={"weights"}), "unknown need"),
        (dict(options=dict), "options must be an Options dataclass"),
    ],
)
def test_inconsistent_declarations_are_refused_when_the_probe_is_made(declaration, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Probe("_t_bad", _nothing, **declaration)


def test_every_builtin_probe_is_a_probe_declaring_schema_fields_and_known_needs():
    for name in probes.builtin():
        probe = probes.get(name)
        assert isinstance(probe, Probe) and probe.doc
        assert probe.fields and all(schema_field(f.name) is f for f in probe.fields), name
        assert probe.needs <= set(NEEDS)
        assert f"probe:{name}" in " ".join(schema_field(f.name).writer for f in probe.fields)
    assert probes.get("next_delta").amends and probes.get("next_delta").every_step
    assert probes.get("sharpness").collective is not None


# -- options -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"noise": {"method": "fast"}}, "noise option method must be one of 'auto', 'per_sample'"),
        ({"noise": {"groups": 0}}, "groups must be a positive int"),
        ({"noise": {"chunk": 2.5}}, "noise option chunk must be an int or None"),
        ({"noise": {"micro_batch": 8}}, "unknown noise option.*micro_batch; known: chunk, engine"),
        ({"reference": {"grad_cos": "yes"}}, "reference option grad_cos must be True or False"),
        ({"curvature": {"tol": 2.0}}, r"tol must lie in \(0, 1\)"),
        ({"curvature": {"stop": "early"}}, "curvature option stop must be one of 'residual', 'eigenvalue'"),
        ({"sharpness": {"max_hvps": "40"}}, "curvature option max_hvps must be an int"),
        ({"next_delta": {"every": 1}}, "unknown next_delta option.*known: \\(none\\)"),
        ({"noise": [("method", "auto")]}, "probe_options\\['noise'\\] must be a dict"),
    ],
)
def test_bad_probe_options_are_refused_at_construction_with_the_fix(tmp_path, options, message):
    model = make_mlp()
    with pytest.raises((ValueError, TypeError), match=message):
        stepaudit.Audit(
            model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, run=tmp_path, probe_options=options
        )


def test_options_are_parsed_into_the_probes_options_type(tmp_path):
    model = make_mlp()
    audit = stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        classification_loss,
        run=tmp_path,
        probe_options={"noise": {"method": "micro_batch", "micro_batches": 4}, "sharpness": {"max_hvps": 7}},
    )
    audit.close()
    noise, curvature = (
        probes.get("noise").read_options(audit.options),
        probes.get("hessian_trace").read_options(audit.options),
    )
    assert (noise.method, noise.micro_batches, noise.engine) == ("micro_batch", 4, "auto")
    assert curvature.max_hvps == 7 and curvature.tol == 1e-3  # the family shares its options


# -- state and amendments --------------------------------------------------------------------------------------------
@dataclass
class _Counter:
    steps: int = 0


@dataclass
class _EveryOptions(Options):
    offset: float = 0.0


def _counting(ctx, options: _EveryOptions, state: _Counter) -> dict:
    """Counts its own calls; amends the previous record with this step's loss; tries one field it may not amend."""
    state.steps += 1
    ctx.amend_previous(t_next_loss=ctx.record["loss_before"] + options.offset)
    if state.steps == 3:
        ctx.amend_previous(t_calls=-1)
    return {"t_calls": state.steps}


register(
    Probe(
        "_t_counting",
        _counting,
        fields=[
            Field("t_calls", "int", "calls", "calls so far", "probe:_t_counting"),
            Field("t_next_loss", "float", "loss units", "the next step's loss", "probe:_t_counting"),
        ],
        options=_EveryOptions,
        needs={"record"},
        state=_Counter,
        amends=("t_next_loss",),
    )
)


def test_state_lives_across_steps_and_amendments_reach_the_previous_stored_record(tmp_path):
    audit = _run(tmp_path, "_t_counting", steps=4, probe_options={"_t_counting": {"offset": 10.0}})
    records = audit.records
    assert [r["t_calls"] for r in records] == [1, 2, 3, 4]
    assert audit.probe_states["_t_counting"].steps == 4
    for previous, current in zip(records, records[1:]):
        assert previous["t_next_loss"] == current["loss_before"] + 10.0
    assert "t_next_loss" not in records[-1]
    assert "may not amend the previous record" in records[2]["probe_errors"]["_t_counting"]
    assert records[1]["t_calls"] == 2  # the refused amendment changed nothing
    stored = _stored(tmp_path, "_t_counting")
    assert [r["t_next_loss"] for r in stored[:3]] == [r["t_next_loss"] for r in records[:3]]
    assert math.isnan(stored[3]["t_next_loss"])


def test_a_plain_function_registered_without_fields_has_every_field_refused(tmp_path):
    @register("_t_plain")
    def plain(ctx):
        """The one-argument form, nothing declared."""
        return {"t_plain": 1.0}

    assert isinstance(plain, Probe) and plain.doc == "The one-argument form, nothing declared."
    assert "unknown field 't_plain'" in _run(tmp_path, "_t_plain", steps=1).records[0]["probe_errors"]["_t_plain"]


# -- needs -------------------------------------------------------------------------------------------------------
SEEN: dict = {}


def _sees(ctx, options, state) -> dict:
    """Notes whether the audit kept its copy of the weights before the step for this probe."""
    SEEN.setdefault(ctx.step, []).append(ctx.flat_before is not None and ctx.grads is not None)
    return {}


register(Probe("_t_grad_only", _sees, needs={"gradient"}))
register(Probe("_t_weights", _sees, needs={"weights_before", "gradient"}))


@pytest.mark.parametrize("name, kept", [("_t_grad_only", False), ("_t_weights", True)])
def test_the_weights_before_are_kept_only_for_a_probe_that_needs_them(tmp_path, name, kept):
    SEEN.clear()
    audit = _run(tmp_path, name, steps=2)
    assert SEEN == {0: [kept], 1: [kept]} and all("probe_errors" not in r for r in audit.records)

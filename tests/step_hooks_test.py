"""The public step hooks (``begin``/``end``), the audit's public state, its sinks and the one fault policy."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import classification_loss, make_mlp

import stepaudit
from stepaudit.audit import AuditError, StepWatch
from stepaudit.faults import contained, refused


def _train(model, optimizer, batch):
    optimizer.zero_grad()
    loss = classification_loss(model, batch)
    loss.backward()
    optimizer.step()
    return loss


def test_begin_and_end_audit_the_same_step_as_watch(tiny_batch, tmp_path):
    records = []
    for kind in ("watch", "begin"):
        model = make_mlp(dropout=0.2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / kind) as audit:
            torch.manual_seed(5)
            if kind == "watch":
                with audit.watch(tiny_batch):
                    _train(model, optimizer, tiny_batch)
            else:
                handle = audit.begin(tiny_batch)
                _train(model, optimizer, tiny_batch)
                audit.end()
                assert isinstance(handle, StepWatch) and handle.record is audit.last
            records.append(audit.last)
    keys = ("loss_before", "loss_after", "delta", "first_order", "verdict")
    assert [records[0][k] for k in keys] == [records[1][k] for k in keys]  # the same hooks: bit for bit


def test_end_with_a_failure_or_skipped_adds_no_warning_and_counts_no_skipped_step(tiny_batch, tmp_path):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r") as audit:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            audit.begin(tiny_batch)
            audit.end(ValueError("training raised"))
            audit.begin(tiny_batch)
            audit.end(skipped=True)
        assert audit.skipped_steps == 0 and audit.records == []
        audit.begin(tiny_batch)
        with pytest.warns(UserWarning, match="no optimizer step happened"):
            audit.end()
        assert audit.skipped_steps == 1
        with pytest.raises(RuntimeError, match=r"audit\.begin\(batch\)"):
            audit.end()


def test_begin_step_and_end_step_still_audit_and_warn_naming_the_new_calls(tiny_batch, tmp_path):
    """The first names keep working (same record as begin/end) and say which call replaces them."""
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "old") as audit:
        with pytest.warns(DeprecationWarning, match=r"call audit\.begin\(batch\)"):
            audit.begin_step(tiny_batch)
        _train(model, optimizer, tiny_batch)
        with pytest.warns(DeprecationWarning, match=r"call audit\.end\("):
            audit.end_step()
        assert [r["step"] for r in audit.records] == [0] and audit.last["verdict"] != "error"
        audit.begin(tiny_batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            audit.end_step(failed=True)  # failed: no "no optimizer step" warning, no skipped step
        assert [w.category for w in caught] == [DeprecationWarning] and audit.skipped_steps == 0


def test_public_state_is_read_only_and_sinks_see_every_record(tiny_batch, tmp_path):
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, closed = [], []

    class Sink:
        def __call__(self, record):
            seen.append(record["step"])

        def close(self):
            closed.append(True)

    audit = stepaudit.Audit(model, optimizer, classification_loss, run=tmp_path / "r", first_step=2)
    audit.add_sink(Sink())
    for _ in range(3):
        audit.step(tiny_batch)
    assert (audit.closed, audit.next_step, audit.steps_seen) == (False, 5, 3)
    for name in ("closed", "next_step", "steps_seen"):
        with pytest.raises(AttributeError):
            setattr(audit, name, 0)
    audit.close()
    assert audit.closed and seen == [2, 3, 4] and closed == [True]


def test_the_fault_policy_keeps_the_error_or_raises_an_audit_error():
    kept = []
    with contained(False, "auditing step 3 failed", kept.append) as fault:
        raise KeyError("boom")
    assert isinstance(fault.error, KeyError) and kept == [fault.error]
    with contained(False, "ran through", kept.append) as fault:
        pass
    assert fault.error is None and len(kept) == 1
    with pytest.raises(AuditError, match="^auditing step 3 failed: 'boom'$"):
        with contained(True, "auditing step 3 failed", kept.append):
            raise KeyError("boom")
    with pytest.raises(TypeError, match="bad value"):  # wrap=False: the error itself (Audit.log under strict)
        with contained(True, "logging", kept.append, wrap=False):
            raise TypeError("bad value")
    with pytest.raises(KeyError):  # only the exceptions it is told to catch
        with contained(False, "indexing", kept.append, catch=ValueError):
            raise KeyError("other")
    refused(False, "probe 't' at step 1", "unknown field", kept.append)
    assert kept[-1] == "unknown field"
    with pytest.raises(AuditError, match="^probe 't' at step 1: unknown field$"):
        refused(True, "probe 't' at step 1", "unknown field", kept.append)

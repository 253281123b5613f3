"""The record schema: every field real runs write is in it with its type, the docs table is generated from it,
and the store's column types and the export's column order follow it."""

from __future__ import annotations

import csv
import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import classification_loss, make_mlp

import stepaudit
from stepaudit import probes
from stepaudit.distributed import GlobalStep
from stepaudit.doctor.passive import PassiveWatcher
from stepaudit.doctor.runner import run_script
from stepaudit.export import export_csv
from stepaudit.noise_ranks import noise_fields
from stepaudit.schema import (
    FIELDS,
    LAYER_FIELDS,
    conforms,
    field,
    layer_field,
    markdown,
    ordered,
    ordered_layers,
    sql_type,
)
from stepaudit.store import RunStore, read_run

ROOT = Path(__file__).resolve().parents[1]
AUDIT_DOC = ROOT / "docs" / "audit.md"
BEGIN, END = "<!-- schema: begin -->\n", "<!-- schema: end -->"


def _batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _audit(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, **kwargs) -> list[dict]:
    with stepaudit.Audit(model, optimizer, classification_loss, run=tmp, strict=True, **kwargs) as audit:
        for i in range(steps):
            audit.step(_batch(i, 32))
    return audit.records


@pytest.fixture(scope="module")
def active_records(tmp_path_factory) -> list[dict]:
    """Records of real audits with every probe on: SGD (two groups, dropout), Adam with BatchNorm, two-batch noise."""
    tmp = tmp_path_factory.mktemp("schema")
    every = {name: 1 for name in probes.builtin()}
    model = make_mlp(dropout=0.1)
    sgd = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 0.05}], lr=0.1, momentum=0.9
    )
    records = _audit(tmp / "sgd", model, sgd, probes=every, reference=_batch(9, 16))
    model = make_mlp(batchnorm=True)
    records += _audit(
        tmp / "adam", model, torch.optim.Adam(model.parameters(), lr=0.01), probes=every, reference=_batch(9, 16)
    )
    model = make_mlp()
    records += _audit(
        tmp / "two",
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        probes={"noise": 1},
        probe_options={"noise": {"method": "two_batch"}},
    )
    return records


@pytest.fixture(scope="module")
def passive_records(tmp_path_factory) -> list[dict]:
    """Records of the doctor's passive capture on a tiny script (ReLU and tanh layers, three steps)."""
    script = tmp_path_factory.mktemp("passive") / "train.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        for step in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    """)
    )
    watcher = PassiveWatcher(max_steps=3)
    run_script(script, [], watcher)
    assert len(watcher.records) == 3
    return watcher.records


def _check(records: list[dict]) -> None:
    for record in records:
        for key, value in record.items():
            spec = field(key)
            assert spec is not None, f"record field {key!r} is not in the schema (stepaudit/schema_fields.py)"
            assert conforms(spec, value), f"{key}: declared {spec.type}, the run wrote {type(value).__name__} {value!r}"
        for row in record.get("layers") or ():
            for key, value in row.items():
                spec = layer_field(key)
                assert spec is not None, f"layer row field {key!r} is not in the schema"
                assert conforms(spec, value), f"layers.{key}: declared {spec.type}, got {value!r}"


def test_every_field_of_an_audit_with_every_probe_is_in_the_schema_with_its_type(active_records):
    _check(active_records)
    seen = {key for record in active_records for key in record}
    for expected in (
        "lr_group_1",
        "next_delta",
        "precond_sharpness_residual",
        "precond_sharpness_note",
        "noise_fallback",
        "noise_scale_steps",
        "interplay_matrix",
        "ref_delta",
        "layers",
    ):
        assert expected in seen  # the runs above do reach the rarer paths


def test_every_field_of_a_passive_doctor_run_is_in_the_schema_with_its_type(passive_records):
    _check(passive_records)
    seen = {key for record in passive_records for key in record}
    assert {"local_step", "backward_passes", "measured", "dead_relu_share", "saturated_share", "input_rms"} <= seen


def test_the_distributed_noise_fields_are_in_the_schema():
    step = GlobalStep(1.0, 0.9, 1e-6, 0, 64, local_sq=2.0, local_sq_var=0.1, global_sq=1.5, small=32.0, big=64.0)
    fields = noise_fields(step, world_size=2)
    assert set(fields) == {"noise_scale_ranks", "noise_scale_ranks_stderr", "noise_signal_ranks", "noise_trace_ranks"}
    for key, value in fields.items():
        assert field(key) is not None and conforms(field(key), value)


def test_schema_writers_name_known_probes_and_numbered_families_match_only_their_members():
    known = set(probes.known())
    for spec in FIELDS:
        for writer in spec.writer.split(", "):
            assert writer in ("core", "distributed", "passive") or writer.removeprefix("probe:") in known, writer
        assert spec.meaning and "\n" not in spec.meaning
    assert field("lr_group_5").name == "lr_group_<n>" and field("lr_group_") is None and field("lr_group_x") is None
    assert field("no_such_field") is None and layer_field("kind").type == "str"


def test_every_schema_field_a_builtin_probe_declares_names_that_probe_among_its_writers():
    for name in probes.builtin():  # e.g. interplay writes quadratic when the quadratic probe did not run
        for spec in probes.get(name).fields:
            assert f"probe:{name}" in field(spec.name).writer.split(", "), (name, spec.name)


def test_the_field_reference_in_docs_audit_md_is_the_generated_table():
    text = AUDIT_DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "docs/audit.md lost its schema markers"
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    for spec in (*FIELDS, *LAYER_FIELDS):
        assert f"| `{spec.name}` |" in table, f"docs/audit.md does not list {spec.name}"
    assert table == markdown(), "regenerate it: python -m stepaudit.schema --markdown"


def test_python_m_stepaudit_schema_markdown_prints_the_table():
    done = subprocess.run(
        [sys.executable, "-m", "stepaudit.schema", "--markdown"], capture_output=True, text=True, check=True
    )
    assert done.stdout == markdown()
    assert "RuntimeWarning" not in done.stderr


def _column_types(run: Path) -> dict[str, str]:
    with sqlite3.connect(run / "stepaudit.sqlite") as db:
        return {row[1]: row[2] for row in db.execute("PRAGMA table_info(steps)")}


def test_store_columns_take_their_sql_type_from_the_schema_not_the_first_value(tmp_path):
    store = RunStore(tmp_path, meta={})
    # first values that used to give the wrong type: None for a text field (REAL, read back as NaN), an int for an
    # int field (REAL, read back as 32.0), a bool (REAL); and None for a float field (still REAL)
    store.append(
        {
            "step": 0,
            "loss_before": None,
            "error": None,
            "batch_size": 32,
            "lr_exceeds_safe": True,
            "lr": 1,
            "lr_group_2": None,
            "my_text": "x",
            "my_number": 3,
        }
    )
    store.append(
        {
            "step": 1,
            "loss_before": 0.5,
            "error": "boom",
            "batch_size": None,
            "lr_exceeds_safe": None,
            "lr": 0.1,
            "lr_group_2": 0.01,
            "my_text": None,
            "my_number": 4,
        }
    )
    store.close()
    types = _column_types(tmp_path)
    assert types["loss_before"] == types["lr"] == types["lr_group_2"] == "REAL"
    assert types["error"] == "TEXT" and types["batch_size"] == types["lr_exceeds_safe"] == "INTEGER"
    assert types["my_text"] == "TEXT" and types["my_number"] == "REAL"  # unknown fields: the first-value rule
    for name, kind in types.items():
        assert name == "step" or field(name) is None or kind == sql_type(name)
    _, steps, _ = read_run(tmp_path)
    assert math.isnan(steps[0]["loss_before"]) and steps[1]["loss_before"] == 0.5
    assert steps[0]["error"] is None and steps[1]["error"] == "boom"
    assert steps[0]["batch_size"] == 32 and isinstance(steps[0]["batch_size"], int)
    assert steps[0]["lr"] == 1.0 and isinstance(steps[0]["lr"], float)


def test_csv_columns_follow_the_schema_order_with_unknown_fields_last(tmp_path):
    store = RunStore(tmp_path, meta={})
    store.append(
        {
            "step": 0,
            "zz_custom": 1.0,
            "lr_group_2": 0.2,
            "verdict": "flat",
            "lr_group_1": 0.1,
            "delta": 0.0,
            "loss_before": 1.0,
            "aa_custom": "x",
            "layers": [
                {
                    "kind": "module",
                    "name": "0",
                    "grad_norm": 1.0,
                    "update_norm": 0.1,
                    "weight_norm": 2.0,
                    "update_ratio": 0.05,
                }
            ],
        }
    )
    store.close()
    with export_csv(tmp_path, tmp_path / "steps.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header == ["step", "loss_before", "delta", "verdict", "lr_group_1", "lr_group_2", "zz_custom", "aa_custom"]
    assert header == ordered(header[::-1][2:] + ["zz_custom", "aa_custom"])
    with export_csv(tmp_path, tmp_path / "layers.csv", table="layers").open() as handle:
        assert next(csv.reader(handle)) == [f.name for f in LAYER_FIELDS]
    assert ordered_layers(["other", "update_ratio", "step"]) == ["step", "update_ratio", "other"]

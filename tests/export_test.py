"""Exporters: CSV and Parquet read back equal to the audit's own records; TensorBoard live and after the fact."""

import csv
import math
import sys

import pytest
import torch
from support.samples import trained_run

import stepaudit
from stepaudit.export import TensorBoardSink, export_csv, export_parquet, export_tensorboard, main

FIELDS = ("loss_before", "loss_after", "delta", "first_order", "alpha", "grad_norm", "update_ratio")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    return run, trained_run(run, steps=12, optimizer="adam")


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def test_csv_round_trips_every_step_exactly(real, tmp_path):
    run, records = real
    path = export_csv(run, tmp_path / "steps.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
    for row, record in zip(rows, records):
        assert row["verdict"] == record["verdict"]
        for field in FIELDS:
            assert same(float(row[field]), record[field]), field


def test_csv_and_parquet_into_a_folder_write_the_table_name_inside(real, tmp_path, capsys):
    run, records = real
    assert main([str(run), "--csv", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "steps.csv")
    assert len((tmp_path / "steps.csv").read_text().splitlines()) == len(records) + 1
    assert main([str(run / "stepaudit.sqlite"), "--csv", f"{tmp_path}/new/", "--table", "layers"]) == 0
    assert (tmp_path / "new" / "layers.csv").exists()
    assert export_csv(run, tmp_path) == tmp_path / "steps.csv"
    pytest.importorskip("pyarrow")
    assert export_parquet(run, tmp_path, table="layers") == tmp_path / "layers.parquet"


def test_export_of_a_corrupt_store_or_to_an_unwritable_place_is_one_line(real, tmp_path, capsys):
    run, _ = real
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stepaudit.sqlite").write_bytes(b"\0" * 4096)
    assert main([str(bad), "--csv", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stepaudit export: ") and "not a stepaudit run store (corrupt or truncated?)" in err
    assert err.count("\n") == 1
    (tmp_path / "a_file").write_text("x")
    assert main([str(run), "--csv", str(tmp_path / "a_file" / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stepaudit export: cannot write") and err.count("\n") == 1


def test_csv_layers_table(real, tmp_path):
    run, records = real
    with export_csv(run, tmp_path / "layers.csv", table="layers").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = {(r["step"], row["kind"], row["name"]): row["update_ratio"] for r in records for row in r["layers"]}
    assert {(int(r["step"]), r["kind"], r["name"]): float(r["update_ratio"]) for r in rows} == expected


def test_parquet_round_trips(real, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    run, records = real
    table = pq.read_table(export_parquet(run, tmp_path / "steps.parquet")).to_pylist()
    assert [r["step"] for r in table] == [r["step"] for r in records]
    for row, record in zip(table, records):
        assert row["verdict"] == record["verdict"]
        for field in FIELDS:
            assert same(row[field], record[field]), field


def scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_live_from_audit(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    audit = stepaudit.Audit(
        model,
        optimizer,
        lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        run=tmp_path / "run",
        tensorboard=tmp_path / "tb",
    )
    for _ in range(5):
        audit.step((x, y))
    audit.close()
    logged = scalars(tmp_path / "tb", "step/loss_before")
    assert [s for s, _ in logged] == [r["step"] for r in audit.records]
    assert [v for _, v in logged] == pytest.approx([r["loss_before"] for r in audit.records], rel=1e-6)  # float32
    ratio = scalars(tmp_path / "tb", "layers/update_ratio/module:0")
    assert [v for _, v in ratio] == pytest.approx(
        [
            next(row["update_ratio"] for row in r["layers"] if row["name"] == "0" and row["kind"] == "module")
            for r in audit.records
        ],
        rel=1e-6,
    )
    lowered = [v for _, v in scalars(tmp_path / "tb", "verdict/lowered_loss")]
    assert lowered == [float(r["verdict"] == "decrease") for r in audit.records]


def test_tensorboard_export_of_a_recorded_run(real, tmp_path):
    pytest.importorskip("tensorboard")
    run, records = real
    assert main([str(run), "--tensorboard", str(tmp_path / "tb")]) == 0
    logged = scalars(tmp_path / "tb", "step/delta")
    assert [v for _, v in logged] == pytest.approx([r["delta"] for r in records], rel=1e-6, abs=1e-12)


def test_missing_optional_packages_are_named_with_the_install_command(real, tmp_path, monkeypatch, capsys):
    run, _ = real
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'stepaudit\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main([str(run), "--parquet", str(tmp_path / "x.parquet")]) == 2
    assert "pip install 'stepaudit[parquet]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match="tensorboard"):
        export_tensorboard(run, tmp_path / "tb2")


def test_export_needs_exactly_one_target(real, capsys):
    run, _ = real
    with pytest.raises(SystemExit):
        main([str(run)])
    with pytest.raises(SystemExit):
        main([str(run), "--csv", "a.csv", "--parquet", "b.parquet"])
    assert main(["/no/such/run", "--csv", "a.csv"]) == 2

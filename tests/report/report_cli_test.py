"""``stepaudit report`` / ``stepaudit compare`` and the terminal summaries (rich and plain)."""

import io
import sys

import numpy as np
import pytest
from support.samples import write_synthetic_run

from stepaudit.cli import main as stepaudit
from stepaudit.report.cli import compare_main, main
from stepaudit.report.compare import cell, summary_rows
from stepaudit.report.data import load_run
from stepaudit.report.terminal import plain_compare, plain_run, print_compare, print_run, run_rows, sparkline

RICH = ("rich", "rich.box", "rich.console", "rich.panel", "rich.table", "rich.text")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [
        write_synthetic_run(root / name, steps=120, seed=seed, name=name) for seed, name in enumerate(("sgd", "adam"))
    ]


def test_report_writes_into_the_run_folder_by_default(runs, capsys):
    assert main([str(runs[0])]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(runs[0] / "report.html") and (runs[0] / "report.html").stat().st_size > 10_000


def test_report_output_path_and_the_top_level_dispatcher(runs, tmp_path, capsys):
    target = tmp_path / "nested" / "r.html"
    assert stepaudit(["report", str(runs[0]), "-o", str(target)]) == 0
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_report_of_a_missing_run_says_what_to_pass(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no stepaudit run" in capsys.readouterr().err


def test_report_accepts_the_sqlite_file_and_writes_beside_it(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "run", steps=20)
    assert stepaudit(["report", str(run / "stepaudit.sqlite")]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html") and (run / "report.html").exists()


def test_report_and_compare_into_an_existing_folder_write_the_default_name_inside(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(runs[0]), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html") and (out / "report.html").exists()
    assert main([str(runs[0]), "-o", f"{tmp_path}/fresh/"]) == 0  # a trailing slash means a folder
    assert (tmp_path / "fresh" / "report.html").exists()
    assert compare_main([str(r) for r in runs] + ["-o", str(out)]) == 0
    assert (out / "compare.html").exists() and capsys.readouterr().out.strip().endswith(str(out / "compare.html"))


def test_report_and_compare_of_a_corrupt_store_print_one_line_and_exit_1(runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stepaudit.sqlite").write_bytes(b"not sqlite at all" * 100)
    for argv in (["report", str(bad)], ["report", str(bad), "--terminal"], ["compare", str(runs[0]), str(bad)]):
        assert stepaudit(argv) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "not a stepaudit run store (corrupt or truncated?)" in lines[0], captured.err
        assert lines[0].startswith(f"stepaudit {argv[0]}: ") and str(bad / "stepaudit.sqlite") in lines[0]
        assert "Traceback" not in captured.err


def test_report_into_an_unwritable_place_is_one_line(runs, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main([str(runs[0]), "-o", str(tmp_path / "a_file" / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stepaudit report: cannot write") and "\n" not in err and "pass -o" in err


def test_terminal_summary_reads_the_run(runs, capsys):
    assert main([str(runs[0]), "--terminal"]) == 0
    out = capsys.readouterr().out
    run = load_run(runs[0])
    lowered = np.mean(run.verdicts == "decrease")
    assert "stepaudit · sgd" in out and f"{lowered:.0%}" in out and "120" in out


def test_terminal_alone_writes_no_html(tmp_path, capsys):
    run = write_synthetic_run(tmp_path / "quiet", steps=20)
    assert main([str(run), "--terminal"]) == 0
    assert not (run / "report.html").exists()
    assert main([str(run), "--terminal", "-o", str(tmp_path / "both.html")]) == 0
    assert (tmp_path / "both.html").exists()


def test_plain_fallback_without_rich(runs, monkeypatch):
    for name in RICH:
        monkeypatch.setitem(sys.modules, name, None)
    run = load_run(runs[1])
    buffer = io.StringIO()
    print_run(run, file=buffer)
    assert buffer.getvalue().strip() == plain_run(run)
    buffer = io.StringIO()
    print_compare([load_run(r) for r in runs], file=buffer)
    assert buffer.getvalue().strip() == plain_compare([load_run(r) for r in runs])


def test_compare_prints_a_table_and_writes_the_page(runs, tmp_path, capsys):
    out = tmp_path / "cmp.html"
    assert compare_main([str(r) for r in runs] + ["-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sgd" in printed and "adam" in printed and str(out) in printed
    assert out.read_text().count('<span class="swatch"') == 2


def test_compare_expands_a_folder_of_runs_and_refuses_a_missing_one(runs, tmp_path, capsys):
    assert compare_main([str(runs[0].parent), "--no-html"]) == 0
    table = capsys.readouterr().out
    assert table.index("adam") < table.index("sgd")  # folder order
    assert compare_main([str(tmp_path / "missing")]) == 2
    assert "no stepaudit run" in capsys.readouterr().err


def test_plain_compare_has_one_column_per_run(runs):
    text = plain_compare([load_run(r) for r in runs])
    first = text.splitlines()[0].split()
    assert first == ["run", "sgd", "adam"]
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert rows["steps"].split()[-2:] == ["120", "120"]


def test_sparkline_rises_with_the_values():
    assert sparkline(np.arange(8.0), width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline(np.array([np.nan, np.nan])) == ""
    assert sparkline(np.array([1.0, np.nan, 3.0]), width=8) == "▁ █"


# -- a doctor (passive) run: the report shows what the doctor said ------------------------------------------------

CLEAN = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x = torch.randn(256, 8); y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
for step in range(60):
    idx = torch.randint(0, 256, (64,))
    opt.zero_grad()
    loss = nn.CrossEntropyLoss()(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
"""


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory):
    """(run folder, the doctor's JSON result) of ``stepaudit doctor --json --run DIR`` on a clean script."""
    import json

    from stepaudit.doctor import cli as doctor

    root = tmp_path_factory.mktemp("doctor")
    script = root / "train.py"
    script.write_text(CLEAN)
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        assert doctor.main(["--json", "--run", str(root / "run"), str(script)]) == 0
    finally:
        sys.stdout = saved
    return root / "run", json.loads(out.getvalue())


def flat(text):
    return " ".join(text.split())


def test_report_of_a_doctor_run_shows_the_doctors_diagnoses(doctor_run, capsys):
    run, result = doctor_run
    assert main([str(run), "--terminal"]) == 0
    out = capsys.readouterr().out
    assert "nonfinite" not in out  # unsampled passive fields are NaN in the store: never re-diagnosed as non-finite
    codes = [d["code"] for d in result["diagnoses"]]
    shown = [line.split("•", 1)[1].split()[0] for line in out.splitlines() if "•" in line]
    assert shown == codes  # the doctor's diagnoses, in the doctor's order, nothing added
    assert load_run(run).findings == result["diagnoses"]
    assert main([str(run)]) == 0
    capsys.readouterr()
    page = (run / "report.html").read_text()
    assert "nonfinite" not in page and page.count('class="finding ') == len(codes)


def test_passive_fields_say_not_measured(doctor_run, capsys):
    run, _ = doctor_run
    loaded = load_run(run)
    text = plain_run(loaded)
    rows = {
        line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ") and "  " in line[2:]
    }
    for label in ("lowered / raised / flat", "median α", "median Δloss / g·Δw"):
        assert "not measured in passive mode" in rows[label]
    assert "0% / 0% / 0%" not in text and " nan " not in f" {text} "
    assert main([str(run), "--terminal"]) == 0
    assert flat(capsys.readouterr().out).count("not measured in passive mode") == 3
    assert main([str(run)]) == 0
    capsys.readouterr()
    page = (run / "report.html").read_text()
    assert page.count("not measured in passive mode") >= 3 and ">nan<" not in page


def test_last_loss_is_the_doctors_median_of_the_last_fifth(doctor_run, tmp_path):
    import stepaudit
    from stepaudit.doctor.facts import Facts
    from stepaudit.doctor.summary import stored_record
    from stepaudit.report.data import summary

    run, _ = doctor_run
    loaded = load_run(run)
    records = [stored_record(r, True) for r in loaded.steps]
    expected = Facts(records, loaded.meta).loss_end
    assert summary(loaded)["last_loss"] == pytest.approx(expected)
    assert summary(loaded)["last_loss"] != pytest.approx(loaded.columns["loss_before"][-1])  # not the last batch
    assert "last = median of the last fifth" in plain_run(loaded)
    # an active run: the same definition over the audited records, non-finite steps cut as the rules cut them
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    audit = stepaudit.Audit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        run=tmp_path / "active",
    )
    for _ in range(40):
        audit.step((x, y))
    records = list(audit.records)
    audit.close()
    assert summary(load_run(tmp_path / "active"))["last_loss"] == pytest.approx(Facts(records).loss_end)
    # written out: 40 steps of batch 64, so the last fifth is 8 steps (more than the 5-step floor)
    import statistics

    expected = statistics.median(r["loss_before"] for r in records[-8:])
    assert summary(load_run(tmp_path / "active"))["last_loss"] == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(statistics.median(r["loss_before"] for r in records[:8]))


def test_compare_shows_the_stored_top_diagnosis(doctor_run, runs, capsys):
    run, result = doctor_run
    assert compare_main([str(run), str(runs[0]), "--no-html"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "doctor's top finding" in line)
    assert row.split()[3] == result["diagnoses"][0]["code"] and "nonfinite" not in out
    table = plain_compare([load_run(run), load_run(runs[0])])
    lowered = next(line for line in table.splitlines() if line.startswith("lowered"))
    assert "not measured in passive mode" in lowered and "%" in lowered  # the passive run, then the audited one
    assert "loss first → last (median of the last fifth)" in table


def test_report_of_a_doctor_run_that_failed_before_the_first_step(tmp_path, capsys):
    from stepaudit.doctor import cli as doctor

    script = tmp_path / "train.py"
    script.write_text("import torch\nraise RuntimeError('no GPU here')\n")
    assert doctor.main(["--run", str(tmp_path / "run"), str(script)]) == 1
    capsys.readouterr()
    loaded = load_run(tmp_path / "run")
    assert loaded.findings == [] and loaded.findings_error is None
    assert loaded.outcome == f"stopped before the first optimizer step: RuntimeError: no GPU here ({script}:2)"
    assert loaded.outcome in plain_run(loaded)
    assert main([str(tmp_path / "run")]) == 0
    assert "stopped before the first optimizer step" in (tmp_path / "run" / "report.html").read_text()


def test_terminal_tables_never_split_a_word_at_80_columns(tmp_path):
    """Every word of every cell and run name appears whole in the 80-column output (rich folds only between words)."""
    meta = {
        "optimizer": "AdamW",
        "test_accuracy": 0.97,
        "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}],
    }
    runs = [
        load_run(write_synthetic_run(tmp_path / n, steps=30, name=n, meta=meta))
        for n in ("adamw-with-a-long-name", "sgd", "momentum")
    ]
    for show, args in ((print_compare, runs), (print_run, runs[0])):
        buffer = io.StringIO()
        show(args, file=buffer, width=80)
        out = buffer.getvalue()
        assert max(len(line) for line in out.splitlines()) <= 80
        words = (
            {w for r in summary_rows(runs) for k, v in r.items() for w in cell(k, v).split()}
            if show is print_compare
            else {w for q, v, h in run_rows(runs[0]) for w in f"{q} {v}".split()}
        )
        broken = [
            w for w in words if w not in out and w != "–" and not any(f"{w[:k]}…" in out for k in range(4, len(w)))
        ]
        assert not broken, f"{show.__name__} split these words: {broken}"
